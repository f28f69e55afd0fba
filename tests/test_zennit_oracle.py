"""zennit (0.5.1, a dev dependency) as an independent implementation of the basic rules and the CNN presets.

Relevance maps are compared with a relative tolerance on the max-abs: ``max|R_lrpkit − R_zennit| <= 1e-4 ·
max|R_zennit|``. Name by name:

- zennit ``Epsilon(ε)`` is lrpkit ``EpsilonRule(ε)``; with ε = 1e-9 it is lrpkit's ``ZeroRule``.
- zennit ``Gamma`` is the *generalised* γ-rule (Andéol et al. 2021): lrpkit ``GeneralizedGammaRule``. lrpkit's plain
  ``GammaRule`` (Montavon et al. 2019: ``W + γW⁺``, ``b + γb⁺``, one term) is built below from zennit's own
  primitives (``BasicHook`` with one ``GammaMod(min=0)`` term) and compared on inputs of any sign.
- zennit ``ZPlus``, ``AlphaBeta``, ``ZBox``, ``WSquare``, ``Flat``, ``Pass`` are lrpkit's rules of the same names.
- Presets: zennit's composites of the same names with zennit's canonizers (``VGGCanonizer`` = ``SequentialMergeBatchNorm``,
  ``ResNetCanonizer``). zennit maps ``Norm`` (a proportional split, stabiliser 1e-6) onto its ``Sum`` layer (the
  residual addition) and onto average pooling; lrpkit's ``SkipConnectionRule`` / ``SumRule`` and the presets'
  LRP-ε on average pooling (the preset's ε, 1e-6 by default, zennit's default stabiliser) are the same formulas.
  zennit gives MaxPool no rule (plain gradient: all relevance to the maximum), and so do lrpkit's presets
  (``MaxPoolRule``: ``R_in = (∂y/∂a)ᵀ R``). One difference by design, far below the tolerance: zennit leaves each
  merged BatchNorm in place computing ``x / sqrt(1 + eps)`` (its running variance is set to 1, its eps kept; zennit
  passes relevance through it), where lrpkit removes it, so zennit's activations are smaller by a factor ``(1 + 1e-5)^(-1/2)`` per BatchNorm.
"""

import pytest
import torch
import torchvision
from torch import nn
from zennit import composites as zc
from zennit import rules as zr
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.core import BasicHook, Stabilizer
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrpkit
from lrpkit import presets, rules


def assert_relevance_close(ours, theirs, rtol=1e-4):
    scale = theirs.abs().max()
    assert scale > 0
    err = (ours - theirs).abs().max() / scale
    assert err <= rtol, f"max-abs relative difference {err:.3g} > {rtol}"


def zennit_plain_gamma(gamma, stabilizer):
    """LRP-γ (one term, ``W + γW⁺`` and ``b + γb⁺``) from zennit's primitives."""
    stab = Stabilizer.ensure(stabilizer)
    return BasicHook(input_modifiers=[lambda a: a], param_modifiers=[zr.GammaMod(gamma, min=0.0)],
                     output_modifiers=[lambda z: z], gradient_mapper=lambda g, outs: [g / stab(outs[0])],
                     reducer=lambda ins, grads: ins[0] * grads[0])


# ---- one layer, every basic rule ------------------------------------------------------------------------------

# per input feature (Linear) or channel (Conv2d) bounds for z^B
LOW = torch.tensor([-1.5, -2.0, -1.0], dtype=torch.float64)
HIGH = torch.tensor([2.0, 1.5, 2.5], dtype=torch.float64)

# name: (lrpkit rule, zennit hook) for bounds (low, high); non-default parameters where a parameter exists
RULES = {
    "zero": lambda lo, hi: (rules.ZeroRule(), zr.Epsilon(epsilon=1e-9)),
    "epsilon": lambda lo, hi: (rules.EpsilonRule(0.5), zr.Epsilon(epsilon=0.5)),
    "gamma": lambda lo, hi: (rules.GammaRule(0.3, epsilon=1e-6), zennit_plain_gamma(0.3, 1e-6)),
    "generalized-gamma": lambda lo, hi: (rules.GeneralizedGammaRule(0.3), zr.Gamma(gamma=0.3)),
    "wsquare": lambda lo, hi: (rules.WSquareRule(), zr.WSquare()),
    "flat": lambda lo, hi: (rules.FlatRule(), zr.Flat()),
    "zplus": lambda lo, hi: (rules.ZPlusRule(), zr.ZPlus()),
    "alpha2beta1": lambda lo, hi: (rules.AlphaBetaRule(2, 1), zr.AlphaBeta(2, 1)),
    "alpha3beta2": lambda lo, hi: (rules.AlphaBetaRule(3, 2), zr.AlphaBeta(3, 2)),
    "zbox": lambda lo, hi: (rules.ZBoxRule(lo, hi), zr.ZBox(lo, hi)),
    "zbox-low0": lambda lo, hi: (rules.ZBoxRule(0.0, 3.0), zr.ZBox(0.0, 3.0)),
}


