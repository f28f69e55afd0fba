"""The ``timm-swin`` family: timm's SwinTransformer canonized exactly, LRP on it (CP-LRP and AttnLRP through the
shifted windows), and LRP with ε → 0 against an independent reference.

The reference is gradient × input of the SAME timm model (a deep copy) whose module instances are patched, nothing
of lrpkit used: every LayerNorm with σ detached (μ keeps its gradient), every GELU computing
``x · (gelu(x) / x).detach()`` (0 at x = 0), and each ``WindowAttention`` recomputing timm's window attention from
its own parameters with the attention probabilities detached (CP) or with half the gradient through both factors
of ``q kᵀ`` and of ``A v`` (AttnLRP; the softmax keeps its true gradient, whose ``S ⊙ ∂/∂S`` is AttnLRP's Taylor rule
for it). timm's own code does the rest: the cyclic shift, the padding, the window partition and reverse, the shift
mask, patch merging and the pooling, so the reference checks lrpkit's permutations as well as its rules. The score
bias (relative position bias + shift mask) is made a leaf of the reference's graph, so that its share
``Σ B ⊙ ∂f/∂B`` can be compared with the ``attention_bias`` of lrpkit's accounting.
"""

import copy
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention

import lrpkit
from lrpkit import Composite, GlobalTypeMap, methods, presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import (Chain, LayerNormalize, Permute, Scale, SelfAttention, SkipConnection, SpaceToDepth,
                           TokenMean, WindowSelfAttention)
from lrpkit.rules import (EpsilonRule, LayerNormRule, PermuteRule, SelfAttentionRule, SkipConnectionRule,
                          SpaceToDepthRule, TokenMeanRule)
from helpers import image, relative
from reference_patches import gradient_times_input, half_grad, layer_norm_detached, ratio_forward

SMALL = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
             num_classes=5)

CONFIGS = {
    # grids 16, 8 in windows of 4: both stages shift (the second block of each)
    "shifted": dict(),
    # grids 10, 5, 3 in windows of 3: timm pads 10 -> 12 and 5 -> 6, patch merging pads 5 -> 6; the last stage's
    # window is its whole 3x3 map (no shift)
    "padded+odd": dict(img_size=40, patch_size=4, depths=(2, 2, 1), num_heads=(2, 2, 4), window_size=3),
    # per-stage windows (4, 3, 7); always_partition keeps the 7-window and its shift on a 4x4 map (padded to 7x7)
    "per-stage-windows+always-partition": dict(img_size=56, patch_size=4, depths=(2, 2, 2), num_heads=(2, 2, 2),
                                               window_size=(4, 3, 7), always_partition=True),
    # a window larger than the map: timm shrinks it to the map (8x8 -> window 8, then 4x4) and drops the shift
    "window-larger-than-map": dict(img_size=32, patch_size=4, window_size=((8, 8), (6, 6)), num_heads=(1, 2)),
    # head_dim != dim / heads, no qkv bias, mlp_ratio 2, rectangular windows and image, timm's LayerNorm class
    "head-dim+no-qkv-bias+rect": dict(img_size=(32, 48), head_dim=6, qkv_bias=False, mlp_ratio=2.0,
                                      window_size=(4, 2), norm_layer=timm.layers.LayerNorm),
    # no pooling: the head runs on every position (B, H, W, classes)
    "no-pool": dict(global_pool=""),
}


