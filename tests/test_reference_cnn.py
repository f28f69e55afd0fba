"""LRP-ε → 0 on torchvision's VGG and ResNet equals gradient × input of the same model with its activations passing
relevance unchanged (the reference of tests/reference_cnn.py, built by patching model instances, not with lrpkit).

This needs every stabiliser a preset assigns to follow the preset's ε (average and adaptive pooling included) and
max pooling to pass the relevance to its argmax without a stabiliser (:class:`lrpkit.rules.MaxPoolRule`). Before
that, CP-LRP at ε = 1e-16 missed the limit by 2.7e-6 on ResNet-18 (average pooling had a fixed ε = 1e-6, max
pooling LRP-0 with 1e-9).
"""

import pytest
import torch
import torchvision
from torch import nn

import lrpkit
from lrpkit import presets, rules
from helpers import epsilon_everywhere
from reference_cnn import max_relative_error, reference_relevance


COMPOSITES = {"CPLRP": lambda eps: presets.CPLRP(epsilon=eps), "epsilon-everywhere": epsilon_everywhere}


@pytest.fixture(scope="module")
def cnns(randomize_bn):
    """float64 torchvision CNNs with random weights and BatchNorm statistics: VGG11-BN (max pooling, adaptive
    average pooling that upsamples 2x2 to 7x7, a narrowed classifier), ResNet-18 (BasicBlock), ResNet-50
    (Bottleneck)."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11_bn(num_classes=10)
    vgg.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return {"vgg11_bn": randomize_bn(vgg, 1).double().eval(),
            "resnet18": randomize_bn(torchvision.models.resnet18(num_classes=10), 2).double().eval(),
            "resnet50": randomize_bn(torchvision.models.resnet50(num_classes=10), 3).double().eval()}


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet18", "resnet50"])
def test_lrp_epsilon_limit_is_gradient_times_input(cnns, arch, composite):
    model = cnns[arch]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref, target = reference_relevance(model, x)
    errors = {}
    for eps in (1e-16, 1e-10, 1e-8):
        e = lrpkit.LRP(model, COMPOSITES[composite](eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        errors[eps] = max_relative_error(e.relevance, ref)
    assert errors[1e-16] <= 1e-10, errors
    # the deviation from the limit is the stabilisers' and scales with ε (float rounding is far below it)
    assert 10 < errors[1e-8] / errors[1e-10] < 1000, errors


def test_presets_give_the_pools_their_epsilon_and_max_pooling_the_argmax_rule(cnns):
    lrp = lrpkit.LRP(cnns["vgg11_bn"], presets.EpsilonPlus(epsilon=0.25))
    slots = lrp.composite.assign(lrp.chain)
    pools = [s for s in slots if isinstance(s.layer, (nn.AdaptiveAvgPool2d, nn.MaxPool2d))]
    assert pools
    for s in pools:
        if isinstance(s.layer, nn.MaxPool2d):
            assert type(s.rule) is rules.MaxPoolRule
        else:
            assert type(s.rule) is rules.EpsilonRule and s.rule.epsilon == 0.25


def test_max_pool_rule_routes_relevance_to_the_argmax():
    # MaxPool1d(kernel 2, stride 1) on a = [1, 3, 2]: both windows' maximum is a_1 = 3, so it gets R_0 + R_1,
    # unchanged, without a stabiliser (LRP-0 would give 3·R/(3 + 1e-9))
    model = nn.Sequential(nn.MaxPool1d(2, stride=1)).eval()
    composite = lrpkit.Composite(lrpkit.GlobalTypeMap({nn.MaxPool1d: rules.MaxPoolRule()}))
    x = torch.tensor([[[1.0, 3.0, 2.0]]], dtype=torch.float64)
    R = torch.tensor([[[0.25, 0.5]]], dtype=torch.float64)
    out = lrpkit.LRP(model, composite)(x, R=R).relevance
    assert torch.equal(out, torch.tensor([[[0.0, 0.75, 0.0]]], dtype=torch.float64))
    # a zero maximum passes its relevance too (the gradient's choice), and negative inputs as well
    x = torch.tensor([[[-2.0, -1.0, 0.0]]], dtype=torch.float64)
    out = lrpkit.LRP(model, composite)(x, R=R).relevance
    assert torch.equal(out, torch.tensor([[[0.0, 0.25, 0.5]]], dtype=torch.float64))