def _layer_model(kind, seed):
    """(model, input shape, bounds shape): the layer under test followed by a ReLU (Pass in both libraries)."""
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(3, 5), nn.ReLU()).double().eval(), (4, 3), (1, 3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()).double().eval(), (2, 3, 7, 7), (1, 3, 1, 1)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("name", list(RULES))
def test_rule_agrees_with_zennit(name, kind):
    # float64, so that the comparison tests the formulas and not float rounding near small denominators;
    # inputs of both signs, but inside [0, 3] for zbox-low0; random output relevance of both signs; ReLU: Pass
    model, shape, bounds = _layer_model(kind, seed=len(name))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 3.0
    if name != "zbox-low0":
        x = x - 1.0
    with torch.no_grad():
        out_shape = model(x).shape
        layer = model[0]
        layer.bias.uniform_(-0.5, 0.5, generator=g)
    R = torch.randn(out_shape, generator=g, dtype=torch.float64)
    ours_rule, hook = RULES[name](LOW.view(bounds), HIGH.view(bounds))
    layer_type = type(layer)
    ours = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalTypeMap({layer_type: ours_rule})))(x, R=R).relevance
    with Gradient(model, LayerMapComposite([(nn.ReLU, zr.Pass()), (layer_type, hook)])) as attributor:
        _, theirs = attributor(x, R)
    assert_relevance_close(ours, theirs)


def test_plain_and_generalized_gamma_coincide_on_positive_inputs_and_outputs():
    # where every input and every output is positive, zennit's generalised Gamma is the plain γ-rule
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.weight.abs_()
        layer.bias.abs_()
    model = nn.Sequential(layer).eval()
    x = torch.rand(3, 6, dtype=torch.float64)
    R = torch.rand(3, 4, dtype=torch.float64)
    ours = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.GammaRule(0.25))))(x, R=R).relevance
    with Gradient(model, LayerMapComposite([(nn.Linear, zr.Gamma(0.25))])) as attributor:
        _, theirs = attributor(x, R)
    assert_relevance_close(ours, theirs)


# ---- presets on torchvision VGG16-BN and ResNet-18 ------------------------------------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def models(randomize_bn):
    """torchvision vgg16_bn and resnet18, random weights, randomised BatchNorm statistics, eval mode. VGG16-BN's
    classifier is narrowed to 256 hidden units (same layer types: Linear, ReLU, Dropout), which keeps the test
    fast (the 25088x4096 Linear alone has 100M parameters) and changes nothing in what is compared."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16_bn(num_classes=10)
    vgg.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 256),
                                   nn.ReLU(True), nn.Dropout(), nn.Linear(256, 10))
    resnet = torchvision.models.resnet18(num_classes=10)
    return {"vgg16_bn": (randomize_bn(vgg).eval(), VGGCanonizer),
            "resnet18": (randomize_bn(resnet).eval(), ResNetCanonizer)}


PRESETS = {
    "EpsilonPlus": lambda lo, hi: (presets.EpsilonPlus(), lambda c: zc.EpsilonPlus(canonizers=c)),
    "EpsilonAlpha2Beta1": lambda lo, hi: (presets.EpsilonAlpha2Beta1(),
                                          lambda c: zc.EpsilonAlpha2Beta1(canonizers=c)),
    "EpsilonPlusFlat": lambda lo, hi: (presets.EpsilonPlusFlat(), lambda c: zc.EpsilonPlusFlat(canonizers=c)),
    "EpsilonAlpha2Beta1Flat": lambda lo, hi: (presets.EpsilonAlpha2Beta1Flat(),
                                              lambda c: zc.EpsilonAlpha2Beta1Flat(canonizers=c)),
    "EpsilonGammaBox": lambda lo, hi: (presets.EpsilonGammaBox(lo, hi),
                                       lambda c: zc.EpsilonGammaBox(low=lo, high=hi, canonizers=c)),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
def test_preset_agrees_with_zennit(models, arch, preset):
    model, canonizer = models[arch]
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(1, 3, 64, 64, generator=g) - MEAN) / STD  # a normalised image: inside the z^B box
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    ours_composite, zennit_composite = PRESETS[preset](low, high)
    expl = lrpkit.LRP(model, ours_composite)(x)
    one_hot = torch.zeros_like(expl.output)
    one_hot[0, expl.target] = 1.0
    with Gradient(model, zennit_composite([canonizer()])) as attributor:
        out, theirs = attributor(x, one_hot)
    torch.testing.assert_close(expl.output, out, rtol=1e-4, atol=1e-4)
    assert_relevance_close(expl.relevance, theirs)