def perturb(model, seed=0, zero_bias=False):
    """Every parameter moved by N(0, 0.1²) (LayerNorm weights stay near 1); the relative position bias tables by
    N(0, 1) so that the bias matters (timm initialises them at std 0.02). ``zero_bias``: every bias zero (the tables
    are not biases of a layer and keep their values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_bias and name.endswith(".bias"):
                p.zero_()
            elif name.endswith("relative_position_bias_table"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def small_swin(config="shifted", dtype=torch.float32, seed=0, zero_bias=False, **kw):
    torch.manual_seed(seed)
    args = {**SMALL, **CONFIGS[config], **kw}
    if zero_bias:
        args["qkv_bias"] = False
    model = SwinTransformer(**args).eval()
    return perturb(model, seed, zero_bias).to(dtype)


def image_for(config, batch=2, dtype=torch.float32):
    size = {**SMALL, **CONFIGS[config]}["img_size"]
    return image(batch, size, dtype)


# -- canonization: exact forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_exact(config):
    model = small_swin(config)
    x = image_for(config, 3)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5
    model64 = model.double()
    with torch.no_grad():
        assert relative(lrpkit.canonize(model64)(x.double()), model64(x.double())) < 1e-10


def test_the_configurations_cover_what_they_claim():
    def blocks(config):
        return [b for stage in small_swin(config).layers for b in stage.blocks]

    assert [b.shift_size for b in blocks("shifted")] == [(0, 0), (2, 2)] * 2
    padded = blocks("padded+odd")
    assert [b.input_resolution for b in padded] == [(10, 10)] * 2 + [(5, 5)] * 2 + [(3, 3)]
    assert padded[-1].window_size == (3, 3) and padded[-1].shift_size == (0, 0)
    always = blocks("per-stage-windows+always-partition")
    assert always[-1].input_resolution == (4, 4) and always[-1].window_size == (7, 7)
    assert always[-1].shift_size == (3, 3)
    larger = blocks("window-larger-than-map")
    assert [b.window_size for b in larger] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert all(b.shift_size == (0, 0) for b in larger)


@pytest.mark.parametrize("name, depths", [
    ("swin_tiny_patch4_window7_224", None),
    # small and base are tiny's blocks at other widths and depths: fewer blocks, the same layers
    ("swin_small_patch4_window7_224", (2, 2, 2, 2)),
    ("swin_base_patch4_window7_224", (2, 2, 2, 2)),
    ("swin_base_patch4_window12_384", (2, 2, 2, 2)),
])
def test_named_models_forward_is_exact(name, depths):
    torch.manual_seed(0)
    kw = {} if depths is None else {"depths": depths}
    model = perturb(timm.create_model(name, pretrained=False, **kw).eval())
    size = model.pretrained_cfg["input_size"][-1]
    x = image(1, size)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5


def test_chain_layout():
    model = small_swin("padded+odd")
    chain = lrpkit.canonize(model)
    kinds = [type(layer).__name__ for layer in chain]
    assert kinds[:4] == ["Conv2d", "Permute", "LayerNormalize", "Scale"]
    assert kinds[4:8] == ["SkipConnection"] * 4  # stage 0: two blocks, attention and MLP each
    assert kinds[8:12] == ["SpaceToDepth", "LayerNormalize", "Scale", "Linear"]  # stage 1's patch merging
    assert kinds[-5:] == ["LayerNormalize", "Scale", "Flatten", "TokenMean", "Linear"]
    assert chain.names[8:12] == ["layers.1.downsample", "layers.1.downsample.norm", "layers.1.downsample.norm",
                                 "layers.1.downsample.reduction"]
    attn = [m for m in chain.modules() if isinstance(m, WindowSelfAttention)]
    assert [(a.window, a.shift, a.grid) for a in attn] == [
        ((3, 3), (0, 0), (10, 10)), ((3, 3), (1, 1), (10, 10)), ((3, 3), (0, 0), (5, 5)), ((3, 3), (1, 1), (5, 5)),
        ((3, 3), (0, 0), (3, 3))]
    assert [a.mask is not None for a in attn] == [False, True, False, True, False]
    inner = [type(layer).__name__ for layer in chain[4].inner]
    assert inner == ["LayerNormalize", "Scale", "WindowSelfAttention"]
    assert [type(layer).__name__ for layer in chain[5].inner] == ["LayerNormalize", "Scale", "Linear", "GELU",
                                                                  "Linear"]


def test_family_is_registered():
    model = small_swin()
    family = family_of(model)
    assert family.name == "timm-swin"
    geometry = family.geometry(model, None)
    assert geometry.patch_size == (2, 2) and geometry.num_prefix == 0
    assert not geometry.global_attention
    assert family.composite(lrpkit.canonize(model)).primitives[0].mapping  # CP-LRP's type map
    assert "rollout" not in family.methods and "lrp" in family.methods


@pytest.mark.parametrize("kw, needle", [
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(strict_img_size=False), "dynamic_img_size"),
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(global_pool="avgmax"), "global_pool='avgmax'"),
    (dict(norm_layer=timm.layers.RmsNorm), "RmsNorm"),
])
def test_unsupported_options_are_clear_errors(kw, needle):
    torch.manual_seed(0)
    model = SwinTransformer(**{**SMALL, **kw}).eval()
    with pytest.raises(CanonizationError, match=needle):
        lrpkit.canonize(model)


def test_subclasses_that_override_forward_are_refused():
    class Other(SwinTransformer):
        def forward_features(self, x):
            return super().forward_features(x) * 2

    torch.manual_seed(0)
    with pytest.raises(CanonizationError, match="overrides forward_features"):
        lrpkit.canonize(Other(**SMALL).eval())
    model = small_swin()

    class Block(SwinTransformerBlock):
        def _attn(self, x):
            return 2 * super()._attn(x)

    model.layers[0].blocks[0].__class__ = Block
    with pytest.raises(CanonizationError, match=r"overrides _attn\(\) \(layers.0.blocks.0\)"):
        lrpkit.canonize(model)


def test_input_of_another_size_is_a_clear_error():
    chain = lrpkit.canonize(small_swin())
    with pytest.raises(ValueError, match="gets a 20x20 feature map but the model was built for 16x16"):
        chain(image(1, 40))


def test_model_is_untouched():
    model = small_swin().train()
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for preset in (presets.CPLRP(), presets.AttnLRP()):
        with pytest.warns(UserWarning, match="training mode"):
            e = lrpkit.LRP(model, preset)(image(1))
        assert torch.isfinite(e.relevance).all()
    assert model.training and not calls
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(model.patch_embed._forward_hooks) == 1


# -- hand-derived tiny cases ----------------------------------------------------------------------------------------

def _attention_of_the_mask(shift: bool):
    """A one-channel, one-head WindowSelfAttention on a 4x4 map in 2x2 windows whose scores are only the score bias
    (q = k = 0), values the input (v = x), the output projection the identity."""
    qkv = torch.nn.Linear(1, 3).double()
    proj = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        qkv.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
        qkv.bias.zero_()
        proj.weight.fill_(1.0)
        proj.bias.zero_()
    # timm's shift mask for a 4x4 map, window 2, shift 1, derived by hand. The shifted map's rows fall into the
    # regions [0, 2), [2, 3), [3, 4) (timm's slices (0, -2), (-2, -1), (-1, None)), its columns likewise; a position's
    # label is 3·(row region) + (column region):
    #     0 0 1 2
    #     0 0 1 2
    #     3 3 4 5
    #     6 6 7 8
    # Windows in row-major order, tokens in row-major order within a window:
    #   w0 (rows 0-1, cols 0-1): labels 0 0 0 0 -> no mask
    #   w1 (rows 0-1, cols 2-3): labels 1 2 1 2 -> tokens {0, 2} and {1, 3} attend to each other
    #   w2 (rows 2-3, cols 0-1): labels 3 3 6 6 -> tokens {0, 1} and {2, 3}
    #   w3 (rows 2-3, cols 2-3): labels 4 5 7 8 -> each token only to itself
    labels = torch.tensor([[0, 0, 0, 0], [1, 2, 1, 2], [3, 3, 6, 6], [4, 5, 7, 8]], dtype=torch.float64)
    mask = torch.where(labels[:, :, None] == labels[:, None, :], 0.0, -100.0).double()
    block = SwinTransformerBlock(1, (4, 4), num_heads=1, window_size=2, shift_size=1).double()
    assert torch.equal(block.attn_mask, mask)  # timm's own mask is the one derived above
    layer = WindowSelfAttention(qkv, proj, 1, 1.0, window=(2, 2), grid=(4, 4), shift=(1, 1) if shift else (0, 0),
                                relative_bias=torch.zeros(1, 4, 4, dtype=torch.float64),
                                mask=mask if shift else None)
    return layer.eval()


def test_window_partition_with_shift_by_hand():
    layer = _attention_of_the_mask(shift=True)
    x = (torch.arange(16, dtype=torch.float64) + 1).view(1, 4, 4, 1)  # x[i, j] = 4i + j + 1
    # the cyclic shift by (-1, -1): shifted[i, j] = x[(i + 1) % 4, (j + 1) % 4]
    #      6  7  8  5
    #     10 11 12  9
    #     14 15 16 13
    #      2  3  4  1
    # and its 2x2 windows in row-major order, their tokens in row-major order:
    windows = torch.tensor([[6, 7, 10, 11], [8, 5, 12, 9], [14, 15, 2, 3], [16, 13, 4, 1]], dtype=torch.float64)
    assert torch.equal(layer.group(x)[..., 0], windows)
    assert torch.equal(layer.ungroup(layer.group(x), 1), x)
    # the attention (A from the mask alone, y = A v, v = x): w0 averages its 4 tokens, w1 pairs {0, 2}, {1, 3}, w2
    # pairs {0, 1}, {2, 3}, w3 leaves each token alone. Back at the original positions:
    #   x[1, 1] = 6 is w0's token 0: y = (6 + 7 + 10 + 11) / 4 = 8.5
    #   x[1, 3] = 8 is w1's token 0, paired with token 2 = x[2, 3] = 12: y = 10
    #   x[0, 0] = 1 is w3's token 3, alone: y = 1
    with torch.no_grad():
        y = layer(x)[0, :, :, 0]
    assert y[1, 1] == pytest.approx(8.5) and y[1, 3] == pytest.approx(10.0) and y[0, 0] == pytest.approx(1.0)
    # CP-LRP, all relevance on output (1, 1): R = y there, s = R / y = 1, R_x[j] = x[j] · A[i, j] over w0's tokens:
    # x[1, 1], x[1, 2], x[2, 1], x[2, 2] = 6, 7, 10, 11 times 1/4 -> 1.5, 1.75, 2.5, 2.75 (sum 8.5 = R)
    lrp = lrpkit.LRP(Chain([layer]).eval(), Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule(
        EpsilonRule(0.0), EpsilonRule(0.0), epsilon=0.0)})))
    R = torch.zeros(1, 4, 4, 1, dtype=torch.float64)
    R[0, 1, 1, 0] = 8.5
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1, 1], expected[1, 2], expected[2, 1], expected[2, 2] = 1.5, 1.75, 2.5, 2.75
    assert torch.allclose(lrp(x, R=R, normalize_output=False).relevance[0, :, :, 0], expected)
    # all relevance on output (1, 3): R = 10 back to x[1, 3] = 8 and x[2, 3] = 12 with A = 1/2: 4 and 6
    R = torch.zeros(1, 4, 4, 1, dtype=torch.float64)
    R[0, 1, 3, 0] = 10.0
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1, 3], expected[2, 3] = 4.0, 6.0
    assert torch.allclose(lrp(x, R=R, normalize_output=False).relevance[0, :, :, 0], expected)
    # all relevance on output (0, 0): w3's token 3 attends to itself only: R stays at x[0, 0]
    R = torch.zeros(1, 4, 4, 1, dtype=torch.float64)
    R[0, 0, 0, 0] = 1.0
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 0] = 1.0
    assert torch.allclose(lrp(x, R=R, normalize_output=False).relevance[0, :, :, 0], expected)


def test_window_partition_without_shift_by_hand():
    layer = _attention_of_the_mask(shift=False)
    x = (torch.arange(16, dtype=torch.float64) + 1).view(1, 4, 4, 1)
    # no shift, no mask: windows of the map as it is, each averaged (q = k = 0, no bias)
    windows = torch.tensor([[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16]], dtype=torch.float64)
    assert torch.equal(layer.group(x)[..., 0], windows)
    with torch.no_grad():
        y = layer(x)[0, :, :, 0]
    assert y[0, 0] == pytest.approx(3.5) and y[3, 3] == pytest.approx(13.5)


def test_padding_and_shift_are_timms():
    """A 5x5 map in 3x3 windows (padded to 6x6) with shift 1: group and ungroup are timm's partition and reverse."""
    from timm.models.swin_transformer import window_partition, window_reverse

    layer = WindowSelfAttention(torch.nn.Linear(2, 6), torch.nn.Linear(2, 2), 1, 1.0, (3, 3), (5, 5), (1, 1),
                                torch.zeros(1, 9, 9), torch.zeros(4, 9, 9))
    x = torch.randn(2, 5, 5, 2)
    shifted = F.pad(torch.roll(x, (-1, -1), (1, 2)), (0, 0, 0, 1, 0, 1))
    expected = window_partition(shifted, (3, 3)).view(-1, 9, 2)
    assert torch.equal(layer.group(x), expected)
    back = torch.roll(window_reverse(expected.view(-1, 3, 3, 2), (3, 3), 6, 6)[:, :5, :5], (1, 1), (1, 2))
    assert torch.equal(layer.ungroup(expected, 2), back) and torch.equal(back, x)


