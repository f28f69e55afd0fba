"""Attention pooling in timm's VisionTransformer (``global_pool='map'``, timm's ``AttentionPoolLatent``, the head of
the SigLIP models ``vit_*_siglip_*``): canonized exactly, LRP on it, and CP-LRP / AttnLRP with ε → 0 against an
independent reference.

The reference is gradient × input of the SAME timm model instance (a deep copy) whose modules are patched, without
anything of lrpkit: every ``nn.LayerNorm`` (the blocks', the final one, the pool's and the qk-norms) with σ detached
(μ keeps its gradient); every GELU computing ``x · (gelu(x) / x).detach()``; timm's ``Attention`` and the pool's
``AttentionPoolLatent`` re-written after timm's forward with the attention probabilities detached (CP) or, for
AttnLRP, with half the gradient through both factors of ``q kᵀ`` and ``A v`` and the softmax's true gradient. The
pool's query (after its q-norm) is made a leaf there, so that its gradient × value is the latent's AttnLRP share.
"""

import copy
import csv
import math
import types
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import lrpkit
from lrpkit import Composite, GlobalTypeMap, presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import AttentionPool, Chain, SelectClassToken, SelfAttention, SkipConnection, TokenMean
from lrpkit.rules import (AttentionPoolRule, EpsilonRule, FlatRule, GammaRule, SelectClassTokenRule,
                          SkipConnectionRule, TokenMeanRule, ZBoxRule)
from helpers import image, relative
from reference_patches import gradient_times_input, half_grad, layer_norm_detached, ratio_forward

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, class_token=False,
             global_pool="map")

# (VisionTransformer kwargs, AttentionPoolLatent kwargs that replace the model's pool, or None)
CONFIGS = {
    "siglip": (dict(), None),
    "siglip-gelu-tanh": (dict(act_layer="gelu_tanh"), None),
    "cls-left-out": (dict(class_token=True), None),
    "cls+reg-included": (dict(class_token=True, reg_tokens=2, pool_include_prefix=True), None),
    "reg+layerscale+qknorm": (dict(reg_tokens=2, init_values=0.5, qk_norm=True), None),
    "latents2-avg+pool-qknorm": (dict(), dict(latent_len=2, pool_type="avg", qk_norm=True)),
    "latents3-token+no-q-proj": (dict(), dict(latent_len=3, q_proj=False)),
    "latent-dim+no-qkv-bias": (dict(), dict(latent_dim=24, qkv_bias=False)),
    "no-mlp": (dict(), dict(out_features=0)),
    "fc-norm": (dict(fc_norm=True), None),
    "unfused": (dict(), dict(fused=False)),
}


