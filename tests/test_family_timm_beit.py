"""The ``timm-beit`` family: timm's Beit canonized exactly, clear errors for what is not supported, LRP on it
(CP-LRP and AttnLRP against an independent reference, the accounting of the relative position biases), the
attention methods on it (Chefer's transformer attribution against an independent implementation), and the command
line with a named model's local weights.

The reference is gradient × input of the SAME timm model instance (a deep copy) whose modules are patched: timm's
LayerNorm with σ detached (μ keeps its gradient), every GELU computing ``x · (gelu(x)/x).detach()``, and BEiT's
Attention computed explicitly from its own parameters (``q kᵀ·scale + _get_rel_pos_bias()``) with the attention
probabilities detached (CP-LRP) or with half the gradient through both factors of each product (AttnLRP: ``q kᵀ``
and ``A v``). Nothing of lrpkit is used to build it.
"""

import copy
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.beit import Attention, Beit

import lrpkit
from lrpkit import presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import SelectClassToken, SelfAttention
from lrpkit.methods import (AttentionGradCAM, AttentionRollout, GenericAttention, GradientRollout, PartialLRP,
                            RawAttention, TransformerAttribution)
from lrpkit.methods.chefer import chefer_composite
from lrpkit.rules import SelfAttentionRule
from lrpkit.rules.chefer import ATTENTION_RELEVANCE, safe_divide
from helpers import image, relative
from reference_patches import gradient_times_input, half_grad, layer_norm_detached, ratio_forward

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)

CONFIGS = {
    # beit_base_patch16_224's layout: relative position bias per block, layer scale, no absolute embedding,
    # mean of the patch tokens with fc_norm
    "rel-pos+layer-scale+avg": dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1),
    "abs-pos+token": dict(use_abs_pos_emb=True, global_pool="token"),
    "both-pos+no-qkv-bias+token-fc-norm": dict(use_rel_pos_bias=True, qkv_bias=False, global_pool="token",
                                               use_fc_norm=True, init_values=0.5),
    "rel-pos+scale-mlp+avg-no-fc-norm": dict(use_abs_pos_emb=False, use_rel_pos_bias=True, scale_mlp=True,
                                             use_fc_norm=False),
}