def test_space_to_depth_by_hand():
    # positions (row, col) of a 2x2 map with 2 channels: (0,0) = [1, 2], (0,1) = [3, 4], (1,0) = [5, 6],
    # (1,1) = [7, 8]; timm's order of the block (row offset, column offset): (0,0), (1,0), (0,1), (1,1)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    assert torch.equal(SpaceToDepth()(x), torch.tensor([[[[1.0, 2.0, 5.0, 6.0, 3.0, 4.0, 7.0, 8.0]]]]))
    # the same as timm's PatchMerging with its norm and reduction the identity
    from timm.models.swin_transformer import PatchMerging

    merge = PatchMerging(2, 8, norm_layer=torch.nn.Identity)
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(8))
    x = torch.randn(2, 6, 4, 2)
    assert torch.equal(SpaceToDepth()(x), merge(x))
    x = torch.randn(2, 5, 3, 2)  # odd: timm pads a row and a column of zeros
    assert torch.equal(SpaceToDepth()(x), merge(x))


def test_space_to_depth_rule_by_hand():
    # a 3x1 map with one channel, padded to 4x2: output (0, 0) holds [x0, x1, 0, 0], output (1, 0) [x2, 0, 0, 0]
    x = torch.tensor([[[[1.0]], [[2.0]], [[3.0]]]], dtype=torch.float64)
    assert torch.equal(SpaceToDepth()(x), torch.tensor([[[[1.0, 2.0, 0.0, 0.0]], [[3.0, 0.0, 0.0, 0.0]]]],
                                                        dtype=torch.float64))
    R = torch.tensor([[[[10.0, 20.0, 30.0, 40.0]], [[50.0, 60.0, 70.0, 80.0]]]], dtype=torch.float64)
    e = lrpkit.LRP(Chain([SpaceToDepth()]).eval(), Composite(GlobalTypeMap({SpaceToDepth: SpaceToDepthRule()})))(
        x, R=R, normalize_output=False)
    # each input gets the relevance of its own slot: x0 <- 10, x1 <- 20, x2 <- 50; the padding's slots are dropped
    # and reported: 30 + 40 + 60 + 70 + 80 = 280
    assert torch.equal(e.relevance, torch.tensor([[[[10.0]], [[20.0]], [[50.0]]]], dtype=torch.float64))
    assert e.accounting.parts["padding"].item() == pytest.approx(280.0)


