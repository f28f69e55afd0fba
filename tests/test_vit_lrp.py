"""LRP on timm vision transformers: presets, options, accounting, and correctness against independent references.

The two reference tests re-implement the timm ViT forward pass functionally from the timm model's own parameters
and compute gradient × input with torch autograd, with the modifications under which LRP with ε → 0 *is*
gradient × input (Ali et al. 2022; Achtibat et al. 2024):

- CP-LRP: attention probabilities A and LayerNorm σ detached, GELU passing ``g·f(x)/x`` backward;
- AttnLRP: as CP for σ and GELU, but A is not detached: the softmax keeps its true gradient (its Taylor rule
  ``R_S = S ⊙ (R_A − A ⊙ Σ R_A)`` is exactly ``S ⊙ ∂/∂S`` of ``A ⊙ g``), and both matrix products ``q kᵀ`` and
  ``A v`` pass half the gradient to each factor (the uniform rule).
"""

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import lrpkit
from lrpkit import Composite, GlobalTypeMap, presets
from lrpkit.layers import (ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, SelectClassToken,
                           SelfAttention, SkipConnection, Sum, TokenMean)
from lrpkit.rules import (ClassTokenRule, EpsilonRule, FlatRule, GammaRule, LayerNormRule, PatchFlattenRule,
                          PositionalEmbeddingRule, SelectClassTokenRule, SelfAttentionRule, SkipConnectionRule,
                          SumRule, TokenMeanRule, ZBoxRule)
from reference_patches import half_grad


SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def small_vit(cls=VisionTransformer, dtype=torch.float32, seed=0, zero_bias=False, **kw):
    """A small timm ViT in eval mode; every parameter perturbed (LayerNorm weights 1 ± 0.1, biases and tokens
    non-zero) so that no term vanishes by accident. ``zero_bias``: every bias set to zero (qkv_bias=False too)."""
    torch.manual_seed(seed)
    if zero_bias:
        kw["qkv_bias"] = False
    model = cls(**{**SMALL, **kw}).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_bias and name.endswith("bias"):
                p.zero_()
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def image(batch=2, size=(32, 32), dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *size, dtype=dtype)


def tiny_eps(preset: Composite, epsilon: float) -> Composite:
    """``preset`` with the skip-connection / Sum splits stabilised by ``epsilon`` too (the presets leave them at
    the registered default 1e-6; see test_presets_pass_epsilon_to_the_residual_splits)."""
    return Composite(*preset.primitives,
                     GlobalTypeMap({SkipConnection: SkipConnectionRule(epsilon), Sum: SumRule(epsilon)}))


PRESETS = {
    "EpsilonGammaBox": lambda: presets.EpsilonGammaBox(-4.0, 4.0),
    "EpsilonPlus": presets.EpsilonPlus,
    "EpsilonAlpha2Beta1": presets.EpsilonAlpha2Beta1,
    "EpsilonPlusFlat": presets.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1Flat": presets.EpsilonAlpha2Beta1Flat,
    "CPLRP": presets.CPLRP,
    "CPLRP-gamma-zbox": lambda: presets.CPLRP(epsilon=1e-5, gamma=0.25, first_layer=ZBoxRule(-4.0, 4.0)),
    "AttnLRP": presets.AttnLRP,
    "AttnLRP-gamma-flat": lambda: presets.AttnLRP(gamma=0.25, first_layer=FlatRule()),
}


@pytest.fixture(scope="module")
def vit():
    return small_vit(reg_tokens=2, init_values=0.5, qk_norm=True)


@pytest.fixture(scope="module")
def deit():
    return small_vit(VisionTransformerDistilled)


@pytest.fixture(scope="module")
def vit_avg():
    return small_vit(global_pool="avg", class_token=False)