def perturb(model, seed=0, zero_bias=False):
    """Every parameter moved by N(0, 0.1²), the relative position bias tables drawn from N(0, 1) (timm starts them
    at zero) and the layer scales moved to ~0.5 ± 0.1, so that no term vanishes. ``zero_bias``: every additive bias
    zero (patch projection, q/v biases, projections, MLP, LayerNorm shifts, head); the score biases stay."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif zero_bias and (name.endswith("bias") or name.endswith("_bias")):
                p.zero_()
            else:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
                if name.split(".")[-1] in ("gamma_1", "gamma_2"):
                    p.add_(0.5 - p.mean())
    return model


def small_beit(config="rel-pos+layer-scale+avg", dtype=torch.float32, seed=0, zero_bias=False, **kw):
    torch.manual_seed(seed)
    model = Beit(**{**SMALL, **CONFIGS[config], **kw}).eval()
    return perturb(model, seed, zero_bias).to(dtype)


# -- canonization: exact forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_exact(config):
    model = small_beit(config)
    x = image(3)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5
    model64 = model.double()
    with torch.no_grad():
        assert relative(lrpkit.canonize(model64)(x.double()), model64(x.double())) < 1e-10


def test_forward_is_exact_with_separate_qkv_bias_and_a_nonzero_k_bias():
    """timm adds the q/v bias after the projection when ``qkv_bias_separate`` (its Block never sets it; a user
    may): the same affine map as the folded Linear. ``k_bias`` is a zero buffer in timm; whatever it holds is
    folded in too."""
    model = small_beit(dtype=torch.float64)
    for block in model.blocks:
        block.attn.qkv_bias_separate = True
        block.attn.k_bias.normal_()
    x = image(2, dtype=torch.float64)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-10
    qkv = lrpkit.canonize(model)[3].inner[2].qkv
    attn = model.blocks[0].attn
    assert torch.equal(qkv.bias, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))


def test_unfused_attention_is_the_same_model():
    model = small_beit(dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-10
        assert relative(model(x), fused) < 1e-12


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beitv2_base_patch16_224"])
def test_named_models_forward_is_exact(name):
    """The named models' layout (768 wide, 12 heads, relative position bias, layer scale, avg + fc_norm) with one
    block (the others are the same)."""
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, depth=1, num_classes=7).eval())
    x = image(1, size=224)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5


def test_chain_layout():
    model = small_beit()
    chain = lrpkit.canonize(model)
    kinds = [type(layer).__name__ for layer in chain]
    assert kinds == ["Conv2d", "PatchFlatten", "ClassToken", "SkipConnection", "SkipConnection", "SkipConnection",
                     "SkipConnection", "TokenMean", "LayerNormalize", "Scale", "Linear"]
    attn = chain[3].inner
    assert [type(layer).__name__ for layer in attn] == ["LayerNormalize", "Scale", "SelfAttention", "Scale"]
    assert torch.equal(attn[2].attn_bias, model.blocks[0].attn._get_rel_pos_bias())  # (1, heads, 17, 17)
    assert attn[2].attn_bias.shape == (1, 2, 17, 17)
    assert torch.equal(attn[3].weight, model.blocks[0].gamma_1)
    assert chain[7].start == 1  # the mean leaves the class token out
    assert chain.names[3] == "blocks.0.attn" and chain.names[-1] == "head"
    token = lrpkit.canonize(small_beit("abs-pos+token"))
    assert [type(layer).__name__ for layer in token][:4] == ["Conv2d", "PositionalEmbedding", "PatchFlatten",
                                                             "ClassToken"]
    assert isinstance(token[-2], SelectClassToken) and token[3].kinds == ["class"]
    assert token[4].inner[2].attn_bias is None  # no relative position bias


def test_family_is_registered():
    model = small_beit()
    family = family_of(model)
    assert family.name == "timm-beit"
    geometry = family.geometry(model, None)
    assert geometry.patch_size == (8, 8) and geometry.num_prefix == 1 and geometry.global_attention
    assert "transformer-attribution" in family.methods
    composite = family.composite(lrpkit.canonize(model))
    rules = [type(slot.rule).__name__ for slot in composite.assign(lrpkit.canonize(model))
             if isinstance(slot.layer, SelfAttention)]
    assert rules == ["SelfAttentionRule", "SelfAttentionRule"]  # CP-LRP
    assert all(slot.rule.mode == "cp" for slot in composite.assign(lrpkit.canonize(model))
               if isinstance(slot.rule, SelfAttentionRule))


@pytest.mark.parametrize("kw, needle", [
    (dict(use_shared_rel_pos_bias=True), "use_shared_rel_pos_bias"),
    (dict(swiglu_mlp=True), "SwiGLU"),
    (dict(global_pool=""), "global_pool=''"),
    (dict(norm_layer=timm.layers.RmsNorm), "RmsNorm"),
])
def test_unsupported_options_are_clear_errors(kw, needle):
    torch.manual_seed(0)
    model = Beit(**{**SMALL, **kw}).eval()
    with pytest.raises(CanonizationError, match=needle):
        lrpkit.canonize(model)


def test_subclass_that_overrides_forward_is_refused():
    class Other(Beit):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x * 2, pre_logits)

    torch.manual_seed(0)
    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(Other(**SMALL).eval())


def test_another_image_size_is_a_clear_error():
    # the relative position bias is laid out for the 4x4 grid of 32 px: 48 px (6x6 patches, 37 tokens) cannot be
    # explained; timm itself refuses the size in its patch embedding
    x = image(1, size=48)
    with pytest.raises(AssertionError):
        small_beit()(x)
    for config, message in (("rel-pos+layer-scale+avg", "fixed to 17 tokens, but the input gives 37"),
                            ("abs-pos+token", "6x6 patch grid but the model was built for 4x4")):
        with pytest.raises(ValueError, match=message):
            lrpkit.LRP(small_beit(config))(x)


def test_model_is_untouched():
    model = small_beit().train()
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training mode"):
        e = lrpkit.LRP(model)(image(1))
    assert torch.isfinite(e.relevance).all()
    assert model.training and not calls
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(model.blocks[0]._forward_hooks) == 1


# -- the reference: gradient × input of the patched timm model ------------------------------------------------------

def _attention(self, x, shared_rel_pos_bias=None, mode="cp"):
    """timm BEiT's attention from its own parameters, with A detached (cp) or half gradients through both factors
    of ``q kᵀ`` and ``A v`` (attnlrp); the relative position bias is a constant summand of the scores."""
    B, N, _ = x.shape
    bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
    q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    if mode == "attnlrp":
        q, k = half_grad(q), half_grad(k)
    scores = (q * self.scale) @ k.transpose(-2, -1)
    if self.relative_position_bias_table is not None:
        scores = scores + self._get_rel_pos_bias()
    attn = scores.softmax(-1)
    y = attn.detach() @ v if mode == "cp" else half_grad(attn) @ half_grad(v)
    return self.proj(y.transpose(1, 2).reshape(B, N, -1))


def patched(model, mode):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, LayerNorm):
            m.forward = types.MethodType(layer_norm_detached, m)
        elif isinstance(m, torch.nn.GELU):
            m.forward = types.MethodType(ratio_forward, m)
        elif isinstance(m, Attention):
            m.forward = types.MethodType(lambda self, x, shared_rel_pos_bias=None: _attention(self, x, mode=mode), m)
    return ref


def reference_relevance(model, x, mode):
    relevance, target, _ = gradient_times_input(patched(model, mode), model, x)
    return relevance, target


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_lrp_equals_gradient_times_input_of_the_patched_model(config, mode):
    model = small_beit(config, dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    ref, target = reference_relevance(model, x, mode)
    preset = presets.CPLRP if mode == "cp" else presets.AttnLRP
    deviation = {}
    for eps in (1e-16, 1e-8):
        e = lrpkit.LRP(model, preset(epsilon=eps))(x, normalize_output=False)  # LRP-ε on the first layer too
        assert torch.equal(e.target, target)
        deviation[eps] = relative(e.relevance, ref)
    assert deviation[1e-16] < 1e-11, deviation
    # the deviation comes from ε and scales with it: ε 1e-8 / 1e-16 = 1e8 (measured 0.99e8 .. 1.0e8)
    assert 1e6 < deviation[1e-8] / deviation[1e-16] < 1e10, deviation


# -- the accounting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["rel-pos+layer-scale+avg", "both-pos+no-qkv-bias+token-fc-norm"])
def test_accounting_of_a_bias_free_beit(config):
    # Every additive bias zero and ε = 1e-16 in float64. CP-LRP: nothing is lost, the relative position biases get
    # nothing (A is constant); the output relevance is in the input, the class token and the positional embedding.
    # AttnLRP: the relative position biases keep their share of the scores (attention_bias), the softmax loses its
    # bias term (attention); with the input, the class token and the embedding that is all of the output.
    model = small_beit(config, dtype=torch.float64, zero_bias=True)
    x = image(2, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    for preset in (presets.CPLRP, presets.AttnLRP):
        e = lrpkit.LRP(model, preset(epsilon=1e-16))(x, normalize_output=False)
        acc, out = e.accounting, e.accounting.output
        for sink in ("bias", "stabilizer"):
            assert torch.allclose(acc.parts.get(sink, zero), zero, atol=1e-7 * out.abs().max()), (preset, sink)
        explained = acc.input + acc.parts["class_token"] + acc.parts.get("positional_embedding", zero)
        if preset is presets.AttnLRP:
            assert (acc.parts["attention_bias"].abs() > 1e-4 * out.abs()).all()  # a real share
            explained = explained + acc.parts["attention_bias"] + acc.parts["attention"]
        else:
            assert "attention_bias" not in acc.parts
        assert torch.allclose(explained, out, rtol=1e-5, atol=0)
        # the relative position biases' share, block by block
        per_block = [parts.get("attention_bias") for _, name, parts in acc.layers if name.endswith(".attn")]
        assert len([p for p in per_block if p is not None]) == (2 if preset is presets.AttnLRP else 0)


# -- presets, batches, edge inputs ----------------------------------------------------------------------------------

def test_batch_independence():
    model = small_beit()
    x = image(3)
    for preset in (presets.CPLRP, presets.AttnLRP):
        lrp = lrpkit.LRP(model, preset())
        batch = lrp(x).relevance
        single = torch.cat([lrp(x[i:i + 1]).relevance for i in range(3)])
        assert torch.allclose(batch, single, rtol=1e-4, atol=1e-6 * single.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP", "EpsilonPlusFlat"])
def test_finite_for_edge_inputs(preset, dtype):
    model = small_beit().to(dtype)
    x = image(1)
    batch = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x]).to(dtype)
    e = lrpkit.LRP(model, getattr(presets, preset)())(batch)
    assert e.relevance.dtype == dtype and torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())
    if preset != "EpsilonPlusFlat":  # (the flat rule spreads relevance over the receptive field, input or not)
        assert not e.relevance[0].any()  # the zero image: R = x ⊙ (...) = 0


# -- the attention methods ------------------------------------------------------------------------------------------

METHODS = {"rollout": AttentionRollout, "gradient-rollout": GradientRollout, "raw-attention": RawAttention,
           "attention-gradcam": AttentionGradCAM, "generic-attention": GenericAttention,
           "transformer-attribution": TransformerAttribution, "partial-lrp": PartialLRP}


@pytest.mark.parametrize("config", ["rel-pos+layer-scale+avg", "abs-pos+token"])
@pytest.mark.parametrize("method", METHODS)
def test_attention_methods_run_per_sample(method, config):
    model = small_beit(config, dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    explainer = METHODS[method](model)
    batch = explainer(x)
    assert batch.token_relevance.shape == (2, 4, 4) and torch.isfinite(batch.token_relevance).all()
    assert batch.token_relevance.abs().max() > 0
    single = explainer(x[1:])
    assert torch.allclose(batch.token_relevance[1], single.token_relevance[0], rtol=1e-8, atol=1e-12)


def _timm_attention(model, x):
    """The attention probabilities of every block, computed from timm's parameters (bias included)."""
    store = []

    def forward(self, x, shared_rel_pos_bias=None):
        B, N, _ = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            scores = scores + self._get_rel_pos_bias()
        store.append(scores.softmax(-1))
        return self.proj((store[-1] @ v).transpose(1, 2).reshape(B, N, -1))

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(forward, m)
    with torch.no_grad():
        ref(x)
    return store