# -- presets --------------------------------------------------------------------------------------------------------

PRESETS = {
    "CPLRP": presets.CPLRP,
    "AttnLRP": presets.AttnLRP,
    "CPLRP-gamma": lambda epsilon=1e-6: presets.CPLRP(epsilon=epsilon, gamma=0.25),
    "EpsilonPlus": presets.EpsilonPlus,
    "EpsilonPlusFlat": presets.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": presets.EpsilonAlpha2Beta1,
    "EpsilonGammaBox": lambda epsilon=1e-6: presets.EpsilonGammaBox(-3.0, 3.0, epsilon=epsilon),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_and_maps_the_swin_layers(preset):
    model = small_swin("padded+odd")
    x = image_for("padded+odd", 2)
    lrp = lrpkit.LRP(model, PRESETS[preset](epsilon=1e-3))
    e = lrp(x)
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(e.output, model(x), rtol=1e-5, atol=1e-6)
    acc = e.accounting
    scale = max([1.0] + [v.abs().max().item() for v in [acc.input, *acc.parts.values()]])
    assert torch.allclose(acc.total(), acc.output, atol=1e-6 * scale + 1e-5)
    expected = {WindowSelfAttention: SelfAttentionRule, SpaceToDepth: SpaceToDepthRule, TokenMean: TokenMeanRule,
                LayerNormalize: LayerNormRule, Permute: PermuteRule, SkipConnection: SkipConnectionRule,
                Scale: EpsilonRule}
    seen = set()
    for slot in lrp.composite.assign(lrp.chain):
        rule_type = expected.get(type(slot.layer))
        if rule_type is None:
            continue
        seen.add(type(slot.layer))
        assert type(slot.rule) is rule_type, (slot.name, slot.rule)
        if "epsilon" in vars(slot.rule):  # every stabiliser the preset assigns is its ε, the token mean's too
            assert slot.rule.epsilon == 1e-3, (slot.name, slot.rule)
        if isinstance(slot.layer, WindowSelfAttention):
            assert slot.rule.mode == ("attnlrp" if preset == "AttnLRP" else "cp")
            assert slot.rule.value_rule.epsilon == slot.rule.out_rule.epsilon == 1e-3
    assert seen == set(expected)


def test_batch_independence():
    # in float64 a sample's explanation in a batch is its explanation alone to 1e-10 (windows of different samples
    # never mix, and the per-window sinks are regrouped per sample)
    model = small_swin("padded+odd", dtype=torch.float64)
    x = image_for("padded+odd", 3, torch.float64)
    for preset in (presets.CPLRP(), presets.AttnLRP()):
        lrp = lrpkit.LRP(model, preset)
        batch = lrp(x, target=[0, 3, 1])
        for i, t in enumerate([0, 3, 1]):
            single = lrp(x[i:i + 1], target=t)
            assert relative(batch.relevance[i:i + 1], single.relevance) < 1e-10
            # the per-window sinks (bias, attention_bias) regrouped per sample
            scale = max(v.abs().max().item() for v in [single.accounting.output, *single.accounting.parts.values()])
            for key, value in single.accounting.parts.items():
                assert torch.allclose(batch.accounting.parts[key][i], value[0], rtol=0, atol=1e-10 * scale), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP", "EpsilonPlusFlat"])
def test_finite_for_edge_inputs(preset, dtype):
    model = small_swin("shifted").to(dtype)
    x = image(1)
    batch = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x]).to(dtype)
    e = lrpkit.LRP(model, PRESETS[preset]())(batch)
    assert e.relevance.dtype == dtype and torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())