# -- presets ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("which", ["vit", "deit", "vit_avg"])
def test_every_preset_runs_on_vits(preset, which, request):
    model = request.getfixturevalue(which)
    x = image(3)
    e = lrpkit.LRP(model, PRESETS[preset]())(x)
    assert e.relevance.shape == x.shape and e.relevance.dtype == x.dtype
    assert torch.isfinite(e.relevance).all()
    with torch.no_grad():
        assert torch.allclose(e.output, model(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(e.target, model(x).argmax(1))
    acc = e.accounting
    assert all(torch.isfinite(v).all() for v in acc.parts.values())
    # the parts close the books, to float32 rounding of the largest part (AttnLRP with γ moves relevance of
    # several hundred through biases and the softmax on random weights)
    scale = max([1.0] + [v.abs().max().item() for v in [acc.input, *acc.parts.values()]])
    assert torch.allclose(acc.total(), acc.output, atol=1e-6 * scale + 1e-5)
    assert torch.allclose(acc.input, e.relevance.flatten(1).sum(1), atol=1e-6 * scale + 1e-5)


def _rules(lrp):
    return [(slot.layer, slot.rule) for slot in lrp.composite.assign(lrp.chain)]


@pytest.mark.parametrize("preset", PRESETS)
def test_transformer_layers_get_transformer_rules(preset, vit, vit_avg, deit):
    expected = {PositionalEmbedding: PositionalEmbeddingRule, PatchFlatten: PatchFlattenRule,
                ClassToken: ClassTokenRule, SelectClassToken: SelectClassTokenRule, TokenMean: TokenMeanRule,
                LayerNormalize: LayerNormRule, SelfAttention: SelfAttentionRule, SkipConnection: SkipConnectionRule,
                Sum: SumRule}
    seen = set()
    for model in (vit, vit_avg, deit):
        lrp = lrpkit.LRP(model, PRESETS[preset]())
        for layer, rule in _rules(lrp):
            for layer_type, rule_type in expected.items():
                if type(layer) is layer_type:
                    seen.add(layer_type)
                    assert type(rule) is rule_type, (layer, rule)
            if isinstance(layer, SelfAttention):
                assert rule.mode == ("attnlrp" if preset.startswith("AttnLRP") else "cp")
                # the value / output projections get the preset's rule for Linear layers
                linear = GammaRule if "gamma" in preset else EpsilonRule
                assert type(rule.value_rule) is linear and type(rule.out_rule) is linear
        first = _rules(lrp)[0][1]
        first_rule = {"EpsilonGammaBox": ZBoxRule, "CPLRP-gamma-zbox": ZBoxRule, "AttnLRP-gamma-flat": FlatRule,
                      "EpsilonPlusFlat": FlatRule, "EpsilonAlpha2Beta1Flat": FlatRule}.get(preset)
        if first_rule is not None:
            assert type(first) is first_rule
    assert seen == set(expected)


def test_presets_pass_epsilon_to_the_residual_splits(vit, deit):
    for model in (vit, deit):
        for layer, rule in _rules(lrpkit.LRP(model, presets.CPLRP(epsilon=1e-12))):
            if isinstance(layer, (SkipConnection, Sum)):
                assert rule.epsilon == 1e-12


def test_both_distilled_heads_keep_epsilon_under_cplrp_gamma(deit):
    lrp = lrpkit.LRP(deit, presets.CPLRP(gamma=0.25))
    heads = [rule for slot in lrp.composite.assign(lrp.chain) if slot.name in ("head", "head_dist")
             for rule in [slot.rule] if not isinstance(slot.layer, Sum)]
    assert len(heads) == 2 and all(type(rule) is EpsilonRule for rule in heads)


# -- options ---------------------------------------------------------------------------------------------------------

def test_normalize_output_and_explicit_R(vit):
    lrp = lrpkit.LRP(vit, presets.CPLRP())
    x = image(2)
    ones = lrp(x, target=[1, 3])
    raw = lrp(x, target=[1, 3], normalize_output=False)
    logits = ones.output.gather(1, torch.tensor([[1], [3]])).squeeze(1)
    # every rule is linear in R, so starting from the logit scales each sample's relevance by the logit
    assert torch.allclose(raw.relevance, ones.relevance * logits.view(2, 1, 1, 1), atol=1e-6)
    assert torch.allclose(raw.accounting.output, logits)
    # explicit R: a combination of two classes is the same combination of the two explanations
    R = torch.zeros(2, 5)
    R[:, 1], R[:, 3] = 2.0, -0.5
    mixed = lrp(x, R=R)
    only3 = lrp(x, target=3)
    assert torch.allclose(mixed.relevance, 2 * lrp(x, target=1).relevance - 0.5 * only3.relevance, atol=1e-6)
    assert mixed.target is None and torch.allclose(mixed.accounting.output, torch.full((2,), 1.5))
    with pytest.raises(ValueError, match="either target or R"):
        lrp(x, target=1, R=R)
    with pytest.raises(ValueError, match="shape"):
        lrp(x, R=torch.ones(2, 4))


def test_per_sample_targets_and_batch_equals_single(vit):
    lrp = lrpkit.LRP(vit, presets.AttnLRP())
    x = image(5)
    targets = [0, 4, 2, 2, 1]
    batch = lrp(x, target=targets)
    assert batch.target.tolist() == targets
    for b in range(5):
        single = lrp(x[b:b + 1], target=targets[b])
        assert torch.allclose(batch.relevance[b:b + 1], single.relevance, atol=1e-6, rtol=1e-4)
        assert torch.allclose(batch.accounting.input[b], single.accounting.input[0], atol=1e-6)
    for n in (1, 2, 7):
        assert lrp(image(n)).relevance.shape == (n, 3, 32, 32)
    with pytest.raises(ValueError, match="target"):
        lrp(x, target=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        lrp(x, target=5)


# -- accounting ------------------------------------------------------------------------------------------------------

BIAS_FREE = {
    "cls+reg": dict(reg_tokens=2, init_values=0.5, qk_norm=True),
    "distilled": dict(cls=VisionTransformerDistilled),
    "avg-no-cls": dict(global_pool="avg", class_token=False, reg_tokens=1),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=1, pre_norm=True),
}


@pytest.mark.parametrize("config", BIAS_FREE)
def test_accounting_of_a_bias_free_vit(config):
    # Every bias zero (patch projection, qkv, proj, MLP, LayerNorm shifts, head) and ε = 1e-12 in float64:
    # CP-LRP loses nothing to biases or stabilisers; the output relevance ends up in the input, the prefix tokens
    # and the positional embedding, exactly.
    model = small_vit(dtype=torch.float64, zero_bias=True, **BIAS_FREE[config])
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith("bias"))
    x = image(2, dtype=torch.float64)
    e = lrpkit.LRP(model, tiny_eps(presets.CPLRP(epsilon=1e-12), 1e-12))(x, normalize_output=False)
    acc, out = e.accounting, e.accounting.output
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(acc.total(), out, rtol=1e-5, atol=1e-12)
    for sink in ("bias", "stabilizer"):
        assert torch.allclose(acc.parts.get(sink, zero), zero, atol=1e-7 * out.abs().max())
    tokens = {"class_token", "register_tokens", "distillation_token"} & set(acc.parts)
    assert tokens == {"cls+reg": {"class_token", "register_tokens"}, "distilled": {"class_token", "distillation_token"},
                      "avg-no-cls": {"register_tokens"}, "no_embed_class": {"class_token", "register_tokens"}}[config]
    explained = acc.input + acc.parts["positional_embedding"] + sum(acc.parts[k] for k in tokens)
    assert torch.allclose(explained, out, rtol=1e-5, atol=1e-12)
    assert (acc.parts["positional_embedding"].abs() > 1e-6).all()  # a real share, not vacuous


def test_patch_relevance_sums_to_the_input_relevance():
    model = small_vit(dynamic_img_size=True)
    lrp = lrpkit.LRP(model, presets.CPLRP())
    for size, grid in (((32, 32), (4, 4)), ((48, 24), (6, 3))):
        e = lrp(image(2, size))
        assert e.patch_relevance.shape == (2, *grid)
        assert torch.allclose(e.patch_relevance.sum((1, 2)), e.relevance.sum((1, 2, 3)), atol=1e-5)
        assert torch.allclose(e.patch_relevance.sum((1, 2)), e.accounting.input, atol=1e-5)
        # one patch by hand: the 8x8 pixels of patch (1, 2) summed over channels
        assert torch.allclose(e.patch_relevance[:, 1, 2], e.relevance[:, :, 8:16, 16:24].sum((1, 2, 3)), atol=1e-6)


# -- correctness: independent references -----------------------------------------------------------------------------

class GeluRatio(torch.autograd.Function):
    """GELU forward; backward ``g · f(x)/x`` (the relevance of an element-wise activation passes unchanged)."""

    @staticmethod
    def forward(ctx, x):
        y = F.gelu(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * torch.where(x == 0, torch.full_like(x, 0.5), y / torch.where(x == 0, torch.ones_like(x), x))


def layer_norm(x, norm):
    """timm LayerNorm with σ detached (μ is linear in x and keeps its gradient); Identity passes."""
    if isinstance(norm, torch.nn.Identity):
        return x
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps).detach()
    y = (x - x.mean(-1, keepdim=True)) / sigma
    if norm.weight is not None:
        y = y * norm.weight
    return y if norm.bias is None else y + norm.bias


def reference_forward(m, x, mode):
    """The timm ViT forward from m's parameters; ``mode`` 'cp' or 'attnlrp' chooses the backward modifications."""
    pe = m.patch_embed.proj
    h = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    B = h.shape[0]
    prefix = [tok.expand(B, -1, -1) for tok in (m.cls_token, getattr(m, "dist_token", None), m.reg_token)
              if tok is not None]
    if m.no_embed_class:
        h = torch.cat(prefix + [h + m.pos_embed], 1)
    else:
        h = torch.cat(prefix + [h], 1) + m.pos_embed
    h = layer_norm(h, m.norm_pre)
    for blk in m.blocks:
        a = blk.attn
        u = layer_norm(h, blk.norm1)
        q, k, v = F.linear(u, a.qkv.weight, a.qkv.bias).reshape(B, -1, 3, a.num_heads, a.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        q, k = layer_norm(q, a.q_norm), layer_norm(k, a.k_norm)
        if mode == "cp":
            A = torch.softmax((q * a.scale) @ k.transpose(-2, -1), -1).detach()
            y = A @ v
        else:
            A = torch.softmax(half_grad(q * a.scale) @ half_grad(k).transpose(-2, -1), -1)
            y = half_grad(A) @ half_grad(v)
        y = F.linear(y.transpose(1, 2).reshape(B, -1, a.attn_dim), a.proj.weight, a.proj.bias)
        h = h + (y * blk.ls1.gamma if hasattr(blk.ls1, "gamma") else y)
        u = layer_norm(h, blk.norm2)
        u = F.linear(GeluRatio.apply(F.linear(u, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                     blk.mlp.fc2.bias)
        h = h + (u * blk.ls2.gamma if hasattr(blk.ls2, "gamma") else u)
    h = layer_norm(h, m.norm)
    if isinstance(m, VisionTransformerDistilled):
        return (F.linear(h[:, 0], m.head.weight, m.head.bias) + F.linear(h[:, 1], m.head_dist.weight,
                                                                        m.head_dist.bias)) / 2
    h = h[:, 0] if m.global_pool == "token" else h[:, m.num_prefix_tokens:].mean(1)
    h = layer_norm(h, m.fc_norm)
    return F.linear(h, m.head.weight, m.head.bias)


def reference_relevance(model, x, mode):
    xr = x.clone().requires_grad_(True)
    out = reference_forward(model, xr, mode)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-12)  # the re-implementation is the model
    target = out.argmax(1)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xr)
    return x * grad, target


REFERENCE_CONFIGS = {
    "cls+reg+layerscale+qknorm": dict(reg_tokens=2, init_values=0.5, qk_norm=True),
    "avg": dict(global_pool="avg"),
    "distilled": dict(cls=VisionTransformerDistilled),
}


@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
def test_cplrp_equals_gradient_times_input_of_the_detached_model(config):
    model = small_vit(dtype=torch.float64, **REFERENCE_CONFIGS[config])
    x = image(2, dtype=torch.float64)
    ref, target = reference_relevance(model, x, "cp")
    e = lrpkit.LRP(model, tiny_eps(presets.CPLRP(epsilon=1e-12), 1e-12))(x, normalize_output=False)
    assert torch.equal(e.target, target)
    scale = ref.abs().max()
    assert torch.allclose(e.relevance, ref, rtol=0, atol=1e-6 * scale)
    # and the same, read through the accounting: the stabilisers take ~nothing
    assert torch.allclose(e.accounting.parts["stabilizer"], torch.zeros(2, dtype=torch.float64), atol=1e-8)


def test_cplrp_preset_alone_equals_gradient_times_input():
    model = small_vit(dtype=torch.float64, **REFERENCE_CONFIGS["cls+reg+layerscale+qknorm"])
    x = image(2, dtype=torch.float64)
    ref, _ = reference_relevance(model, x, "cp")
    e = lrpkit.LRP(model, presets.CPLRP(epsilon=1e-12))(x, normalize_output=False)
    assert torch.allclose(e.relevance, ref, rtol=0, atol=1e-6 * ref.abs().max())


@pytest.mark.parametrize("config", ["cls+reg+layerscale+qknorm", "avg"])
def test_attnlrp_equals_gradient_times_input_of_the_half_gradient_model(config):
    model = small_vit(dtype=torch.float64, **REFERENCE_CONFIGS[config])
    x = image(2, dtype=torch.float64)
    ref, target = reference_relevance(model, x, "attnlrp")
    e = lrpkit.LRP(model, tiny_eps(presets.AttnLRP(epsilon=1e-12), 1e-12))(x, normalize_output=False)
    assert torch.equal(e.target, target)
    assert torch.allclose(e.relevance, ref, rtol=0, atol=1e-6 * ref.abs().max())
    # unlike CP, AttnLRP's softmax rule is not conservative: a visible share goes to "attention"
    assert (e.accounting.parts["attention"].abs() > 1e-6).all()


# -- numerics --------------------------------------------------------------------------------------------------------

def degenerate_inputs(dtype=torch.float32):
    """One batch: zeros, a constant image, large (x·1e4) and tiny (x·1e-6) magnitudes, a plain random image.
    (Samples are independent in LRP — test_per_sample_targets_and_batch_equals_single — so one call covers all.)"""
    x = image(1)
    return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x]).to(dtype)


