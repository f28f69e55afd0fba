"""The ``timm-convnext`` family: timm's ConvNeXt (V1 and V2) canonized exactly, LRP on it, and LRP-ε with ε → 0
against an independent reference.

The reference is gradient × input of the SAME timm model instance (a deep copy) whose modules are patched:
LayerNorm / LayerNorm2d with σ detached (μ keeps its gradient), GlobalResponseNorm with its normalised response
``N`` detached, every GELU computing ``x · (gelu(x) / x).detach()`` (0 at x = 0). Max pooling keeps autograd's
argmax gradient. Nothing of lrpkit is used to build it. ConvNeXt has no BatchNorm, so there are no running
statistics to randomise; every parameter is perturbed instead (layer scale, GRN weights and biases are
initialised to ~0 by timm, which would hide the residual branches and the GRN).
"""

import copy
import types

import pytest
import timm
import torch
from timm.layers import LayerNorm, LayerNorm2d
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt

import lrpkit
from lrpkit import Composite, GlobalTypeMap, presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import GlobalResponseNormalize, LayerNormalize, Permute, Scale, SkipConnection, Sum
from lrpkit.rules import EpsilonRule, GlobalResponseNormRule, LayerNormRule, PermuteRule
from helpers import (assert_batch_independent, assert_finite, cnn_presets, edge_inputs, epsilon_everywhere, image,
                     relative)
from reference_patches import gradient_times_input, layer_norm_detached, ratio_forward

SMALL = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5)

CONFIGS = {
    "v1-linear-mlp": dict(),
    "v1-conv-mlp": dict(conv_mlp=True),
    "v2-grn-linear": dict(use_grn=True, ls_init_value=None),
    "v2-grn-conv": dict(use_grn=True, ls_init_value=None, conv_mlp=True),
    "overlap-stem+head-mlp": dict(stem_type="overlap_act", head_hidden_size=12),
    "head-norm-first+max-pool": dict(head_norm_first=True, global_pool="max", kernel_sizes=(7, 5, 3, 3)),
    "no-pool+no-bias+eps": dict(global_pool="", conv_bias=False, norm_eps=1e-5),
    "relu+tiered-stem": dict(act_layer="relu", stem_type="overlap_tiered", conv_mlp=True),
}


