"""The ``timm-efficientnet`` family: timm's EfficientNet and MobileNetV3 canonized exactly (random BatchNorm
statistics, float32 and float64, several configurations), the rules on its layers, and LRP-ε against an
independent reference built by patching the timm model itself.

The reference: with LRP-ε everywhere and ε → 0, LRP equals gradient × input of the same model in which every
squeeze-excitation gate is detached and every element-wise activation passes ``f(x)/x`` backward (Montavon et al.
2019; for the gate: ProductRule's gate mode, ``R_x = R``). It is built from the timm model instance by patching the
``forward`` of its activation and SqueezeExcite modules, not from lrpkit's layers.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.families.timm_efficientnet import SamePadConv2d
from lrpkit.layers import Multiply, SkipConnection
from lrpkit.rules import (AlphaBetaRule, EpsilonRule, FlatRule, PassRule, ProductRule, SkipConnectionRule, ZBoxRule,
                          ZPlusRule)
from helpers import (assert_batch_independent, assert_finite, cnn_presets, edge_inputs, epsilon_everywhere,
                     randomize_bn, relative)

timm = pytest.importorskip("timm")
from timm.layers import get_act_layer  # noqa: E402
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport  # noqa: E402
from timm.layers.padding import pad_same  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402
from timm.models._efficientnet_builder import decode_arch_def, round_channels  # noqa: E402
from timm.models.efficientnet import EfficientNet  # noqa: E402
from timm.models.mobilenetv3 import MobileNetV3  # noqa: E402


def named(name, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kw), seed).eval().to(dtype)


# a small EfficientNet with every block type: depthwise-separable (with and without the point-wise activation),
# inverted residual (SE, ReLU override), edge residual, conv-bn-act; skips where the shapes allow
ARCH = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e4_c12_se0.25", "ir_r1_k5_s2_e3_c16_se0.25_nre"],
        ["er_r1_k3_s1_e4_c16_se0.25", "cn_r1_k1_s1_c16"], ["dsa_r1_k3_s1_c16"]]
MBV3_SE = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)


def tiny(cls=EfficientNet, arch=ARCH, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_args=decode_arch_def(arch), num_features=24, stem_size=8, num_classes=5, act_layer=nn.SiLU)
    args.update(kw)
    return randomize_bn(cls(**args), seed).eval().to(dtype)


# -- exact forward -----------------------------------------------------------------------------------------------

NAMED = {  # name: input size (odd sizes exercise the asymmetric 'SAME' padding of the tf_ models)
    "efficientnet_b0": 64, "efficientnet_b1": 48, "efficientnet_b2": 40, "efficientnet_b3": 40,
    "tf_efficientnet_b0": 67, "tf_efficientnet_b1": 50, "tf_efficientnet_lite0": 49, "tf_efficientnet_es": 45,
    "mobilenetv3_small_100": 61, "mobilenetv3_large_100": 64, "tf_mobilenetv3_small_100": 59,
    "efficientnet_b0_g16_evos": 40,  # grouped (16 channels per group) instead of depthwise convolutions
}

TINY = {
    "all-blocks": dict(),
    "same-padding": dict(pad_type="same"),
    "hard-swish+timm-act": dict(act_layer=get_act_layer("hard_swish")),
    "timm-swish-class": dict(act_layer=timm.layers.activations.Swish),
    "drop-path+dropout": dict(drop_path_rate=0.3, drop_rate=0.2),
    "pool-max": dict(global_pool="max"),
    "pool-fast": dict(global_pool="fast"),
    "no-conv-head": dict(num_features=0),
    "no-classifier": dict(num_classes=0),
    "space-to-depth": dict(arch=[["ir_r1_k3_s1_e2_c8_d1"], ["ir_r1_k3_s2_e4_c12_se0.25"]]),
    "mobilenetv3": dict(cls=MobileNetV3, se_layer=MBV3_SE, act_layer=nn.Hardswish),
    "mobilenetv3-same-padding": dict(cls=MobileNetV3, se_layer=MBV3_SE, act_layer=nn.Hardswish, pad_type="same"),
    "mobilenetv3-head-norm": dict(cls=MobileNetV3, head_norm=True),
    "mobilenetv3-no-head-bias": dict(cls=MobileNetV3, head_bias=False, num_classes=0),
}


def check_forward(model_fn, shape):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model = model_fn(dtype)
        chain = lrpkit.canonize(model)
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            expected = model(x)
            assert relative(chain(x), expected) < tol, dtype


@pytest.mark.parametrize("name", NAMED)
def test_named_models_forward_exactly(name):
    size = NAMED[name]
    check_forward(lambda dtype: named(name, dtype), (2, 3, size, size + 3))


@pytest.mark.parametrize("config", TINY)
def test_configurations_forward_exactly(config):
    check_forward(lambda dtype: tiny(dtype=dtype, **TINY[config]), (2, 3, 37, 42))


def test_batchnorm_is_fused_and_its_activation_kept():
    model = named("efficientnet_b0")
    chain = lrpkit.canonize(model)
    leaves = [m for m in chain.modules() if not list(m.children())]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in leaves)  # every BatchNormAct2d fused ...
    acts = [m for m in model.modules() if isinstance(m, timm.layers.BatchNormAct2d) and not
            isinstance(m.act, nn.Identity)]
    assert sum(isinstance(m, Multiply) for m in chain.modules()) == 16  # the SE blocks, each with a SiLU of its own
    assert sum(isinstance(m, nn.SiLU) for m in leaves) == len(acts) + 16  # BatchNormAct2d's activation: a layer
    # the chain's top level: stem, its activation, the blocks, head, pooling, classifier
    names = chain.names
    assert names[:2] == ["conv_stem", "bn1.act"]
    assert names[-5:] == ["conv_head", "bn2.act", "global_pool", "global_pool.flatten", "classifier"]
    skips = [name for name, layer in zip(names, chain) if isinstance(layer, SkipConnection)]
    with_skip = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)
                 if b.has_skip]
    assert skips == with_skip


def test_batchnormact_in_a_sequential_keeps_its_activation():
    # BatchNormAct2d is a BatchNorm2d: fused as one, its activation would be lost. Its canonizer keeps it.
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU),
                                       nn.Conv2d(4, 2, 3))).eval()
    chain = lrpkit.canonize(model)
    assert [type(m) for m in chain] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5


def test_mobilenetv3_pools_before_the_head_convolution():
    model = named("mobilenetv3_large_100")
    chain = lrpkit.canonize(model)
    assert chain.names[-5:] == ["global_pool", "conv_head", "act2", "flatten", "classifier"]
    assert [type(m) for m in list(chain)[-5:]] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.Hardswish, nn.Flatten,
                                                   nn.Linear]
    assert type(model.classifier) is timm.layers.Linear  # timm's Linear becomes a plain nn.Linear
    gates = [m.gate[len(m.gate) - 1] for m in chain.modules() if isinstance(m, Multiply)]
    assert gates and all(isinstance(g, nn.Hardsigmoid) for g in gates)


def test_se_block_is_a_multiply_with_an_identity_signal():
    chain = lrpkit.canonize(named("efficientnet_b0"))
    se = next(m for m in chain.modules() if isinstance(m, Multiply))
    assert len(se.signal) == 0
    assert [type(m) for m in se.gate] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.SiLU, nn.Conv2d, nn.Sigmoid]
    x = torch.randn(2, se.gate[1].in_channels, 5, 6)
    module = next(m for m in named("efficientnet_b0").modules() if isinstance(m, SqueezeExcite))
    with torch.no_grad():
        torch.testing.assert_close(se(x), module(x), rtol=1e-6, atol=1e-6)


# -- same padding --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (5, 2, 1), (3, 1, 2), (4, 1, 1), (2, 2, 1),
                                                      ((3, 5), (2, 1), 1)])
def test_same_pad_conv_pads_as_timm_for_every_size(kernel, stride, dilation):
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel, stride=stride, dilation=dilation).double()
    mine = lrpkit.canonize(nn.Sequential(conv))[0]
    assert type(mine) is SamePadConv2d and mine.padding == (0, 0)
    for h, w in [(7, 7), (8, 9), (15, 16), (1, 2)]:
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), conv(x), rtol=0, atol=0)
            padded = pad_same(x, mine.kernel_size, mine.stride, mine.dilation)
            left, right, top, bottom = mine.same_padding((h, w))
            assert padded.shape[-2:] == (h + top + bottom, w + left + right)


def test_conv2d_same_export_is_padded_per_call():
    # timm's export variant caches the padding of the first input size; the canonized layer computes it per call
    torch.manual_seed(0)
    conv = Conv2dSameExport(3, 4, 3, stride=2).double().eval()
    mine = lrpkit.canonize(nn.Sequential(conv))[0]
    for size in (9, 10):
        x = torch.randn(1, 3, size, size, dtype=torch.float64)
        fresh = copy.deepcopy(conv)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), fresh(x), rtol=0, atol=0)


def same_padded_model(size):
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 3, stride=2, bias=False).double()
    out = -(-size // 2)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * out * out, 3).double()).eval()


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_same_padding_acts_as_zero_padding_for_flat_and_zbox(preset):
    # flat and z^B replace the input (by ones, by its bounds): the padded border is a constant of the layer, not an
    # input, so they treat it as a zero-padded convolution does. For an odd size 'SAME' is padding=1 on each side.
    model = same_padded_model(9)
    as_padded = copy.deepcopy(model)
    as_padded[0] = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    with torch.no_grad():
        as_padded[0].weight.copy_(model[0].weight)
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    composite = presets.EpsilonPlusFlat() if preset == "EpsilonPlusFlat" else presets.EpsilonGammaBox(0.0, 1.0)
    got, expected = (lrpkit.analyze(m, x, composite, target=0).relevance for m in (model, as_padded))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_flat_loses_nothing_to_an_asymmetric_same_padding():
    # an even size: 'SAME' pads one row and column after the input only; flat on the first layer spreads each output's
    # relevance over the real inputs of its receptive field and conserves it (up to its stabiliser)
    model = same_padded_model(8)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = lrpkit.LRP(model, presets.EpsilonPlusFlat())
    e = lrp(x, target=0, layerwise=True)
    R_first_out = e.layerwise[1].flatten(1).sum(1)
    torch.testing.assert_close(e.relevance.flatten(1).sum(1), R_first_out, rtol=1e-5, atol=0)
    assert (e.relevance[:, :, -1] != 0).all() and (e.relevance[:, :, :, -1] != 0).all()  # the last row/column too


# -- rules --------------------------------------------------------------------------------------------------------

def test_family_registration():
    for model in (named("efficientnet_b0"), named("mobilenetv3_small_100")):
        family = family_of(model)
        assert family.name == "timm-efficientnet"
        assert family.geometry(model).patch_size is None
        assert type(family.composite(None).primitives[-1].rule) is FlatRule  # EpsilonPlusFlat
        lrp = lrpkit.LRP(model)
        assert lrp.patch_size is None


@pytest.mark.parametrize("preset", ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat",
                                    "EpsilonGammaBox"])
def test_presets_give_activations_passing_and_gates_gate_mode(preset):
    model = tiny(cls=MobileNetV3, se_layer=MBV3_SE, act_layer=nn.Hardswish)
    composite = presets.EpsilonGammaBox(-3.0, 3.0) if preset == "EpsilonGammaBox" else getattr(presets, preset)()
    slots = composite.assign(lrpkit.canonize(model))
    for s in slots:
        if isinstance(s.layer, Multiply):
            assert isinstance(s.rule, ProductRule) and s.rule.mode == "gate"
        if isinstance(s.layer, (nn.Hardswish, nn.Hardsigmoid, nn.ReLU)):
            assert isinstance(s.rule, PassRule)


def degenerate_inputs(size=48):
    torch.manual_seed(1)
    return edge_inputs(torch.randn(1, 3, size, size))


PRESETS = {**cnn_presets(-3.0, 3.0), "epsilon": lambda: lrpkit.Composite(lrpkit.GlobalMap(EpsilonRule()))}


@pytest.fixture(scope="module")
def small_models():
    return {"efficientnet_b0": named("efficientnet_b0"), "tf_efficientnet_b0": named("tf_efficientnet_b0"),
            "mobilenetv3_small_100": named("mobilenetv3_small_100")}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_100"])
def test_presets_run_and_are_finite_on_edge_inputs(name, preset, small_models):
    model = small_models[name]
    e = lrpkit.LRP(model, PRESETS[preset]())(degenerate_inputs(47 if name.startswith("tf_") else 48))
    assert_finite(e)
    assert torch.allclose(e.accounting.total(), e.accounting.output, rtol=1e-3, atol=1e-3)
    assert not e.relevance[0].any() or preset in ("EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox")


def dense_equivalent(conv: nn.Conv2d) -> nn.Conv2d:
    """The grouped convolution as a groups=1 convolution whose weight is zero between groups."""
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, 1, conv.bias is not None).to(conv.weight.dtype)
    per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    with torch.no_grad():
        dense.weight.zero_()
        for g in range(conv.groups):
            dense.weight[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = \
                conv.weight[g * per_out:(g + 1) * per_out]
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


@pytest.mark.parametrize("groups", [6, 3])  # depthwise, grouped
@pytest.mark.parametrize("rule", ["z+", "alpha2beta1", "zbox", "epsilon"])
def test_grouped_convolutions_equal_their_dense_equivalent(rule, groups):
    # a weight that is zero contributes to no term of these rules: the grouped convolution must give exactly what
    # the dense convolution with zeros between the groups gives
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    R = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    make = {"z+": ZPlusRule, "alpha2beta1": lambda: AlphaBetaRule(2.0, 1.0), "zbox": lambda: ZBoxRule(-2.0, 2.0),
            "epsilon": lambda: EpsilonRule(1e-6)}[rule]
    out = []
    for layer in (conv, dense_equivalent(conv)):
        composite = lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Conv2d: make()}))
        out.append(lrpkit.LRP(nn.Sequential(layer).eval(), composite)(x, R=R).relevance)
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-12)


def test_flat_on_a_depthwise_convolution_by_hand():
    # flat spreads R_(c, p) uniformly over the inputs in p's receptive field, which for a depthwise convolution is
    # its own channel only: channel by channel, the flat rule of a one-channel convolution
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4).double()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    R = torch.rand(1, 4, 4, 4, dtype=torch.float64)
    flat = lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Conv2d: FlatRule(1e-14)}))
    got = lrpkit.LRP(nn.Sequential(conv).eval(), flat)(x, R=R).relevance
    ones = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False).double()
    with torch.no_grad():
        ones.weight.fill_(1.0)
        n = ones(torch.ones(1, 1, 7, 7, dtype=torch.float64))  # real inputs in each receptive field
    for c in range(4):
        s = R[:, c:c + 1] / n
        expected = torch.nn.grad.conv2d_input((1, 1, 7, 7), ones.weight, s, stride=2, padding=1)
        torch.testing.assert_close(got[:, c:c + 1], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum(), R.sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["gate", "uniform"])
def test_se_gate_modes_conserve_on_the_family(mode):
    model = tiny(cls=MobileNetV3, se_layer=MBV3_SE, act_layer=nn.Hardswish, dtype=torch.float64, head_bias=False)
    for m in model.modules():  # no biases: every rule below conserves exactly, what is left is the gates' share
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.bias)
            nn.init.zeros_(m.running_mean)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    composite = lrpkit.Composite(lrpkit.GlobalMap(EpsilonRule(1e-12)),
                                 lrpkit.GlobalTypeMap({SkipConnection: SkipConnectionRule(1e-12),
                                                       Multiply: ProductRule(mode)}))
    e = lrpkit.LRP(model, composite)(x)
    torch.testing.assert_close(e.relevance.flatten(1).sum(1), torch.ones(2, dtype=torch.float64), rtol=1e-6,
                               atol=1e-9)


# -- the reference ------------------------------------------------------------------------------------------------

def ratio_backward(forward):
    """``f(x)`` forward, ``g · f(x)/x`` backward (0 where x = 0, where the relevance ``x ⊙ g`` is 0 anyway)."""
    def patched(x):
        y = forward(x)
        r = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x)).detach()
        return y.detach() + (x * r - (x * r).detach())
    return patched


def detached_gate(se):
    """timm's SqueezeExcite forward with the gate detached: ``x ⊙ sg(gate(...))``."""
    def patched(x):
        s = se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * se.gate(s).detach()
    return patched


