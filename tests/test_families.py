"""Model families (lrpkit.families): one registration answers the composite, the geometry and the methods; the
built-in families; scoped registration."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import lrpkit
from lrpkit.families import GENERIC, Family, Geometry, family_of
from lrpkit.layers import Chain


def test_the_built_in_families():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    regs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             reg_tokens=4)
    assert family_of(vit).name == "timm-vit" and family_of(vit).geometry(vit) == Geometry((8, 8), 1, True)
    assert family_of(deit).geometry(deit).num_prefix == 2  # class and distillation token
    assert family_of(regs).geometry(regs).num_prefix == 5  # class token and 4 registers
    cnn = torchvision.models.resnet18()
    assert family_of(cnn).name == "torchvision-cnn" and family_of(cnn).geometry(cnn) == Geometry()
    assert family_of(nn.Sequential(nn.Linear(2, 2))) is GENERIC


def test_the_analyzer_and_the_methods_ask_the_family():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            num_classes=3).eval()
    lrp = lrpkit.LRP(vit)
    assert lrp.family.name == "timm-vit" and lrp.patch_size == (8, 8)
    rollout = lrpkit.methods.AttentionRollout(vit)
    assert rollout.num_prefix() == 1 and rollout.grid(torch.zeros(1, 3, 32, 48)) == (4, 6)
    with pytest.raises(lrpkit.methods.NotApplicableError, match="self-attention"):
        lrpkit.methods.AttentionRollout(torchvision.models.resnet18().eval())


def test_a_family_is_scoped_and_checked():
    class Net(nn.Sequential):
        pass

    family = Family("net", (Net,), composite=lambda chain: lrpkit.presets.EpsilonPlus(),
                    geometry=lambda model, chain: Geometry())
    net = Net(nn.Linear(3, 2)).eval()
    with lrpkit.Registry().family(family):
        assert family_of(net) is family
        with lrpkit.registered():  # an inner block does not hide it
            assert family_of(net) is family
    assert family_of(net) is GENERIC
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        Family("bad", (int,), composite=lambda c: None, geometry=lambda m, c: Geometry())
    with pytest.raises(TypeError, match="callables"):
        Family("bad", (Net,))
    with pytest.raises(TypeError, match="Family"):
        lrpkit.Registry().family("net")


def test_generic_geometry_from_the_chain():
    assert GENERIC.geometry(None, Chain([nn.Linear(2, 2)])) == Geometry()
    with pytest.raises(ValueError, match="no patch grid"):
        Geometry().grid(torch.zeros(1, 3, 8, 8))