def perturb(model, seed=0):
    """Every parameter moved by N(0, 0.1²) (norm weights stay near 1): layer scale and GRN become visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        for m in model.modules():
            if getattr(m, "gamma", None) is not None:
                m.gamma.add_(0.5)
    return model


def small_convnext(config="v1-linear-mlp", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = ConvNeXt(**{**SMALL, **CONFIGS[config], **kw}).eval()
    return perturb(model, seed).to(dtype)


# -- canonization: exact forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_exact(config):
    model = small_convnext(config)
    x = image(3)
    chain = lrpkit.canonize(model)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5
    model64 = model.double()
    chain64 = lrpkit.canonize(model64)
    with torch.no_grad():
        assert relative(chain64(x.double()), model64(x.double())) < 1e-10


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_atto_ols", "convnextv2_atto", "test_convnext"])
def test_named_models_forward_is_exact(name):
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, num_classes=7).eval())
    x = image(2, size=64)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_tiny"])
def test_tiny_models_forward_is_exact(name):
    """The block layout of convnext_tiny … base (Linear MLP, channels last); only the depth and width grow."""
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, depths=(1, 1, 2, 1)).eval())
    x = image(1, size=64)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5


def test_chain_layout():
    chain = lrpkit.canonize(small_convnext("v2-grn-linear"))
    block = chain[3]
    assert isinstance(block, SkipConnection)
    kinds = [type(layer).__name__ for layer in block.inner]
    assert kinds == ["Conv2d", "Permute", "LayerNormalize", "Scale", "Linear", "GELU", "GlobalResponseNormalize",
                     "Linear", "Permute"]
    assert block.inner[0].groups == block.inner[0].in_channels  # depthwise
    assert isinstance(chain[1], LayerNormalize) and chain[1].dim == 1  # stem LayerNorm2d
    names = chain.names
    assert names[0] == "stem.0" and names[-1] == "head.fc"
    conv = lrpkit.canonize(small_convnext("v1-conv-mlp"))[3].inner
    assert [type(layer).__name__ for layer in conv] == ["Conv2d", "LayerNormalize", "Scale", "Conv2d", "GELU",
                                                        "Conv2d", "Scale"]
    assert conv[1].dim == 1 and conv[-1].dim == 1  # LayerNorm2d, layer scale over channels


def test_family_is_registered():
    model = small_convnext()
    family = family_of(model)
    assert family.name == "timm-convnext"
    assert family.geometry(model, None).patch_size is None
    assert type(family.composite(lrpkit.canonize(model))).__name__ == "Composite"


def test_block_with_a_downsampling_shortcut_is_a_sum():
    from timm.models.convnext import ConvNeXtBlock

    torch.manual_seed(0)
    block = perturb(ConvNeXtBlock(8, 16, stride=2, ls_init_value=0.5).eval())
    model = small_convnext()
    model.stages[0].blocks[0] = block
    model.stages[1].downsample[0] = LayerNorm2d(16)
    model.stages[1].downsample[1] = torch.nn.Conv2d(16, 16, 2, 2)
    x = image(2, size=64)
    chain = lrpkit.canonize(model)
    assert isinstance(chain[3], Sum)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5


@pytest.mark.parametrize("kw, needle", [
    (dict(norm_layer="rmsnorm2d", conv_mlp=True), "RmsNorm2d"),
    (dict(norm_layer="simplenorm", conv_mlp=True), "SimpleNorm2d"),
    (dict(global_pool="avgmax"), "avgmax"),
    (dict(global_pool="fast"), "fast"),
    (dict(output_stride=16), "Conv2dSame"),
])
def test_unsupported_options_are_clear_errors(kw, needle):
    torch.manual_seed(0)
    model = ConvNeXt(**{**SMALL, **kw}).eval()
    with pytest.raises(CanonizationError, match=needle):
        lrpkit.canonize(model)


def test_subclass_that_overrides_forward_is_refused():
    class Other(ConvNeXt):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x * 2, pre_logits)

    torch.manual_seed(0)
    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(Other(**SMALL).eval())


def test_model_is_untouched():
    model = small_convnext("v2-grn-linear").train()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    calls = []
    model.stem.register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training mode"):
        e = lrpkit.LRP(model, presets.EpsilonPlusFlat())(image(1))
    assert torch.isfinite(e.relevance).all()
    assert model.training and not calls
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(model.stem._forward_hooks) == 1


# -- hand-derived tiny cases ----------------------------------------------------------------------------------------

def test_layer_norm_2d_rule_by_hand():
    """LayerNorm over the channels of a (1, 2, 1, 2) map, σ held constant: R_x = x/σ ⊙ (s − mean_c s)."""
    x = torch.tensor([[[[1.0, 0.0]], [[3.0, 2.0]]]], dtype=torch.float64)  # position 0: (1, 3); position 1: (0, 2)
    layer = LayerNormalize(0.0, dim=1)
    y = layer(x)
    # position 0: μ = 2, σ = 1, y = (-1, 1); position 1: μ = 1, σ = 1, y = (-1, 1)
    assert torch.allclose(y, torch.tensor([[[[-1.0, -1.0]], [[1.0, 1.0]]]], dtype=torch.float64))
    R = torch.tensor([[[[-2.0, 1.0]], [[4.0, 3.0]]]], dtype=torch.float64)
    chain = lrpkit.layers.Chain([layer]).eval()
    lrp = lrpkit.LRP(chain, Composite(GlobalTypeMap({LayerNormalize: LayerNormRule(0.0)})))
    R_in = lrp(x, R=R, normalize_output=False).relevance
    # s = R / y: position 0: (2, 4), mean 3 -> (-1, 1) ⊙ x/σ = (1, 3) -> (-1, 3)
    # position 1: (-1, 3), mean 1 -> (-2, 2) ⊙ x/σ = (0, 2) -> (0, 4)
    assert torch.allclose(R_in, torch.tensor([[[[-1.0, 0.0]], [[3.0, 4.0]]]], dtype=torch.float64))
    assert torch.isclose(R_in.sum(), R.sum())  # conserves (Σ over channels of y = 0: μ/σ terms cancel)


def test_global_response_norm_rule_by_hand():
    """Channels-last GRN on a (1, 1, 2, 2) map: G = (‖(3, 4)‖, ‖(0, 0)‖) = (5, 0), mean 2.5, N = (2, 0);
    y = x ⊙ (1 + γ N) + β with γ = (0.5, 1), β = (1, -1): factor (2, 1)."""
    x = torch.tensor([[[[3.0, 0.0], [4.0, 0.0]]]], dtype=torch.float64)  # (B, H, W, C) = (1, 1, 2, 2)
    layer = GlobalResponseNormalize(torch.tensor([0.5, 1.0]).double(), torch.tensor([1.0, -1.0]).double(), eps=0.0)
    y = layer(x)
    assert torch.allclose(y, torch.tensor([[[[7.0, -1.0], [9.0, -1.0]]]], dtype=torch.float64))
    grn = GlobalResponseNorm(2, eps=0.0).double()
    with torch.no_grad():
        grn.weight.copy_(layer.weight)
        grn.bias.copy_(layer.bias)
    assert torch.allclose(grn(x), y)
    R = torch.tensor([[[[14.0, 5.0], [3.0, 2.0]]]], dtype=torch.float64)
    chain = lrpkit.layers.Chain([layer]).eval()
    e = lrpkit.LRP(chain, Composite(GlobalTypeMap({GlobalResponseNormalize: GlobalResponseNormRule(0.0)})))(
        x, R=R, normalize_output=False)
    # R_x = x ⊙ factor / y ⊙ R: (3·2/7·14, 0, 4·2/9·3, 0) = (12, 0, 8/3, 0)
    assert torch.allclose(e.relevance, torch.tensor([[[[12.0, 0.0], [8.0 / 3.0, 0.0]]]], dtype=torch.float64))
    # the bias takes β/y ⊙ R: 1/7·14 + (-1/-1)·5 + 1/9·3 + (-1/-1)·2 = 2 + 5 + 1/3 + 2
    assert torch.allclose(e.accounting.parts["bias"], torch.tensor([2 + 5 + 1 / 3 + 2], dtype=torch.float64))


def test_permute_rule_moves_relevance_back():
    x = torch.randn(2, 3, 4, 5)
    layer = Permute((0, 2, 3, 1))
    R = torch.randn(2, 4, 5, 3)
    chain = lrpkit.layers.Chain([layer]).eval()
    R_in = lrpkit.LRP(chain, Composite(GlobalTypeMap({Permute: PermuteRule()})))(
        x, R=R, normalize_output=False).relevance
    assert torch.equal(R_in, R.permute(0, 3, 1, 2))


# -- the reference: gradient × input of the patched timm model ------------------------------------------------------

def _grn_detached(self, x):
    g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
    n = (g / (g.mean(dim=self.channel_dim, keepdim=True) + self.eps)).detach()
    return x + self.bias.view(self.wb_shape) + self.weight.view(self.wb_shape) * (x * n)


def patched(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (LayerNorm, LayerNorm2d)):
            m.forward = types.MethodType(layer_norm_detached, m)
        elif isinstance(m, GlobalResponseNorm):
            m.forward = types.MethodType(_grn_detached, m)
        elif isinstance(m, (torch.nn.GELU, torch.nn.ReLU)) or type(m).__name__ in ("GELU", "GELUTanh"):
            m.forward = types.MethodType(ratio_forward, m)
    return ref


def reference_relevance(model, x):
    relevance, target, _ = gradient_times_input(patched(model), model, x)
    return relevance, target


REFERENCE_CONFIGS = ["v1-linear-mlp", "v1-conv-mlp", "v2-grn-linear", "v2-grn-conv", "overlap-stem+head-mlp",
                     "head-norm-first+max-pool", "relu+tiered-stem"]


@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
def test_epsilon_equals_gradient_times_input_of_the_patched_model(config):
    model = small_convnext(config, dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    ref, target = reference_relevance(model, x)
    deviation = {}
    for eps in (1e-16, 1e-8):
        e = lrpkit.LRP(model, epsilon_everywhere(eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        deviation[eps] = ((e.relevance - ref).abs().max() / ref.abs().max()).item()
    assert deviation[1e-16] < 1e-11, deviation
    # the deviation comes from ε and scales with it: ε 1e-8 / 1e-16 = 1e8 (measured 0.99e8 .. 1e8)
    assert 1e6 < deviation[1e-8] / deviation[1e-16] < 1e10, deviation


def test_named_v2_model_equals_the_reference():
    torch.manual_seed(0)
    model = perturb(timm.create_model("convnextv2_atto", pretrained=False, num_classes=4)).eval().double()
    x = image(1, size=64, dtype=torch.float64)
    ref, _ = reference_relevance(model, x)
    e = lrpkit.LRP(model, epsilon_everywhere(1e-16))(x, normalize_output=False)
    assert relative(e.relevance, ref) < 1e-9


# -- presets, batches, edge inputs ----------------------------------------------------------------------------------

PRESETS = cnn_presets(-3.0, 3.0)


CONV_RULE = {"EpsilonPlus": "ZPlusRule", "EpsilonPlusFlat": "ZPlusRule", "EpsilonAlpha2Beta1": "AlphaBetaRule",
             "EpsilonAlpha2Beta1Flat": "AlphaBetaRule", "EpsilonGammaBox": "GeneralizedGammaRule"}


@pytest.mark.parametrize("config", ["v1-linear-mlp", "v2-grn-conv"])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_run_on_depthwise_convolutions(preset, config):
    model = small_convnext(config)
    composite = PRESETS[preset]()
    e = lrpkit.LRP(model, composite)(image(2))
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    slots = composite.assign(lrpkit.canonize(model))
    rules = {}
    for s in slots:
        if isinstance(s.layer, torch.nn.Conv2d) and s.layer.groups > 1:
            rules.setdefault("depthwise", set()).add(type(s.rule).__name__)
        elif isinstance(s.layer, torch.nn.Conv2d) and s.layer.kernel_size == (1, 1):
            rules.setdefault("mlp-conv", set()).add(type(s.rule).__name__)
        elif isinstance(s.layer, torch.nn.Linear) and s.name != "head.fc":
            rules.setdefault("mlp-linear", set()).add(type(s.rule).__name__)
    # the depthwise 7x7 convolutions get the preset's Conv rule; the MLP its Linear rule (LRP-ε) as nn.Linear,
    # its Conv rule as 1x1 convolutions (conv_mlp=True)
    assert rules["depthwise"] == {CONV_RULE[preset]}
    if config == "v1-linear-mlp":
        assert rules["mlp-linear"] == {"EpsilonRule"} and "mlp-conv" not in rules
    else:
        assert rules["mlp-conv"] == {CONV_RULE[preset]} and "mlp-linear" not in rules
    first = slots[0]
    if preset.endswith("Flat"):
        assert type(first.rule).__name__ == "FlatRule"
    elif preset == "EpsilonGammaBox":
        assert type(first.rule).__name__ == "ZBoxRule"


@pytest.mark.parametrize("preset", ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat",
                                    "EpsilonGammaBox", "CPLRP", "AttnLRP"])
def test_presets_give_the_norms_their_epsilon(preset):
    """GRN, LayerNorm and the affine Scales of a ConvNeXt V2 get the preset's ε, not a registered default's."""
    make = getattr(presets, preset)
    composite = make(-3.0, 3.0, epsilon=0.01) if preset == "EpsilonGammaBox" else make(epsilon=0.01)
    slots = composite.assign(lrpkit.canonize(small_convnext("v2-grn-linear")))
    norms = {kind: [s.rule for s in slots if isinstance(s.layer, kind)]
             for kind in (GlobalResponseNormalize, LayerNormalize, Scale)}
    assert all(norms.values())
    assert all(isinstance(r, GlobalResponseNormRule) and r.epsilon == 0.01 for r in norms[GlobalResponseNormalize])
    assert all(isinstance(r, LayerNormRule) and r.epsilon == 0.01 for r in norms[LayerNormalize])
    assert all(isinstance(r, EpsilonRule) and r.epsilon == 0.01 for r in norms[Scale])


def test_batch_independence():
    assert_batch_independent(lrpkit.LRP(small_convnext("v2-grn-linear"), presets.EpsilonPlusFlat()), image(3))


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"])
def test_finite_for_edge_inputs(preset):
    assert_finite(lrpkit.LRP(small_convnext("v2-grn-conv"), PRESETS[preset]())(edge_inputs(image(1))))


# -- the command line -----------------------------------------------------------------------------------------------

def test_cli_explains_a_named_convnext_with_local_weights(tmp_path, capsys):
    """``lrpkit explain --model test_convnext --weights w.safetensors``: timm's name, its data config (160 px),
    the 6-class head from the file, and the saved relevance equal to the Python API's."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from lrpkit import catalog, cli

    torch.manual_seed(5)
    source = perturb(timm.create_model("test_convnext", pretrained=False, num_classes=6).eval())
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    pixels = (torch.rand(3, 180, 200) * 255).round().to(torch.uint8)
    picture = tmp_path / "img.png"
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(picture)
    out = tmp_path / "out"
    code = cli.main(["explain", str(picture), "--model", "test_convnext", "--weights", str(weights), "--method",
                     "lrp", "--save-relevance", "npy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" not in captured.err
    with Image.open(out / "lrp" / "img.png") as png:
        assert png.size == (160, 160)  # timm's data config of test_convnext
    model, prep = catalog.load_model("test_convnext", weights)
    x = prep.normalize(prep.load(picture))[None]
    assert relative(model(x).detach(), source(x).detach()) < 1e-6  # the weights came from the file
    expected = catalog.make_method("lrp", model, prep, 0)(x, None)
    saved = np.load(out / "lrp" / "img.relevance.npy")
    scale = float(expected.relevance.abs().max())
    assert np.allclose(saved, expected.relevance[0].numpy(), rtol=1e-4, atol=1e-6 * scale)