def test_bfloat16_stays_close_to_float32():
    """bfloat16 end to end: the canonized model computes timm's bfloat16 output (the score bias and the shift mask
    cast with the model), the accounting closes at bfloat16's precision, and the patch maps are those of float32
    (cosine similarity 0.994-0.9996 over three seeds and two configurations, both modes)."""
    model = small_swin("shifted")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    x = image(2)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model16)(x.to(torch.bfloat16)).float(), model16(x.bfloat16()).float()) < 2e-2
    for preset in (presets.CPLRP, presets.AttnLRP):
        e32 = lrpkit.LRP(model, preset())(x)
        e16 = lrpkit.LRP(model16, preset())(x.to(torch.bfloat16))
        assert e16.relevance.dtype == torch.bfloat16 and torch.equal(e32.target, e16.target)
        for i in range(2):
            cos = F.cosine_similarity(e32.patch_relevance[i].flatten(), e16.patch_relevance[i].float().flatten(), dim=0)
            assert cos > 0.98, (preset.__name__, i, cos)
        acc = e16.accounting
        scale = max(v.abs().max().item() for v in [acc.input, *acc.parts.values()])
        assert torch.allclose(acc.total().float(), acc.output.float(), atol=2e-2 * scale)


# -- the reference: gradient × input of the patched timm model ------------------------------------------------------