ELEMENTWISE = (nn.SiLU, nn.Hardswish, nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, timm.layers.activations.Swish,
               timm.layers.activations.HardSwish, timm.layers.activations.HardSigmoid, timm.layers.activations.Sigmoid)


def reference_relevance(model, x):
    """Gradient × input of a patched copy of the timm model (see the module docstring)."""
    m = copy.deepcopy(model)
    for module in m.modules():
        if getattr(module, "inplace", False):
            module.inplace = False  # the ratio needs x after f(x)
        if isinstance(module, ELEMENTWISE):
            module.forward = ratio_backward(module.forward)
        elif isinstance(module, SqueezeExcite):
            module.forward = detached_gate(module)
        elif not list(module.children()):
            assert isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Identity, nn.AdaptiveAvgPool2d,
                                       nn.Flatten)), type(module)  # linear in eval mode: nothing to patch
    xr = x.clone().requires_grad_(True)
    out = m(xr)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)  # the patches keep the forward
    target = out.argmax(1)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xr)
    return x * grad, target


REFERENCE = {"efficientnet_b0": 48, "tf_efficientnet_b0": 47, "tf_efficientnet_lite0": 45,
             "mobilenetv3_small_100": 45, "mobilenetv3_large_100": 48}


@pytest.mark.parametrize("name", REFERENCE)
def test_epsilon_lrp_equals_gradient_times_input_of_the_patched_timm_model(name):
    model = named(name, torch.float64)
    torch.manual_seed(1)
    x = torch.randn(2, 3, REFERENCE[name], REFERENCE[name], dtype=torch.float64)
    ref, target = reference_relevance(model, x)
    scale = ref.abs().max()
    deviation = {}
    for eps in (1e-16, 1e-8):
        e = lrpkit.LRP(model, epsilon_everywhere(eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        deviation[eps] = ((e.relevance - ref).abs().max() / scale).item()
    assert deviation[1e-16] < 1e-9, deviation
    assert deviation[1e-8] > 1e3 * deviation[1e-16], deviation  # the deviation comes from ε and shrinks with it


def test_tiny_configurations_equal_the_reference():
    for config in ("all-blocks", "same-padding", "hard-swish+timm-act", "mobilenetv3", "space-to-depth"):
        model = tiny(dtype=torch.float64, **TINY[config])
        x = torch.randn(2, 3, 29, 31, dtype=torch.float64)
        ref, _ = reference_relevance(model, x)
        e = lrpkit.LRP(model, epsilon_everywhere(1e-16))(x, normalize_output=False)
        assert relative(e.relevance, ref) < 1e-9, config


# -- the user's model, batches ------------------------------------------------------------------------------------

def test_user_model_untouched():
    model = named("mobilenetv3_small_100").train()
    model.blocks[1][0].conv_pw.weight.requires_grad_(False)
    calls = []
    model.conv_stem.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inplace = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    with pytest.warns(UserWarning, match="training mode"):
        e = lrpkit.LRP(model)(torch.randn(2, 3, 48, 48))
    assert calls == [] and torch.isfinite(e.relevance).all()
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")} == inplace


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100"])
def test_batch_equals_single_samples(name, small_models):
    model = small_models.get(name) or named(name)
    x = torch.randn(3, 3, 45, 45, generator=torch.Generator().manual_seed(5))
    assert_batch_independent(lrpkit.LRP(model), x, target=torch.tensor([1, 2, 3]))


# -- unsupported options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, needle", [("tf_efficientnet_cc_b0_4e", "CondConvResidual"),
                                          ("efficientnet_b0_gn", "GroupNormAct"),
                                          ("mixnet_s", "MixedConv2d")])
