"""zennit-crp (0.4.2, a dev dependency) as an independent implementation of CRP, with zennit's own composites.

zennit-crp's ``CondAttribution`` masks the gradient (zennit's relevance) at the output of the conditioned module with
``ChannelConcept`` and runs zennit's backward pass from the output; ``init_rel=1`` starts from the one-hot of the
target (lrpkit's ``normalize_output=True``), its default from the logit (``normalize_output=False``). Its heatmap is
the input relevance summed over the input channels; here ``attribution_modifier`` is overridden to keep it whole.

zennit-crp 0.6 has ``exclude_parallel``; it pins zennit 0.4.6, which this project's zennit >= 0.5 excludes, so 0.4.2
is the one that installs. On a VGG (no parallel paths) the two are the same. For a layer inside a ResNet block,
0.4.2's ``start_layer`` / ``init_rel`` give the same definition from zennit's side: a first pass records zennit's
relevance at the layer, a second pass starts zennit's backward at the layer's output from its masked relevance, so
nothing reaches the input around the layer (what 0.6's ``exclude_parallel=True`` does).

Everything in float64; maps are compared with ``max|R_lrpkit − R_zennit| <= 1e-6 · max|R_zennit|``. The BatchNorm
eps is set to 0 in the ResNet: zennit keeps a merged BatchNorm computing ``x / sqrt(1 + eps)`` where lrpkit removes
it (see tests/test_zennit_oracle.py).
"""

import pytest
import torch
import torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from torch import nn
from zennit import composites as zc
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrpkit
from lrpkit.crp import IndexedConcepts, TopConcepts

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


class WholeRelevance(CondAttribution):
    """zennit-crp's conditional attribution, returning the input relevance unsummed (B, 3, H, W)."""

    def attribution_modifier(self, data):
        return data.grad.detach()


def assert_relevance_close(ours, theirs, rtol=1e-6):
    scale = theirs.abs().max()
    assert scale > 0
    err = (ours - theirs).abs().max() / scale
    assert err <= rtol, f"max-abs relative difference {err:.3g} > {rtol}"


def images(n, seed=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) - MEAN) / STD


@pytest.fixture(scope="module")
def vgg():
    """torchvision vgg11 (random weights, 10 classes), its classifier narrowed to 64 hidden units, float64."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return model.double().eval()


def zennit_conditional(model, x, layer, channels, target, composite, **kwargs):
    """zennit-crp's conditional relevance of each channel for one sample: (K, 3, H, W), and its relevance at the
    layer from the unconditioned pass: (1, C, ...)."""
    attribution = WholeRelevance(model)
    conditions = [{layer: [int(c)], "y": [int(target)]} for c in channels]
    result = attribution(x.clone().requires_grad_(True), conditions, composite, **kwargs)
    plain = attribution(x.clone().requires_grad_(True), [{"y": [int(target)]}], composite, record_layer=[layer],
                        **kwargs)
    return result.heatmap, plain.relevances[layer]


@pytest.mark.parametrize("layer", ["features.13", "features.18", "features.6"])
def test_vgg_conditional_heatmaps_and_top_concepts_agree_with_zennit_crp(vgg, layer):
    x = images(2)
    lrp = lrpkit.LRP(vgg, lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, layer, TopConcepts(4))(x)
    for b in range(2):
        theirs, at_layer = zennit_conditional(vgg, x[b: b + 1], layer, expl.concepts[b], expl.target[b],
                                              zc.EpsilonPlusFlat(canonizers=[VGGCanonizer()]), init_rel=1)
        assert_relevance_close(expl.relevance[b], theirs)
        channel_relevance = ChannelConcept().attribute(at_layer, abs_norm=False)  # (1, C): summed over positions
        assert_relevance_close(expl.channel_relevance[b], channel_relevance[0])
        top = channel_relevance[0].topk(4)
        assert expl.concepts[b].tolist() == top.indices.tolist()
        assert_relevance_close(expl.concept_relevance[b], top.values)


def test_vgg_from_the_logit_as_zennit_crp_by_default(vgg):
    x = images(1, seed=3)
    lrp = lrpkit.LRP(vgg, lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, "features.16", IndexedConcepts(3, 100, 511))(x, target=7, normalize_output=False)
    theirs, _ = zennit_conditional(vgg, x, "features.16", [3, 100, 511], 7,
                                   zc.EpsilonPlusFlat(canonizers=[VGGCanonizer()]))
    assert_relevance_close(expl.relevance[0], theirs)


@pytest.fixture(scope="module")
def resnet(randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model.double().eval()


def test_resnet_layer_inside_a_block_agrees_with_zennit_crp_started_at_the_layer(resnet):
    layer, channels = "layer2.1.conv1", [5, 40, 77]
    x = images(1, seed=4)
    lrp = lrpkit.LRP(resnet, lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, layer, IndexedConcepts(*channels))(x)
    target = int(expl.target[0])
    composite = zc.EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    _, at_layer = zennit_conditional(resnet, x, layer, channels, target, composite, init_rel=1)
    attribution = WholeRelevance(resnet)
    for k, c in enumerate(channels):
        masked = torch.zeros_like(at_layer)
        masked[:, c] = at_layer[:, c]
        theirs = attribution(x.clone().requires_grad_(True), [{layer: [c]}], composite, start_layer=layer,
                             init_rel=masked).heatmap
        assert_relevance_close(expl.relevance[0, k], theirs[0])
    # zennit-crp 0.4.2's plain conditional pass also lets the relevance of the identity path through: different
    around, _ = zennit_conditional(resnet, x, layer, channels[:1], target, composite, init_rel=1)
    assert (expl.relevance[0, 0] - around[0]).abs().max() > 1e-3 * around.abs().max()