def _window_attention(mode, leaves):
    """timm's WindowAttention.forward from the instance's parameters, CP (A detached) or AttnLRP (half gradients
    through q, k, A and v); the score bias (relative position bias + shift mask, per window) a leaf in ``leaves``."""
    def forward(self, x, mask=None):
        b_, n, _ = x.shape
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b_, n, 3, self.num_heads, -1) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._get_rel_pos_bias().expand(b_, -1, -1, -1)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias.reshape(-1, windows, self.num_heads, n, n) + mask[None, :, None]).reshape(b_, -1, n, n)
        bias = bias.detach().clone().requires_grad_(True)
        leaves.append(bias)
        if mode == "cp":
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1) + bias, -1).detach()
            y = attn @ v
        else:
            attn = torch.softmax(half_grad(q * self.scale) @ half_grad(k).transpose(-2, -1) + bias, -1)
            y = half_grad(attn) @ half_grad(v)
        return F.linear(y.transpose(1, 2).reshape(b_, n, -1), self.proj.weight, self.proj.bias)
    return forward


def patched(model, mode, leaves):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(layer_norm_detached, m)
        elif isinstance(m, torch.nn.GELU):
            m.forward = types.MethodType(ratio_forward, m)
        elif isinstance(m, WindowAttention):
            m.forward = types.MethodType(_window_attention(mode, leaves), m)
    return ref


def reference(model, x, mode):
    """(gradient × input, target, Σ B ⊙ ∂f/∂B per sample over every window attention's score bias B)."""
    leaves = []
    relevance, target, grads = gradient_times_input(patched(model, mode, leaves), model, x, leaves)
    bias_share = sum(((leaf * g).reshape(x.shape[0], -1).sum(1) for leaf, g in zip(leaves, grads)
                      if g is not None), torch.zeros(x.shape[0], dtype=x.dtype))
    return relevance, target, bias_share


REFERENCE_CONFIGS = ["shifted", "padded+odd", "per-stage-windows+always-partition", "head-dim+no-qkv-bias+rect"]