def test_unsupported_models_are_refused(name, needle):
    model = timm.create_model(name, pretrained=False).eval()
    with pytest.raises(CanonizationError, match=needle):
        lrpkit.canonize(model)


def test_unsupported_options_are_refused():
    with pytest.raises(CanonizationError, match="avgmax"):
        lrpkit.canonize(tiny(global_pool="avgmax"))
    with pytest.raises(CanonizationError, match="anti-aliasing"):
        lrpkit.canonize(tiny(aa_layer="blurpc"))

    class Custom(EfficientNet):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x * 2, pre_logits)

    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(tiny(cls=Custom))

    model = tiny()
    model.bn1.drop = nn.ReLU()  # not an identity in eval mode
    with pytest.raises(CanonizationError, match="drop layer ReLU"):
        lrpkit.canonize(model)


# -- the command line -----------------------------------------------------------------------------------------------

def test_cli_explain_on_a_named_model_with_local_weights(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from lrpkit import catalog, cli

    source = named("mobilenetv3_small_100")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    image = tmp_path / "img.png"
    torch.manual_seed(3)
    Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(image)
    out = tmp_path / "out"
    code = cli.main(["explain", str(image), "--model", "mobilenetv3_small_100", "--weights",
                     str(tmp_path / "w.safetensors"), "--method", "lrp", "--save-relevance", "npy", "--out",
                     str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with Image.open(out / "lrp" / "img.png") as png:
        assert png.size == (224, 224)  # the model's timm data config: resize to 256, center-crop 224
    model, prep = catalog.load_model("mobilenetv3_small_100", tmp_path / "w.safetensors")
    x = prep.normalize(prep.load(image))[None]
    expected = catalog.make_method("lrp", model, prep, 0)(x, None).relevance[0]
    saved = np.load(out / "lrp" / "img.relevance.npy")
    assert saved.shape == (3, 224, 224)
    assert np.allclose(saved, expected.numpy(), rtol=1e-4, atol=1e-6)