def test_raw_attention_and_rollout_read_the_mean_of_the_patch_rows():
    # the model averages the patch tokens: the read-out row is 1/16 on each of them
    model = small_beit(dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    attns = _timm_attention(model, x)
    w = torch.full((17,), 1 / 16, dtype=torch.float64)
    w[0] = 0
    raw = torch.einsum("n,bhnm->bm", w, attns[-1]) / 2
    assert torch.allclose(RawAttention(model)(x).token_relevance.flatten(1), raw[:, 1:], rtol=1e-10)
    eye = torch.eye(17, dtype=torch.float64)
    rollout = None
    for a in attns:
        a = (a.mean(1) + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert torch.allclose(AttentionRollout(model)(x).token_relevance.flatten(1), (w @ rollout)[:, 1:], rtol=1e-10)


def _lin(x, layer, R):
    """α1β0 without bias, the direct way: z+ = x+ W+ + x- W-, R_in = x+ (s W+) + x- (s W-)."""
    w = layer.weight
    pw, nw, px, nx = w.clamp(min=0), w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(R, F.linear(px, pw) + F.linear(nx, nw))
    return px * (s @ pw) + nx * (s @ nw)


def _add(a, b, R):
    """Chefer et al.'s sum rule: gradient × input split, both shares rescaled to |Σa| / (|Σa| + |Σb|) · ΣR."""
    s = safe_divide(R, a + b)
    ra, rb = a * s, b * s
    sa, sb = ra.sum(), rb.sum()
    den = sa.abs() + sb.abs() + 1e-9
    return ra * (sa.abs() / den * R.sum() / sa), rb * (sb.abs() / den * R.sum() / sb)


def chefer_reference(model: Beit, x: torch.Tensor, target: int, start_layer: int):
    """One image: Chefer et al.'s transformer attribution and partial LRP written out on timm's Beit (patch tokens
    averaged by the head, a relative position bias per block, layer scale)."""
    H = model.blocks[0].attn.num_heads
    with torch.enable_grad():
        t = torch.cat([model.cls_token, model.patch_embed(x)], 1)
        saved, attns = [], []
        for blk in model.blocks:
            a = blk.attn
            h = blk.norm1(t)
            qkv = F.linear(h, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))
            q, k, v = qkv.reshape(1, -1, 3, H, qkv.shape[-1] // (3 * H)).permute(2, 0, 3, 1, 4)
            bias = a._get_rel_pos_bias()
            A = ((q * a.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
            y = (A @ v).transpose(1, 2).reshape(1, -1, qkv.shape[-1] // 3)
            o = blk.gamma_1 * a.proj(y)
            t1 = t + o
            h2 = blk.norm2(t1)
            g = blk.mlp.act(blk.mlp.fc1(h2))
            f2 = blk.gamma_2 * blk.mlp.fc2(g)
            saved.append(dict(t=t, h=h, q=q, k=k, v=v, bias=bias, A=A, y=y, o=o, t1=t1, h2=h2, g=g, f2=f2))
            attns.append(A)
            t = t1 + f2
        pooled = t[:, 1:].mean(1)
        out = model.head(model.fc_norm(pooled))
        grads = torch.autograd.grad(out[0, target], attns)
    with torch.no_grad():
        R = _lin(model.fc_norm(pooled), model.head, F.one_hot(torch.tensor([target]), out.shape[1]).to(x))
        R = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:] / 16 * safe_divide(R, pooled)[:, None]], 1)  # the mean
        cams = []
        for blk, s in zip(reversed(model.blocks), reversed(saved)):
            ra, rb = _add(s["t1"], s["f2"], R)
            rb = _lin(s["g"], blk.mlp.fc2, rb)  # the layer scale passes
            rb = _lin(s["h2"], blk.mlp.fc1, rb)
            R = ra + rb
            ra, rb = _add(s["t"], s["o"], R)
            rb = _lin(s["y"], blk.attn.proj, rb).reshape(1, -1, H, s["v"].shape[-1]).transpose(1, 2)
            S = safe_divide(rb, s["A"] @ s["v"])
            R_A, R_v = s["A"] * (S @ s["v"].transpose(-2, -1)) / 2, s["v"] * (s["A"].transpose(-2, -1) @ S) / 2
            cams.insert(0, R_A)
            dots = s["q"] @ s["k"].transpose(-2, -1)
            R_P, _ = _add(dots * blk.attn.scale, s["bias"], R_A)  # the bias keeps its share of the scores
            S = safe_divide(R_P, dots)
            R_q, R_k = s["q"] * (S @ s["k"]) / 2, s["k"] * (S.transpose(-2, -1) @ s["q"]) / 2
            R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(1, -1, 3 * R_q.shape[-1] * H)
            R = ra + _lin(s["h"], blk.attn.qkv, R_qkv)
        n = t.shape[1]
        w = torch.full((n,), 1 / (n - 1), dtype=x.dtype)
        w[0] = 0
        mats = [torch.eye(n, dtype=x.dtype) + (g[0] * c[0]).clamp(min=0).mean(0) for g, c in zip(grads, cams)]
        joint = torch.eye(n, dtype=x.dtype)
        for m in mats[start_layer:]:
            joint = m @ joint
        partial = w @ cams[-1][0].clamp(min=0).mean(0)
    return (w @ joint)[1:], partial[1:]


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_matches_an_independent_implementation(start_layer):
    model = small_beit(dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    targets = [1, 3]
    expl = TransformerAttribution(model, start_layer=start_layer)(x, target=targets)
    partial = PartialLRP(model)(x, target=targets)
    for i in range(2):
        ref_map, ref_partial = chefer_reference(model, x[i:i + 1], targets[i], start_layer)
        assert torch.allclose(expl.token_relevance[i].flatten(), ref_map, rtol=1e-8, atol=0)
        assert torch.allclose(partial.token_relevance[i].flatten(), ref_partial, rtol=1e-8, atol=0)


def test_chefer_lrp_accounts_for_the_relative_position_biases():
    model = small_beit(dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    e = lrpkit.LRP(model, chefer_composite())(x)
    acc = e.accounting
    assert len(e.extras[ATTENTION_RELEVANCE]) == 2
    assert (acc.parts["attention_bias"].abs() > 1e-6).all()
    assert set(acc.parts) <= {"class_token", "attention_bias", "stabilizer"}
    assert acc.parts["stabilizer"].abs().max() < 1e-6
    assert torch.allclose(acc.total(), torch.ones(2, dtype=torch.float64))


# -- the command line -----------------------------------------------------------------------------------------------

@pytest.fixture
def one_block_beit_base(monkeypatch):
    """``timm.create_model('beit_base_patch16_224', ...)`` with one block: the named model's configuration and code
    path (the command line builds it by name), at a twelfth of the cost."""
    original = timm.create_model

    def create(name, *args, **kwargs):
        if name == "beit_base_patch16_224":
            kwargs.setdefault("depth", 1)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def test_cli_explains_and_evaluates_a_named_beit_with_local_weights(tmp_path, capsys, one_block_beit_base):
    """``lrpkit explain --model beit_base_patch16_224 --weights w.safetensors``: timm's name, its data config
    (224 px, mean 0.5), the 4-class head from the file, and the saved relevance equal to the Python API's; then
    ``lrpkit evaluate`` with the same model and the transformer methods."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from lrpkit import catalog, cli

    torch.manual_seed(5)
    source = perturb(timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=4).eval())
    assert len(source.blocks) == 1
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    pixels = (torch.rand(3, 240, 250) * 255).round().to(torch.uint8)
    picture = tmp_path / "img.png"
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(picture)
    out = tmp_path / "out"
    code = cli.main(["explain", str(picture), "--model", "beit_base_patch16_224", "--weights", str(weights),
                     "--method", "lrp", "transformer-attribution", "--save-relevance", "npy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" not in captured.err
    with Image.open(out / "lrp" / "img.png") as png:
        assert png.size == (224, 224)
    model, prep = catalog.load_model("beit_base_patch16_224", weights)
    assert prep.mean == (0.5, 0.5, 0.5)
    x = prep.normalize(prep.load(picture))[None]
    assert relative(model(x).detach(), source(x).detach()) < 1e-6  # the weights came from the file
    expected = catalog.make_method("lrp", model, prep, 0)(x, None)
    saved = np.load(out / "lrp" / "img.relevance.npy")
    scale = float(expected.relevance.abs().max())
    assert np.allclose(saved, expected.relevance[0].numpy(), rtol=1e-4, atol=1e-6 * scale)
    code = cli.main(["evaluate", "--model", "beit_base_patch16_224", "--weights", str(weights), "--n", "1",
                     "--steps", "2", "--deletion-steps", "2", "--method", "lrp", "attnlrp", "transformer-attribution",
                     "rollout", "--out", str(tmp_path / "ev"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {line.split()[0] for line in captured.out.splitlines()[2:] if line.strip()}
    assert {"lrp", "attnlrp", "transformer-attribution", "rollout"} <= rows


def test_gradient_methods_and_vitcx_run():
    from lrpkit.methods import Gradient, InputXGradient, IntegratedGradients, SmoothGrad, ViTCX

    model = small_beit(dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    for method in (Gradient(model), InputXGradient(model), IntegratedGradients(model, steps=4),
                   SmoothGrad(model, n=2, seed=0)):
        expl = method(x)
        assert expl.relevance.shape == x.shape and torch.isfinite(expl.relevance).all()
    expl = ViTCX(model, seed=0, progress=False)(x)
    assert expl.heatmap.shape == (2, 32, 32) and torch.isfinite(expl.heatmap).all()