def perturb(model, seed=0):
    """Every parameter moved by N(0, 0.1²): biases, tokens and LayerNorm shifts non-zero, weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def small_map_vit(config="siglip", dtype=torch.float32, seed=0, zero_bias=False):
    """A 2-block, width-32 'map'-pooled timm ViT on 32 x 32 images (patch 8), every parameter perturbed;
    ``zero_bias``: every bias zero."""
    kw, pool_kw = CONFIGS[config]
    torch.manual_seed(seed)
    model = VisionTransformer(**{**SMALL, **kw})
    if pool_kw is not None:
        pool_kw = dict(pool_kw)
        fused = pool_kw.pop("fused", True)
        model.attn_pool = AttentionPoolLatent(32, num_heads=2, norm_layer=partial(timm.layers.LayerNorm, eps=1e-6),
                                              **pool_kw)
        if not fused:
            for m in model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
    perturb(model.eval(), seed)
    if zero_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    return model.to(dtype)


# -- canonization: exact forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_exact(config):
    model = small_map_vit(config)
    x = image(3)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5
    model64, x64 = model.double(), x.double()
    with torch.no_grad():
        assert relative(lrpkit.canonize(model64)(x64), model64(x64)) < 1e-10


def test_chain_layout():
    chain = lrpkit.canonize(small_map_vit("cls-left-out"))
    tail = list(zip(chain.names, (type(layer).__name__ for layer in chain)))[-7:]
    assert tail == [("norm", "LayerNormalize"), ("norm", "Scale"), ("attn_pool", "AttentionPool"),
                    ("attn_pool.proj", "Linear"), ("attn_pool.mlp", "SkipConnection"),
                    ("attn_pool.pool", "SelectClassToken"), ("head", "Linear")]
    pool = chain[len(chain) - 5]
    assert pool.start == 1 and pool.latent_len == 1  # the class token is left out of the pool
    assert [type(layer).__name__ for layer in chain[len(chain) - 3].inner] == [
        "LayerNormalize", "Scale", "Linear", "GELU", "Linear"]
    assert lrpkit.canonize(small_map_vit("cls+reg-included"))[len(chain) - 5].start == 0
    avg = lrpkit.canonize(small_map_vit("latents2-avg+pool-qknorm"))
    assert isinstance(avg[len(avg) - 2], TokenMean) and avg[len(avg) - 2].start == 0
    assert isinstance(avg[len(avg) - 5].q_norm, nn.LayerNorm) and isinstance(avg[len(avg) - 5].k_norm, nn.LayerNorm)
    no_mlp = lrpkit.canonize(small_map_vit("no-mlp"))
    assert [type(layer).__name__ for layer in no_mlp][-3:] == ["AttentionPool", "SelectClassToken", "Linear"]


def test_family_and_geometry():
    for config, prefix in (("siglip", 0), ("cls-left-out", 1), ("reg+layerscale+qknorm", 2)):
        model = small_map_vit(config)
        family = family_of(model)
        assert family.name == "timm-vit"
        geometry = family.geometry(model, None)
        assert geometry.patch_size == (8, 8) and geometry.num_prefix == prefix and geometry.global_attention


def _pool_model(**pool_kw):
    model = small_map_vit()
    pool_kw.setdefault("norm_layer", partial(timm.layers.LayerNorm, eps=1e-6))
    model.attn_pool = AttentionPoolLatent(32, num_heads=2, **pool_kw)
    return model.eval()


class _OwnPool(AttentionPoolLatent):
    def forward(self, x, attn_mask=None):
        return super().forward(x, attn_mask) * 2


def test_unsupported_pool_options_are_clear_errors():
    cases = [
        (_pool_model(feat_size=16, pos_embed="abs"), "positional embedding inside the attention pool"),
        (_pool_model(pool_type=""), "pool_type=''"),
        (_pool_model(qk_norm=True, norm_layer=timm.layers.RmsNorm), "RmsNorm"),
        (VisionTransformer(**{**SMALL, "global_pool": "prr"}).eval(), "global_pool='prr'"),
    ]
    own = small_map_vit()
    own.attn_pool = _OwnPool(32, num_heads=2, norm_layer=nn.LayerNorm)
    cases.append((own, "_OwnPool"))
    for model, message in cases:
        with pytest.raises(CanonizationError, match=message):
            lrpkit.canonize(model)


# -- the reference: gradient × input of the patched timm model ------------------------------------------------------

def _attend(q, k, v, mode):
    """``softmax(q kᵀ) v`` with A detached (CP) or with half the gradient through every factor (AttnLRP)."""
    if mode == "cp":
        return torch.softmax(q @ k.transpose(-2, -1), -1).detach() @ v
    attn = torch.softmax(half_grad(q) @ half_grad(k).transpose(-2, -1), -1)
    return half_grad(attn) @ half_grad(v)


def _attention(mode):
    """timm ``Attention.forward`` (no gate, no mask), modified as ``mode`` says."""
    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        y = _attend(q * self.scale, k, v, mode).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(y)))
    return forward


def _attention_pool(mode, queries):
    """timm ``AttentionPoolLatent.forward`` (no pos_embed, no mask), modified as ``mode`` says; the query after its
    q-norm is a leaf appended to ``queries``."""
    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.num_heads, self.head_dim)
        q = self.q_norm(q.transpose(1, 2)).detach().requires_grad_(True)
        queries.append(q)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = _attend(q * self.scale, self.k_norm(k), v, mode).transpose(1, 2).reshape(B, self.latent_len, C)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        return x[:, 0] if self.pool == "token" else x.mean(1)
    return forward


def patched(model, mode, queries):
    from timm.layers import Attention

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.LayerNorm):  # timm.layers.LayerNorm too
            m.forward = types.MethodType(layer_norm_detached, m)
        elif isinstance(m, nn.GELU) or type(m).__name__ == "GELUTanh":
            m.forward = types.MethodType(ratio_forward, m)
        elif type(m) is Attention:
            m.forward = types.MethodType(_attention(mode), m)
        elif type(m) is AttentionPoolLatent:
            m.forward = types.MethodType(_attention_pool(mode, queries), m)
    return ref


def reference_relevance(model, x, mode):
    """``(x ⊙ ∂y_t/∂x, t, q ⊙ ∂y_t/∂q summed per sample)`` of the patched model, t its argmax."""
    queries = []
    relevance, target, (gq,) = gradient_times_input(patched(model, mode, queries), model, x, queries)
    latent = (queries[0] * gq).flatten(1).sum(1) if gq is not None else x.new_zeros(x.shape[0])
    return relevance, target, latent.detach()


REFERENCE_CONFIGS = ["siglip", "siglip-gelu-tanh", "cls-left-out", "cls+reg-included", "reg+layerscale+qknorm",
                     "latents2-avg+pool-qknorm", "latents3-token+no-q-proj", "no-mlp", "fc-norm"]


@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
def test_cplrp_equals_gradient_times_input_of_the_detached_model(config):
    model = small_map_vit(config, dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    ref, target, _ = reference_relevance(model, x, "cp")
    deviation = {}
    for eps in (1e-16, 1e-10):
        e = lrpkit.LRP(model, presets.CPLRP(epsilon=eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        deviation[eps] = relative(e.relevance, ref)
        assert "latent_query" not in e.accounting.parts  # CP: the latent query gets nothing
    assert deviation[1e-16] < 1e-10, deviation
    # the deviation comes from ε and scales with it, linearly down to 1e-16 (1e-10 / 1e-16 = 1e6; measured: 4e-13 and
    # 4e-7 on "siglip", 1.7e-12 and 1.7e-6 on "latents2-avg+pool-qknorm")
    assert 3e5 < deviation[1e-10] / deviation[1e-16] < 3e6, deviation


@pytest.mark.parametrize("config", ["siglip", "cls-left-out", "reg+layerscale+qknorm", "latents2-avg+pool-qknorm",
                                    "latents3-token+no-q-proj"])
def test_attnlrp_equals_gradient_times_input_of_the_half_gradient_model(config):
    model = small_map_vit(config, dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    ref, target, latent = reference_relevance(model, x, "attnlrp")
    results = {eps: lrpkit.LRP(model, presets.AttnLRP(epsilon=eps))(x, normalize_output=False)
               for eps in (1e-10, 1e-16)}
    deviation = {eps: relative(e.relevance, ref) for eps, e in results.items()}
    assert all(torch.equal(e.target, target) for e in results.values())
    assert deviation[1e-16] < 1e-10, deviation
    assert 3e5 < deviation[1e-10] / deviation[1e-16] < 3e6, deviation
    # the latent query's share is the query's gradient × value in the same model
    e = results[1e-16]
    got = e.accounting.parts["latent_query"]
    assert torch.allclose(got, latent, rtol=1e-8, atol=1e-10 * e.accounting.output.abs().max())
    assert (latent.abs() > 1e-6 * e.accounting.output.abs()).all()  # a real share, not vacuous


# -- conservation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["siglip", "cls-left-out", "cls+reg-included", "latents2-avg+pool-qknorm"])
def test_accounting_of_a_bias_free_model(config):
    # Every bias zero and ε = 1e-12 in float64: what the output relevance became is the input's, the positional
    # embedding's, the prefix tokens' and (AttnLRP) the latent query's and the softmax rules'; nothing is lost to
    # biases or stabilisers.
    model = small_map_vit(config, dtype=torch.float64, zero_bias=True)
    x = image(2, dtype=torch.float64)
    tokens = {"siglip": set(), "cls-left-out": {"class_token"}, "cls+reg-included": {"class_token", "register_tokens"},
              "latents2-avg+pool-qknorm": set()}[config]
    for preset, sinks in ((presets.CPLRP, set()), (presets.AttnLRP, {"latent_query", "attention"})):
        e = lrpkit.LRP(model, preset(epsilon=1e-12))(x, normalize_output=False)
        acc, out = e.accounting, e.accounting.output
        zero = torch.zeros(2, dtype=torch.float64)
        for sink in ("bias", "stabilizer"):
            assert torch.allclose(acc.parts.get(sink, zero), zero, atol=1e-7 * out.abs().max()), (preset, sink)
        named = {"positional_embedding"} | tokens | sinks
        assert {k for k in acc.parts if k not in ("bias", "stabilizer")} == named
        explained = acc.input + sum(acc.parts[k] for k in named)
        assert torch.allclose(explained, out, rtol=1e-5, atol=1e-12)
        assert torch.allclose(acc.input, e.relevance.flatten(1).sum(1), rtol=1e-9, atol=1e-12)


def test_the_pool_rule_conserves_per_layer_in_cp_mode():
    model = small_map_vit("cls-left-out", dtype=torch.float64, zero_bias=True)
    e = lrpkit.LRP(model, presets.CPLRP(epsilon=1e-12))(image(2, dtype=torch.float64))
    (parts,) = [parts for _, name, parts in e.accounting.layers if name == "attn_pool"]
    assert set(parts) <= {"stabilizer", "bias"} and all(v.abs().max() < 1e-9 for v in parts.values())
    # with its biases, the value projection's bias takes a share (the key bias none: A is constant)
    model = small_map_vit("cls-left-out", dtype=torch.float64)
    e = lrpkit.LRP(model, presets.CPLRP(epsilon=1e-12))(image(2, dtype=torch.float64))
    (parts,) = [parts for _, name, parts in e.accounting.layers if name == "attn_pool"]
    assert parts["stabilizer"].abs().max() < 1e-9 and (parts["bias"].abs() > 1e-4).all()


# -- hand-derived tiny cases ------------------------------------------------------------------------------------------

def _tiny_pool(start=0):
    """One head of width 2, no query projection, ``W_kv = [I; I]`` without bias (k = v = the token), scale 1,
    latent q = (ln 3, 0)."""
    kv = nn.Linear(2, 4, bias=False).double()
    with torch.no_grad():
        kv.weight.copy_(torch.cat([torch.eye(2), torch.eye(2)]).double())
    latent = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)
    return Chain([AttentionPool(latent, nn.Identity(), kv, num_heads=1, scale=1.0, start=start),
                  SelectClassToken(0)]).eval()


# tokens x1 = (1, 1), x2 = (0, 2): scores S = (q·x1, q·x2) = (ln 3, 0), A = softmax(S) = (3/4, 1/4),
# y = 3/4 (1, 1) + 1/4 (0, 2) = (0.75, 1.25); the output relevance is R_y = (1, 1).
TOKENS = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)


def _pool_lrp(chain, mode, x):
    composite = Composite(GlobalTypeMap({AttentionPool: AttentionPoolRule(EpsilonRule(1e-12), mode, 1e-12)}))
    return lrpkit.LRP(chain, composite)(x, R=torch.ones(1, 2, dtype=torch.float64))


def test_attention_pool_cp_by_hand():
    chain = _tiny_pool()
    assert torch.allclose(chain(TOKENS), torch.tensor([[0.75, 1.25]], dtype=torch.float64))
    e = _pool_lrp(chain, "cp", TOKENS)
    # A constant: s = R_y / y = (4/3, 0.8); R_v[j] = v_j ⊙ A_j s:
    #   R_x1 = (1, 1) ⊙ 3/4 (4/3, 0.8) = (1, 0.6),  R_x2 = (0, 2) ⊙ 1/4 (4/3, 0.8) = (0, 0.4)   (sum 2 = Σ R_y)
    expected = torch.tensor([[[1.0, 0.6], [0.0, 0.4]]], dtype=torch.float64)
    assert torch.allclose(e.relevance, expected, atol=1e-10)
    assert "latent_query" not in e.accounting.parts


def test_attention_pool_attnlrp_by_hand():
    e = _pool_lrp(_tiny_pool(), "attnlrp", TOKENS)
    # A v, uniform: s' = R_y / (2y) = (2/3, 0.4)
    #   R_A = A ⊙ (v s') = (3/4 · (2/3 + 0.4), 1/4 · (0 + 0.8)) = (0.8, 0.2)
    #   R_v = v ⊙ (A s'): R_v1 = 3/4 (1, 1) ⊙ (2/3, 0.4) = (0.5, 0.3), R_v2 = 1/4 (0, 2) ⊙ (2/3, 0.4) = (0, 0.2)
    # softmax: R_S = S ⊙ (R_A − A Σ R_A) = (ln 3 · (0.8 − 0.75), 0) = (0.05 ln 3, 0); lost: 1 − 0.05 ln 3
    # q kᵀ, uniform: R_q = q ⊙ x1 · R_S1 / (2 S1) = (0.025 ln 3, 0), R_k1 = x1 ⊙ q · 0.025 = (0.025 ln 3, 0), R_k2 = 0
    # tokens (k and v of the same token add up): R_x1 = (0.5 + 0.025 ln 3, 0.3), R_x2 = (0, 0.2)
    ln3 = math.log(3.0)
    expected = torch.tensor([[[0.5 + 0.025 * ln3, 0.3], [0.0, 0.2]]], dtype=torch.float64)
    assert torch.allclose(e.relevance, expected, atol=1e-10)
    parts = e.accounting.parts
    assert math.isclose(parts["latent_query"].item(), 0.025 * ln3, abs_tol=1e-10)
    assert math.isclose(parts["attention"].item(), 1 - 0.05 * ln3, abs_tol=1e-10)


def test_prefix_tokens_left_out_of_the_pool_get_nothing():
    prefixed = torch.cat([torch.tensor([[[5.0, -3.0]]], dtype=torch.float64), TOKENS], dim=1)
    chain = _tiny_pool(start=1)
    assert torch.allclose(chain(prefixed), _tiny_pool()(TOKENS))
    for mode in ("cp", "attnlrp"):
        e = _pool_lrp(chain, mode, prefixed)
        assert not e.relevance[:, 0].any()
        assert torch.allclose(e.relevance[:, 1:], _pool_lrp(_tiny_pool(), mode, TOKENS).relevance)


# -- presets, batches, edge inputs ----------------------------------------------------------------------------------

PRESETS = {
    "CPLRP": presets.CPLRP,
    "AttnLRP": presets.AttnLRP,
    "CPLRP-gamma-zbox": lambda: presets.CPLRP(gamma=0.25, first_layer=ZBoxRule(-4.0, 4.0)),
    "AttnLRP-gamma-flat": lambda: presets.AttnLRP(gamma=0.25, first_layer=FlatRule()),
    "EpsilonPlus": presets.EpsilonPlus,
    "EpsilonPlusFlat": presets.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": presets.EpsilonAlpha2Beta1,
    "EpsilonGammaBox": lambda: presets.EpsilonGammaBox(-4.0, 4.0),
}


@pytest.fixture(scope="module")
def siglip():
    return small_map_vit("cls-left-out")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_maps_and_runs(preset, siglip):
    composite = PRESETS[preset]()
    lrp = lrpkit.LRP(siglip, composite)
    slots = composite.assign(lrp.chain)
    (pool,) = [s for s in slots if isinstance(s.layer, AttentionPool)]
    assert type(pool.rule) is AttentionPoolRule
    assert pool.rule.mode == ("attnlrp" if preset.startswith("AttnLRP") else "cp")
    assert type(pool.rule.value_rule) is (GammaRule if "gamma" in preset else EpsilonRule)
    for s in slots:
        if s.name.startswith("attn_pool") and isinstance(s.layer, SkipConnection):
            assert type(s.rule) is SkipConnectionRule
        if s.name == "attn_pool.pool":
            assert type(s.rule) is SelectClassTokenRule
        if isinstance(s.layer, SelfAttention):
            assert s.rule.mode == pool.rule.mode
    x = image(3)
    e = lrp(x)
    assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()
    with torch.no_grad():
        assert torch.allclose(e.output, siglip(x), rtol=1e-5, atol=1e-6)
    acc = e.accounting
    scale = max([1.0] + [v.abs().max().item() for v in [acc.input, *acc.parts.values()]])
    assert torch.allclose(acc.total(), acc.output, atol=1e-6 * scale + 1e-5)


def test_avg_over_latents_gets_the_token_mean_rule():
    lrp = lrpkit.LRP(small_map_vit("latents2-avg+pool-qknorm"), presets.CPLRP(epsilon=1e-9))
    (rule,) = [s.rule for s in lrp.composite.assign(lrp.chain) if s.name == "attn_pool.pool"]
    assert type(rule) is TokenMeanRule and rule.epsilon == 1e-9


def test_default_composite_is_cplrp(siglip):
    lrp = lrpkit.LRP(siglip)
    (pool,) = [s.rule for s in lrp.composite.assign(lrp.chain) if isinstance(s.layer, AttentionPool)]
    assert pool.mode == "cp"


@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP"])
def test_batch_equals_single(preset, siglip):
    lrp = lrpkit.LRP(siglip, PRESETS[preset]())
    x = image(4)
    targets = [0, 4, 2, 1]
    batch = lrp(x, target=targets)
    for b in range(4):
        single = lrp(x[b:b + 1], target=targets[b])
        assert torch.allclose(batch.relevance[b:b + 1], single.relevance, atol=1e-6, rtol=1e-4)
        for key, value in single.accounting.parts.items():
            assert torch.allclose(batch.accounting.parts[key][b], value[0], atol=1e-5, rtol=1e-4)


def test_model_is_untouched():
    model = small_map_vit("cls-left-out").train()
    model.attn_pool.kv.weight.requires_grad_(False)
    calls = []
    model.attn_pool.register_forward_hook(lambda *a: calls.append(1))
    model.attn_pool.mlp.fc1.register_forward_pre_hook(lambda *a: calls.append(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training mode"):
        lrp = lrpkit.LRP(model, presets.AttnLRP())
    assert torch.isfinite(lrp(image(1)).relevance).all()
    assert model.training and all(m.training for m in model.modules()) and not calls
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(model.attn_pool._forward_hooks) == 1 and len(model.attn_pool.mlp.fc1._forward_pre_hooks) == 1


def degenerate_inputs(dtype=torch.float32):
    """Zeros, a constant image, large and tiny magnitudes, a random image."""
    x = image(1)
    return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP", "EpsilonPlusFlat"])
def test_finite_for_degenerate_inputs_and_bfloat16(preset, dtype):
    model = small_map_vit("latents2-avg+pool-qknorm").to(dtype)
    e = lrpkit.LRP(model, PRESETS[preset]())(degenerate_inputs(dtype))
    assert e.relevance.dtype == dtype and torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())
    if dtype == torch.float32 and preset != "EpsilonPlusFlat":  # (LRP-flat ignores the input's values)
        assert not e.relevance[0].any()  # a zero input gets zero relevance


# -- weights from a local file --------------------------------------------------------------------------------------

def test_named_architecture_with_weights_from_a_local_safetensors_file(tmp_path):
    """vit_base_patch16_siglip_224's architecture (2 of its 12 blocks, 64 px, to keep the test small) with its
    weights written to a safetensors file and loaded through timm's own path (as tests/test_vit_weights.py)."""
    name = "vit_base_patch16_siglip_224"
    torch.manual_seed(0)
    # the named model is headless (num_classes=0: its output is the 768-d embedding); timm's pretrained path would
    # reset a head that the file's config does not have
    source = perturb(timm.create_model(name, pretrained=False, depth=2, img_size=64).eval())
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(123)  # were the file ignored, the loaded model's random weights would differ from the source's
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2,
                              img_size=64).eval()
    assert all(torch.equal(source.state_dict()[k], v) for k, v in model.state_dict().items())
    x = image(2, size=64)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), source(x)) < 1e-5
    e = lrpkit.LRP(model, presets.CPLRP())(x)
    assert torch.isfinite(e.relevance).all() and torch.equal(e.target, source(x).argmax(1))