@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
def test_cplrp_equals_gradient_times_input_of_the_detached_model(config):
    model = small_swin(config, dtype=torch.float64)
    x = image_for(config, 2, torch.float64)
    ref, target, _ = reference(model, x, "cp")
    deviation = {}
    for eps in (1e-16, 1e-8):
        e = lrpkit.LRP(model, presets.CPLRP(epsilon=eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        deviation[eps] = relative(e.relevance, ref)
        assert "attention_bias" not in e.accounting.parts  # CP: the score bias carries no relevance
    assert deviation[1e-16] < 1e-11, deviation
    # the deviation comes from ε and scales with it: ε 1e-8 / 1e-16 = 1e8
    assert 1e6 < deviation[1e-8] / deviation[1e-16] < 1e10, deviation


@pytest.mark.parametrize("config", ["shifted", "padded+odd"])
def test_attnlrp_equals_gradient_times_input_of_the_half_gradient_model(config):
    model = small_swin(config, dtype=torch.float64)
    x = image_for(config, 2, torch.float64)
    ref, target, bias_share = reference(model, x, "attnlrp")
    e = lrpkit.LRP(model, presets.AttnLRP(epsilon=1e-16))(x, normalize_output=False)
    assert torch.equal(e.target, target)
    assert relative(e.relevance, ref) < 1e-9
    # the relative position bias and shift mask take Σ B ⊙ ∂f/∂B, the reference's share of the score bias
    parts = e.accounting.parts
    assert torch.allclose(parts["attention_bias"], bias_share, rtol=1e-8, atol=1e-12 * e.accounting.output.abs().max())
    assert (bias_share.abs() > 1e-6 * e.accounting.output.abs()).all()  # a real share, not vacuous


@pytest.mark.parametrize("config", ["shifted", "padded+odd", "per-stage-windows+always-partition"])
def test_accounting_of_a_bias_free_swin(config):
    # Every bias zero (patch projection, qkv, proj, MLP, LayerNorm shifts, head; the relative position bias tables
    # are kept) and ε = 1e-16 in float64. CP-LRP: nothing is lost to biases, stabilisers or padding, and the score
    # bias takes nothing: the input gets the output's relevance. AttnLRP: the output relevance ends in the input,
    # the score biases (relative position bias and shift mask, `attention_bias`) and the softmax's non-conservation
    # (`attention`), and nowhere else.
    model = small_swin(config, dtype=torch.float64, zero_bias=True)
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    x = image_for(config, 2, torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    cp = lrpkit.LRP(model, presets.CPLRP(epsilon=1e-16))(x, normalize_output=False).accounting
    out = cp.output
    assert torch.allclose(cp.input, out, rtol=1e-5, atol=1e-12)
    for sink, value in cp.parts.items():
        assert sink in ("bias", "stabilizer", "padding") and torch.allclose(value, zero, atol=1e-7 * out.abs().max())
    attn = lrpkit.LRP(model, presets.AttnLRP(epsilon=1e-16))(x, normalize_output=False).accounting
    _, _, bias_share = reference(model, x, "attnlrp")
    assert set(attn.parts) <= {"bias", "stabilizer", "padding", "attention_bias", "attention"}
    for sink in ("bias", "stabilizer", "padding"):
        assert torch.allclose(attn.parts.get(sink, zero), zero, atol=1e-7 * out.abs().max())
    assert torch.allclose(attn.parts["attention_bias"], bias_share, rtol=1e-5, atol=1e-12)
    explained = attn.input + attn.parts["attention_bias"] + attn.parts["attention"]
    assert torch.allclose(explained, out, rtol=1e-5, atol=1e-12)
    assert (attn.parts["attention_bias"].abs() > 1e-6 * out.abs()).all()


# -- methods --------------------------------------------------------------------------------------------------------

ATTENTION_METHODS = [methods.AttentionRollout, methods.GradientRollout, methods.RawAttention,
                     methods.AttentionGradCAM, methods.GenericAttention, methods.TransformerAttribution,
                     methods.PartialLRP]


@pytest.mark.parametrize("method", ATTENTION_METHODS, ids=lambda m: m.__name__)
def test_attention_methods_say_why_they_do_not_apply(method):
    with pytest.raises(methods.NotApplicableError, match="no token-to-token path across windows"):
        method(small_swin())


def test_gradient_methods_run_on_swin():
    model = small_swin()
    x = image(2)
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (grad,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xr)
    assert torch.allclose(methods.Gradient(model)(x).relevance, grad, rtol=1e-4, atol=1e-6 * grad.abs().max())
    assert torch.allclose(methods.InputXGradient(model)(x).relevance, x * grad, rtol=1e-4,
                          atol=1e-6 * (x * grad).abs().max())
    for explainer in (methods.SmoothGrad(model, n=2, seed=0), methods.IntegratedGradients(model, steps=2)):
        e = explainer(x)
        assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()


def test_vitcx_reads_swins_channels_last_feature_maps():
    model = small_swin()
    vitcx = methods.ViTCX(model, seed=0, progress=False)
    x = image(2)
    # the default feature layer: the input of the last block's attention, timm's layers[-1].blocks[-1].norm1
    seen = []
    hook = model.layers[-1].blocks[-1].norm1.register_forward_hook(lambda m, a, y: seen.append(y))
    with torch.no_grad():
        model(x)
    hook.remove()
    logits, grid = vitcx.features(x)
    assert grid.shape == (2, 32, 8, 8)  # (B, D, h, w): the last stage's 8x8 map of 32 channels
    assert torch.allclose(grid, seen[0].permute(0, 3, 1, 2), atol=1e-6)
    e = vitcx(x)
    assert e.relevance.shape == (2, 1, 32, 32) and torch.isfinite(e.relevance).all()
    assert all(k > 0 for k in e.extras["num_masks"]) and e.relevance.abs().sum() > 0
    # the patch projection (a convolution, before the Permute) gives channels-first maps (B, D, h, w): read as
    # they are, not permuted as the stages' channels-last maps are
    embed = methods.ViTCX(model, layer="patch_embed.proj", seed=0, progress=False)
    seen = []
    hook = model.patch_embed.proj.register_forward_hook(lambda m, a, y: seen.append(y))
    with torch.no_grad():
        model(x)
    hook.remove()
    _, grid = embed.features(x)
    assert seen[0].ndim == 4 and torch.allclose(grid, seen[0], atol=1e-6)


# -- weights and the command line -----------------------------------------------------------------------------------

NAMED = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def named_weights(tmp_path_factory):
    """swin_tiny's state dict with perturbed random weights and a 7-class head, in a local safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = perturb(timm.create_model(NAMED, pretrained=False, num_classes=7).eval())
    path = tmp_path_factory.mktemp("swin") / "swin_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    return source, path


def test_named_model_loads_local_safetensors_weights(named_weights):
    from lrpkit.app import zoo

    source, path = named_weights
    model, prep = zoo.load_model(NAMED, weights=path)
    assert prep.size == (224, 224) and prep.interpolation == "bicubic"  # timm's data config for swin_tiny
    x = image(1, 224)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        assert relative(lrpkit.canonize(model)(x), source(x)) < 1e-5
    assert family_of(model).name == "timm-swin"


def test_cli_explains_the_named_swin_with_local_weights(named_weights, tmp_path, capsys):
    import csv

    from PIL import Image

    from lrpkit import cli
    from lrpkit.app import zoo

    source, weights = named_weights
    png = tmp_path / "img.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(200, 240, 3) * 255).byte().numpy()).save(png)
    out = tmp_path / "out"
    code = cli.main(["explain", str(png), "--model", NAMED, "--weights", str(weights), "--method", "lrp",
                     "attnlrp", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" not in captured.err
    for method in ("lrp", "attnlrp"):
        with Image.open(out / method / "img.png") as result:
            assert result.size == (224, 224)
    _, prep = zoo.load_model(NAMED)
    with torch.no_grad():
        expected = source(prep.normalize(prep.load(png))[None])[0]
    with (out / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["predicted"]) == int(expected.argmax())  # timm's model with the weights from the file
    assert float(row["predicted_logit"]) == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-6)
    # an attention method: one line that says why, exit status 2
    assert cli.main(["explain", str(png), "--model", NAMED, "--weights", str(weights), "--method", "rollout",
                     "--out", str(out)]) == 2
    assert "no token-to-token path across windows" in capsys.readouterr().err


def test_cli_evaluates_the_named_swin(named_weights, tmp_path, capsys):
    import csv

    from lrpkit import cli

    _, weights = named_weights
    out = tmp_path / "ev"
    code = cli.main(["evaluate", "--model", NAMED, "--weights", str(weights), "--method", "lrp", "--n", "1",
                     "--steps", "2", "--deletion-steps", "2", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["lrp"]
    config = (out / "config.json").read_text()
    assert '"patch_size": 4' in config  # the perturbation regions: Swin's 4-pixel patches (the family's geometry)
    # an attention method named on the command line: one line that says why, exit status 2
    assert cli.main(["evaluate", "--model", NAMED, "--weights", str(weights), "--method", "rollout", "--n", "1",
                     "--out", str(tmp_path / "ev2"), "--quiet"]) == 2
    assert "no token-to-token path across windows" in capsys.readouterr().err