@pytest.mark.parametrize("preset", PRESETS)
def test_finite_for_degenerate_inputs(preset, vit):
    e = lrpkit.LRP(vit, PRESETS[preset]())(degenerate_inputs())
    assert torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())
    assert torch.allclose(e.accounting.total(), e.accounting.output, atol=1e-3)


def test_zero_input_gets_zero_relevance(vit):
    e = lrpkit.LRP(vit, presets.CPLRP())(torch.zeros(1, 3, 32, 32))
    assert not e.relevance.any()  # R_in = x ⊙ (...) = 0; the output relevance went to the tokens / embedding
    assert e.accounting.parts["class_token"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP", "EpsilonPlusFlat", "EpsilonGammaBox"])
def test_other_dtypes(dtype, preset):
    model = small_vit(reg_tokens=1, init_values=0.5, qk_norm=True).to(dtype)
    lrp = lrpkit.LRP(model, PRESETS[preset]())
    e = lrp(degenerate_inputs(dtype))
    assert e.relevance.dtype == dtype and torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())
    with pytest.raises(TypeError, match="dtype"):
        lrp(image(1))  # float32 input for a float64 / bfloat16 model


def test_bfloat16_stays_close_to_float32():
    model = small_vit(reg_tokens=1)
    x = image(1)
    e32 = lrpkit.LRP(model, presets.CPLRP())(x)
    e16 = lrpkit.LRP(model.to(torch.bfloat16), presets.CPLRP())(x.to(torch.bfloat16))
    model.float()
    # bfloat16 has 8 bits of mantissa: compare the patch maps, normalised
    p32, p16 = e32.patch_relevance, e16.patch_relevance.float()
    assert torch.equal(e32.target, e16.target)
    cos = F.cosine_similarity(p32.flatten(), p16.flatten(), dim=0)
    assert cos > 0.9, cos


def test_no_grad_context_does_not_matter(vit):
    lrp = lrpkit.LRP(vit, presets.AttnLRP())
    x = image(1)
    with torch.no_grad():
        inside = lrp(x)
    assert torch.allclose(inside.relevance, lrp(x).relevance)