def test_named_model_forward_and_lrpkit_explain_with_local_weights(tmp_path, capsys):
    """vit_base_patch16_siglip_224 as timm builds it (12 blocks of width 768, 224 px), perturbed, with a 10-class head:
    the canonized forward is exact, CPLRP runs on it, and ``lrpkit explain --model timm:NAME --weights FILE`` loads
    its safetensors file (the head's size from the file), preprocesses with timm's data config and predicts what the
    model predicts."""
    from PIL import Image

    from lrpkit import cli
    from lrpkit.app.preprocess import Preprocess

    name = "vit_base_patch16_siglip_224"
    torch.manual_seed(0)
    source = perturb(timm.create_model(name, pretrained=False, num_classes=10).eval())
    assert source.global_pool == "map" and source.cls_token is None
    x = image(1, size=224)
    with torch.no_grad():
        expected = source(x)
        assert relative(lrpkit.canonize(source)(x), expected) < 1e-5
    e = lrpkit.LRP(source, presets.CPLRP())(x)
    assert torch.isfinite(e.relevance).all() and torch.equal(e.target, expected.argmax(1))

    weights = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    picture = tmp_path / "img.png"
    Image.fromarray((torch.rand(240, 260, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
                    ).save(picture)
    out = tmp_path / "out"
    code = cli.main(["explain", str(picture), "--model", f"timm:{name}", "--weights", str(weights), "--method",
                     "lrp", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    prep = Preprocess.from_timm(source)
    assert prep.size == (224, 224) and tuple(prep.mean) == (0.5, 0.5, 0.5)  # SigLIP's data config
    with torch.no_grad():
        logits = source(prep.normalize(prep.load(picture))[None])[0]
    with (out / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["predicted"]) == int(logits.argmax())  # the 10-class head came from the file
    assert float(row["predicted_logit"]) == pytest.approx(float(logits.max()), rel=1e-4, abs=1e-5)
    with Image.open(out / "lrp" / "img.png") as png:
        assert png.size == (224, 224)

