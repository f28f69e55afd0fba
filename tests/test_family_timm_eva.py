"""The ``timm-eva`` family: timm's ``Eva`` (EVA-02) canonized exactly, LRP on it, and CP-LRP / AttnLRP with ε → 0
against an independent reference.

The reference is gradient × input of the SAME timm model instance (a deep copy) whose modules are patched, nothing
of lrpkit used to build it:

- every LayerNorm (block norms, qk-norm, the SwiGLU's inner norm, fc_norm) with σ detached (μ keeps its gradient);
- ``EvaAttention`` re-implemented from its own parameters with timm's ``apply_rot_embed_cat`` for the rotary
  embedding: CP detaches the attention probabilities; AttnLRP keeps the softmax's gradient and halves the
  gradient through both factors of ``q kᵀ`` and of ``A v``;
- ``GluMlp`` / ``SwiGLU``: CP detaches the gate ``act(...)``; AttnLRP halves the gradient through both factors of
  ``act(x W_g) ⊙ x W_u``;
- every element-wise activation (SiLU of the gate, GELU of a plain MLP) computes ``x · (f(x)/x).detach()``: it
  passes ``f(x)/x`` backward, as LRP passes its relevance unchanged.
"""

import copy
import math
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLU, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention

import lrpkit
from lrpkit import Composite, GlobalTypeMap, presets
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import Chain, Multiply, Rotary, SelfAttention
from lrpkit.rules import EpsilonRule, PassRule, ProductRule, SelfAttentionRule
from helpers import image as normal_image, relative
from reference_patches import gradient_times_input, half_grad, ratio, ratio_forward

D = torch.float64
BASE = dict(img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=5, mlp_ratio=4 * 2 / 3,
            use_rot_pos_emb=True, ref_feat_shape=(16, 16))

CONFIGS = {
    # EVA-02 tiny / small: packed SwiGLU (GluMlp, gate_last=False), fused qkv with q_bias / v_bias, avg + fc_norm
    "glu+fused-qkv": dict(swiglu_mlp=True),
    # EVA-02 base / large: SwiGLU with its inner LayerNorm (scale_mlp), separate q/k/v projections
    "swiglu+scale_mlp+separate-qkv": dict(swiglu_mlp=True, scale_mlp=True, qkv_fused=False),
    # the other options of the class: half-layout RoPE, qk-norm, layer scale, registers, no qkv bias
    "half-rope+qk-norm+layer-scale+registers": dict(swiglu_mlp=True, rope_rotate_half=True, qk_norm=True,
                                                     init_values=0.3, num_reg_tokens=2),
    "token-pool+pre-norm+no-embed-class": dict(swiglu_mlp=True, scale_mlp=True, global_pool="token",
                                               use_pre_transformer_norm=True, no_embed_class=True),
    "gelu-mlp+no-qkv-bias+28px-patch7": dict(qkv_bias=False, img_size=28, patch_size=7, ref_feat_shape=None),
    "glu-separate-qkv+56px-no-rope": dict(swiglu_mlp=True, qkv_fused=False, img_size=56, use_rot_pos_emb=False),
}


def perturb(model, seed=0, zero_bias=False):
    """Every parameter moved by N(0, 0.1²) (LayerNorm weights 1 ± 0.1, q/v biases, layer scale and tokens
    non-zero), so that no term vanishes by accident. ``zero_bias``: every bias set to zero instead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_bias and name.rsplit(".", 1)[-1] in ("bias", "q_bias", "v_bias"):
                p.zero_()
            else:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def small_eva(config="glu+fused-qkv", dtype=torch.float32, seed=0, zero_bias=False, **kw):
    torch.manual_seed(seed)
    model = Eva(**{**BASE, **CONFIGS[config], **kw}).eval()
    return perturb(model, seed, zero_bias).to(dtype)


def image(batch=2, size=BASE["img_size"], dtype=torch.float32, seed=1):
    return normal_image(batch, size, dtype, seed)


def size_of(config):
    return {**BASE, **CONFIGS[config]}["img_size"]


# -- canonization: exact forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_exact(config):
    model = small_eva(config)
    x = image(3, size_of(config))
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5
    model64 = model.double()
    with torch.no_grad():
        assert relative(lrpkit.canonize(model64)(x.double()), model64(x.double())) < 1e-10


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "eva02_small_patch14_224", "eva02_base_patch14_224",
                                  "eva02_large_patch14_224"])
def test_named_models_forward_is_exact(name):
    """The named models' own options (one block, a 56 px input): GluMlp and fused qkv for tiny / small, SwiGLU with
    scale_mlp and separate q/k/v for base / large; a head of 3 classes (their default, num_classes=0, has none)."""
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, depth=1, img_size=56, num_classes=3).eval())
    x = image(2, 56)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model)(x), model(x)) < 1e-5
    assert isinstance(model.blocks[0].mlp, SwiGLU if "base" in name or "large" in name else GluMlp)


def test_the_rotary_embedding_matters_and_is_timms():
    """The canonized Rotary is timm's apply_rot_embed_cat, prefix tokens unrotated, in both layouts."""
    torch.manual_seed(0)
    for half in (False, True):
        emb = torch.randn(6, 8)  # (N − P, 2d): sin | cos as timm's RotaryEmbeddingCat.get_embed() concatenates
        t = torch.randn(2, 3, 7, 4)  # (B, H, N = P + 6, d) with P = 1
        rope = Rotary(*emb.chunk(2, -1), num_prefix=1, half=half)
        expected = torch.cat([t[:, :, :1], apply_rot_embed_cat(t[:, :, 1:], emb, half=half)], dim=2)
        assert torch.equal(rope(t), expected)
        # its transpose (what the AttnLRP rule passes relevance back through) is autograd's vector-Jacobian product
        s = torch.randn_like(t)
        tr = t.clone().requires_grad_(True)
        (vjp,) = torch.autograd.grad(rope(tr), tr, s)
        assert torch.allclose(rope.transpose(s), vjp, atol=1e-6) and torch.equal(rope.transpose(s)[:, :, :1],
                                                                                   s[:, :, :1])
    # without its rotary embedding the canonized model computes something else: the rotation is not a no-op
    model = small_eva()
    chain = lrpkit.canonize(model)
    for layer in chain.modules():
        if isinstance(layer, SelfAttention):
            assert isinstance(layer.rope, Rotary) and layer.rope.num_prefix == 1 and not layer.rope.half
            layer.rope = torch.nn.Identity()
    x = image(2)
    with torch.no_grad():
        assert relative(chain(x), model(x)) > 1e-3


def test_chain_layout():
    model = small_eva("half-rope+qk-norm+layer-scale+registers")
    chain = lrpkit.canonize(model)
    assert [type(m).__name__ for m in chain[:4]] == ["Conv2d", "PositionalEmbedding", "PatchFlatten", "ClassToken"]
    assert chain[3].kinds == ["class", "register", "register"]
    attn, mlp = chain[4], chain[5]
    assert [type(m).__name__ for m in attn.inner] == ["LayerNormalize", "Scale", "SelfAttention", "Scale"]
    assert [type(m).__name__ for m in mlp.inner] == ["LayerNormalize", "Scale", "Multiply", "Linear", "Scale"]
    sa = attn.inner[2]
    assert sa.rope.half and sa.rope.num_prefix == 3 and isinstance(sa.q_norm, torch.nn.LayerNorm)
    # the fused qkv: [W_q; W_k; W_v] with bias [q_bias; 0; v_bias]
    timm_attn = model.blocks[0].attn
    assert torch.equal(sa.qkv.weight, timm_attn.qkv.weight)
    assert torch.equal(sa.qkv.bias, torch.cat([timm_attn.q_bias, torch.zeros(32), timm_attn.v_bias]))
    # GluMlp with gate_last=False: act(x1) ⊙ x2, the gate is the FIRST half of fc1's rows
    glu, fc1 = mlp.inner[2], model.blocks[0].mlp.fc1
    assert not model.blocks[0].mlp.gate_last
    assert [type(m).__name__ for m in glu.gate] == ["Linear", "SiLU"] and len(glu.signal) == 1
    h = fc1.out_features // 2
    assert torch.equal(glu.gate[0].weight, fc1.weight[:h]) and torch.equal(glu.signal[0].weight, fc1.weight[h:])
    assert torch.equal(mlp.inner[-1].weight, model.blocks[0].gamma_2)
    assert [type(m).__name__ for m in chain[-4:]] == ["TokenMean", "LayerNormalize", "Scale", "Linear"]
    assert chain[-4].start == 3 and chain.names[-1] == "head"
    # SwiGLU: the gate is act(fc1_g x); the inner LayerNorm before fc2 stays a LayerNormalize + Scale
    model = small_eva("swiglu+scale_mlp+separate-qkv")
    mlp = lrpkit.canonize(model)[5].inner
    assert [type(m).__name__ for m in mlp] == ["LayerNormalize", "Scale", "Multiply", "LayerNormalize", "Scale",
                                               "Linear"]
    timm_mlp = model.blocks[0].mlp
    assert torch.equal(mlp[2].gate[0].weight, timm_mlp.fc1_g.weight)
    assert torch.equal(mlp[2].signal[0].weight, timm_mlp.fc1_x.weight)
    a = model.blocks[0].attn
    sa = lrpkit.canonize(model)[4].inner[2]
    assert torch.equal(sa.qkv.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    assert torch.equal(sa.qkv.bias, torch.cat([a.q_proj.bias, torch.zeros(32), a.v_proj.bias]))


def test_a_glu_with_the_gate_last_takes_the_second_half():
    from timm.layers import GluMlp

    model = small_eva()
    for block in model.blocks:
        old = block.mlp
        block.mlp = GluMlp(32, old.fc1.out_features, act_layer=torch.nn.SiLU, gate_last=True).eval()
        block.mlp.load_state_dict(old.state_dict())
    x = image(2)
    chain = lrpkit.canonize(model)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5
    h = model.blocks[0].mlp.fc1.out_features // 2
    assert torch.equal(chain[5].inner[2].gate[0].weight, model.blocks[0].mlp.fc1.weight[h:])


def test_family_is_registered():
    model = small_eva()
    family = family_of(model)
    assert family.name == "timm-eva"
    geometry = family.geometry(model, None)
    assert (geometry.patch_size, geometry.num_prefix, geometry.global_attention) == ((14, 14), 1, True)
    assert family.geometry(small_eva("half-rope+qk-norm+layer-scale+registers"), None).num_prefix == 3
    rules = {type(s.layer): s.rule for s in family.composite(lrpkit.canonize(model)).assign(lrpkit.canonize(model))}
    assert rules[SelfAttention].mode == "cp" and rules[Multiply].mode == "gate"  # CP-LRP
    assert "transformer-attribution" not in family.methods and "lrp" in family.methods


@pytest.mark.parametrize("kw, needle", [
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(rope_type="mixed"), "RotaryEmbeddingMixed"),
    (dict(rope_type="dinov3"), "RotaryEmbeddingDinoV3"),
    (dict(rope_type="mrope"), "RotaryEmbeddingMRope"),
    (dict(attn_type="rope"), "AttentionRope"),
    (dict(scale_attn_inner=True), "scale_attn_inner"),
    (dict(use_post_norm=True), "EvaBlockPostNorm"),
    (dict(global_pool="map"), "map"),
    (dict(global_pool="avgmax"), "avgmax"),
    (dict(global_pool=""), "global_pool=''"),
    (dict(norm_layer=timm.layers.RmsNorm), "RmsNorm"),
    (dict(dynamic_img_pad=True), "dynamic_img_pad"),
])
def test_unsupported_options_are_clear_errors(kw, needle):
    torch.manual_seed(0)
    model = Eva(**{**BASE, "depth": 1, **kw}).eval()
    with pytest.raises(CanonizationError, match=needle):
        lrpkit.canonize(model)


def test_gated_attention_and_subclasses_are_refused():
    model = small_eva()
    model.blocks[1].attn.gate = torch.nn.Linear(32, 32)
    with pytest.raises(CanonizationError, match="gated attention"):
        lrpkit.canonize(model)

    class Other(Eva):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x * 2, pre_logits)

    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(Other(**BASE).eval())


def test_model_is_untouched():
    model = small_eva("swiglu+scale_mlp+separate-qkv").train()
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training"):
        e = lrpkit.LRP(model, presets.AttnLRP())(image(1))
    assert torch.isfinite(e.relevance).all()
    assert model.training and not calls
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(model.blocks[0]._forward_hooks) == 1


# -- hand-derived tiny cases ----------------------------------------------------------------------------------------

EPS = 1e-12
LN3 = math.log(3.0)


def t(x):
    return torch.tensor(x, dtype=D)


def _rope_attention(rope: bool):
    """Single-head SelfAttention on d = 2, scale 1, identity output projection, with W_q = (ln3/2)·[[1, 1], [0, 0]],
    W_k = [[0, 0], [0, 1]], W_v = [[1, 1], [2, 1]]; ``rope``: a Rotary that leaves token 1 (angle 0: cos 1,
    sin 0) and turns token 2 by 90° (cos 0, sin 1): ``[a, b] ↦ [−b, a]``."""
    qkv = torch.nn.Linear(2, 6, bias=False).double()
    proj = torch.nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        qkv.weight.copy_(t([[LN3 / 2, LN3 / 2], [0, 0], [0, 0], [0, 1], [1, 1], [2, 1]]))
        proj.weight.copy_(torch.eye(2, dtype=D))
    rotary = Rotary(sin=t([[0, 0], [1, 1]]), cos=t([[1, 1], [0, 0]])) if rope else None
    return SelfAttention(qkv, proj, num_heads=1, scale=1.0, rope=rotary)


# tokens x1 = [1, 1], x2 = [1, −1]:
#   q1 = [ln3, 0], q2 = [0, 0]; k1 = [0, 1], k2 = [0, −1]; v1 = [2, 3], v2 = [0, 1]
#   the rotary embedding: q1' = q1, k1' = k1 (angle 0); q2' = 0; k2' = [−k2_1, k2_0] = [1, 0]
#   S = q' k'ᵀ: S11 = q1'·k1' = 0, S12 = q1'·k2' = ln3, S2j = 0 (q2' = 0)   (without RoPE S12 = q1·k2 = 0)
#   A = softmax(S) = [[1/4, 3/4], [1/2, 1/2]]
#   y = A v: y1 = 1/4·[2, 3] + 3/4·[0, 1] = [1/2, 3/2], y2 = 1/2·[2, 3] + 1/2·[0, 1] = [1, 2]; out = y
X_ROPE = [[[1.0, 1.0], [1.0, -1.0]]]
R_ROPE = [[[1.0, 2.0], [3.0, -1.0]]]  # ΣR = 5


def test_rope_attention_forward_by_hand():
    out, attn = _rope_attention(True)(t(X_ROPE), return_attention=True)
    assert torch.allclose(attn, t([[[[0.25, 0.75], [0.5, 0.5]]]]))
    assert torch.allclose(out, t([[[0.5, 1.5], [1, 2]]]))
    assert torch.allclose(_rope_attention(True)(t(X_ROPE)), out)  # the fused path computes the same


def test_rope_in_attnlrp_by_hand():
    # R_y = R (identity projection). A·v, uniform split: s = R / (2y): s1 = [1/(2·1/2), 2/(2·3/2)] = [1, 2/3],
    #   s2 = [3/2, −1/4]
    #   R_v = v ⊙ Aᵀ s: j=1: 1/4·s1 + 1/2·s2 = [1, 1/24] -> R_v1 = [2, 3] ⊙ that = [2, 1/8]
    #                   j=2: 3/4·s1 + 1/2·s2 = [3/2, 3/8] -> R_v2 = [0, 1] ⊙ that = [0, 3/8]      (Σ = 5/2)
    #   R_A = A ⊙ (s_i·v_j): s1·v1 = 2 + 2 = 4, s1·v2 = 2/3, s2·v1 = 3 − 3/4 = 9/4, s2·v2 = −1/4
    #         R_A = [[1/4·4, 3/4·2/3], [1/2·9/4, 1/2·(−1/4)]] = [[1, 1/2], [9/8, −1/8]]                (Σ = 5/2)
    # softmax R_S = S ⊙ (R_A − A ⊙ Σ_j R_A): only S12 = ln3 ≠ 0; row 1 sums to 3/2:
    #   R_S12 = ln3·(1/2 − 3/4·3/2) = −5/8·ln3
    # q'k'ᵀ, uniform split: s'12 = R_S12 / (2·S12) = −5/16 (s' = 0 where S = 0)
    #   R_q1' = q1' ⊙ s'12·k2' = [ln3, 0] ⊙ −5/16·[1, 0] = [−5ln3/16, 0]
    #   R_k2' = k2' ⊙ s'12·q1' = [1, 0] ⊙ −5/16·[ln3, 0] = [−5ln3/16, 0]; the other tokens' R_q', R_k' = 0
    # the rotary embedding, LRP-ε through the linear map y' = J x: R_x = x ⊙ Jᵀ(R' / y')
    #   token 1 (angle 0, J = I): R_q1 = R_q1'
    #   token 2 (90°, J = [[0, −1], [1, 0]], Jᵀ s = [s_1, −s_0]): k2 = [0, −1], k2' = [1, 0],
    #   R'/k2' = [−5ln3/16, 0/stab(0) = 0], Jᵀ·that = [0, 5ln3/16], R_k2 = k2 ⊙ that = [0, −5ln3/16]:
    #   the rotation moves the key's relevance from its channel 0 (after) to channel 1 (before); it conserves
    # qkv projection (ε): R_x = x ⊙ (W_qᵀ R_q/q + W_kᵀ R_k/k + W_vᵀ R_v/v)
    #   q: token 1: R_q1/q1 = [−5/16, 0]; W_qᵀ·that = (ln3/2)·(−5/16)·[1, 1]; ⊙ x1 = −5ln3/32·[1, 1]
    #   k: token 2: R_k2/k2 = [0, 5ln3/16]; W_kᵀ·that = [0, 5ln3/16]; ⊙ x2 = [0, −5ln3/16]
    #   v: token 1: R_v1/v1 = [1, 1/24]; W_vᵀ·that = [1 + 2/24, 1 + 1/24] = [13/12, 25/24]; ⊙ x1 = same
    #      token 2: R_v2/v2 = [0, 3/8];  W_vᵀ·that = [3/4, 3/8]; ⊙ x2 = [3/4, −3/8]
    #   R_x1 = [13/12 − 5ln3/32, 25/24 − 5ln3/32], R_x2 = [3/4, −3/8 − 5ln3/16]
    # Σ R_x = 5/2 − 5ln3/8 (the score path carries R_S12 = −5ln3/8); the softmax's loss, 5/2 + 5ln3/8, is the
    # "attention" sink
    composite = Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule(EpsilonRule(EPS), EpsilonRule(EPS),
                                                                          mode="attnlrp", epsilon=EPS)}))
    e = lrpkit.LRP(Chain([_rope_attention(True)]).eval(), composite)(t(X_ROPE), R=t(R_ROPE))
    expected = t([[[13 / 12 - 5 * LN3 / 32, 25 / 24 - 5 * LN3 / 32], [3 / 4, -3 / 8 - 5 * LN3 / 16]]])
    assert torch.allclose(e.relevance, expected, atol=1e-9)
    assert e.accounting.input.item() == pytest.approx(5 / 2 - 5 * LN3 / 8)
    assert e.accounting.parts["attention"].item() == pytest.approx(5 / 2 + 5 * LN3 / 8)
    # CP on the same layer: the rotary embedding (like q and k) gets nothing; R_v is twice AttnLRP's,
    # R_x = x ⊙ W_vᵀ (R_v / v) = [[13/6, 25/12], [3/2, −3/4]], Σ = 5 = ΣR
    cp = Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule(EpsilonRule(EPS), EpsilonRule(EPS), mode="cp",
                                                                   epsilon=EPS)}))
    e = lrpkit.LRP(Chain([_rope_attention(True)]).eval(), cp)(t(X_ROPE), R=t(R_ROPE))
    assert torch.allclose(e.relevance, t([[[13 / 6, 25 / 12], [3 / 2, -3 / 4]]]), atol=1e-9)


def test_without_rope_the_score_path_of_the_hand_case_is_empty():
    # without the rotation S12 = q1·k2 = [ln3, 0]·[0, −1] = 0: S = 0, A = 1/2 everywhere, and AttnLRP gives the
    # queries and keys nothing (0 / stab(0) = 0): R_x is the value path alone, Σ = 5/2
    composite = Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule(EpsilonRule(EPS), EpsilonRule(EPS),
                                                                          mode="attnlrp", epsilon=EPS)}))
    e = lrpkit.LRP(Chain([_rope_attention(False)]).eval(), composite)(t(X_ROPE), R=t(R_ROPE))
    assert e.accounting.input.item() == pytest.approx(5 / 2)


def _glu():
    """y = (x W_u) ⊙ relu(x W_g) on x = [1, 2] with W_u = [2, 1], W_g = [1, 1]: s = 4, g = relu(3) = 3, y = 12."""
    up, gate = torch.nn.Linear(2, 1, bias=False).double(), torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        up.weight.copy_(t([[2, 1]]))
        gate.weight.copy_(t([[1, 1]]))
    return Chain([Multiply(Chain([up]), Chain([gate, torch.nn.ReLU()]))]).eval()


@pytest.mark.parametrize("mode, expected", [
    # gate held constant: R_s = R = 12; LRP-ε through W_u: R_x = x ⊙ W_u · R_s / s = [1·2·3, 2·1·3] = [6, 6]
    ("gate", [6.0, 6.0]),
    # half to each factor: R_s = R_g = 6; signal: x ⊙ W_u · 6/4 = [3, 3]; gate: the ReLU passes 6, then
    # x ⊙ W_g · 6/3 = [2, 4]; R_x = [5, 7]
    ("uniform", [5.0, 7.0]),
])
def test_product_rule_on_a_gated_linear_unit_by_hand(mode, expected):
    composite = Composite(GlobalTypeMap({Multiply: ProductRule(mode), torch.nn.Linear: EpsilonRule(EPS),
                                         torch.nn.ReLU: PassRule()}))
    e = lrpkit.LRP(_glu(), composite)(t([[1.0, 2.0]]), R=t([[12.0]]))
    assert torch.allclose(e.relevance, t([expected]), atol=1e-9)
    assert e.accounting.input.item() == pytest.approx(12)  # both modes conserve


# -- presets ---------------------------------------------------------------------------------------------------------

PRESETS = {
    "CPLRP": presets.CPLRP,
    "AttnLRP": presets.AttnLRP,
    "CPLRP-gamma": lambda: presets.CPLRP(gamma=0.25),
    "EpsilonPlusFlat": presets.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: presets.EpsilonGammaBox(-3.0, 3.0),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_map_the_product_and_attention_rules(preset):
    model = small_eva("swiglu+scale_mlp+separate-qkv")
    composite = PRESETS[preset]()
    slots = composite.assign(lrpkit.canonize(model))
    attnlrp = preset == "AttnLRP"
    products = [s.rule for s in slots if isinstance(s.layer, Multiply)]
    assert len(products) == 2 and all(type(r) is ProductRule for r in products)
    assert {r.mode for r in products} == {"uniform" if attnlrp else "gate"}
    attention = [s.rule for s in slots if isinstance(s.layer, SelfAttention)]
    assert {r.mode for r in attention} == {"attnlrp" if attnlrp else "cp"}
    e = lrpkit.LRP(model, composite)(image(2))
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    acc = e.accounting
    scale = max([1.0] + [v.abs().max().item() for v in [acc.input, *acc.parts.values()]])
    assert torch.allclose(acc.total(), acc.output, atol=1e-5 * scale)


# -- the reference: gradient × input of the patched timm model ------------------------------------------------------

def _layer_norm(self, x):
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps).detach()
    y = (x - x.mean(-1, keepdim=True)) / sigma
    if self.weight is not None:
        y = y * self.weight
    return y if self.bias is None else y + self.bias


def _attention(mode):
    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        if self.qkv is not None:
            bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
            q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1) \
                .permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=self.rotate_half)], dim=2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=self.rotate_half)], dim=2)
        if mode == "cp":
            y = torch.softmax((q * self.scale) @ k.transpose(-2, -1), -1).detach() @ v
        else:
            attn = torch.softmax(half_grad(q * self.scale) @ half_grad(k).transpose(-2, -1), -1)
            y = half_grad(attn) @ half_grad(v)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))
    return forward


def _gated(mode):
    def forward(self, x):
        if isinstance(self, SwiGLU):
            x_gate, x_up = self.fc1_g(x), self.fc1_x(x)
        else:  # GluMlp: the gate is act(x1) for gate_last=False
            x1, x2 = self.fc1(x).chunk(2, dim=-1)
            x_up, x_gate = (x1, x2) if self.gate_last else (x2, x1)
        gate = ratio(self.act, x_gate)
        h = gate.detach() * x_up if mode == "cp" else half_grad(gate) * half_grad(x_up)
        return self.fc2(self.norm(h))
    return forward


def patched(model, mode):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(_layer_norm, m)
        elif isinstance(m, EvaAttention):
            m.forward = types.MethodType(_attention(mode), m)
        elif isinstance(m, (GluMlp, SwiGLU)):
            m.forward = types.MethodType(_gated(mode), m)
        elif isinstance(m, (torch.nn.GELU, torch.nn.SiLU)):
            m.forward = types.MethodType(ratio_forward, m)
    return ref


def reference_relevance(model, x, mode):
    relevance, target, _ = gradient_times_input(patched(model, mode), model, x)
    return relevance, target


PRESET_OF = {"cp": presets.CPLRP, "attnlrp": presets.AttnLRP}
REFERENCE_CONFIGS = ["glu+fused-qkv", "swiglu+scale_mlp+separate-qkv", "half-rope+qk-norm+layer-scale+registers",
                     "token-pool+pre-norm+no-embed-class", "gelu-mlp+no-qkv-bias+28px-patch7"]


@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
def test_lrp_equals_gradient_times_input_of_the_patched_model(config, mode):
    """CPLRP / AttnLRP with ε → 0 (LRP-ε on the patch projection, the preset's default) is gradient × input of the
    patched model; at ε = 1e-16 to float64 rounding, and the deviation at larger ε comes from ε (it scales with
    it)."""
    model = small_eva(config, dtype=D)
    x = image(2, size_of(config), dtype=D)
    ref, target = reference_relevance(model, x, mode)
    deviation = {}
    for eps in (1e-16, 1e-8, 1e-6):
        e = lrpkit.LRP(model, PRESET_OF[mode](epsilon=eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        deviation[eps] = relative(e.relevance, ref)
    assert deviation[1e-16] < 1e-10, deviation
    # ε 1e-6 / 1e-8 = 100: the deviation grows with ε in proportion (first order in ε)
    assert 20 < deviation[1e-6] / deviation[1e-8] < 500, deviation


def test_named_model_equals_the_reference():
    """eva02_base's layout (SwiGLU with its inner norm, separate q/k/v), one block at 28 px, both modes."""
    torch.manual_seed(0)
    model = perturb(timm.create_model("eva02_base_patch14_224", pretrained=False, depth=1, img_size=28,
                                      num_classes=4)).eval().double()
    x = image(1, 28, dtype=D)
    for mode in ("cp", "attnlrp"):
        ref, _ = reference_relevance(model, x, mode)
        e = lrpkit.LRP(model, PRESET_OF[mode](epsilon=1e-16))(x, normalize_output=False)
        assert relative(e.relevance, ref) < 1e-9


# -- conservation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["glu+fused-qkv", "swiglu+scale_mlp+separate-qkv",
                                    "half-rope+qk-norm+layer-scale+registers"])
def test_accounting_of_a_bias_free_model(config):
    # every bias zero (patch projection, q/v, proj, MLP, LayerNorm shifts, head), float64, ε = 1e-12: CP-LRP loses
    # nothing to biases or stabilisers; the output relevance ends up in the input, the prefix tokens and the
    # positional embedding. AttnLRP's books close too, with the softmax's share under "attention".
    model = small_eva(config, dtype=D, zero_bias=True)
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith(("bias", "q_bias", "v_bias")))
    x = image(2, dtype=D)
    zero = torch.zeros(2, dtype=D)
    e = lrpkit.LRP(model, presets.CPLRP(epsilon=1e-12))(x, normalize_output=False)
    acc, out = e.accounting, e.accounting.output
    for sink in ("bias", "stabilizer"):
        assert torch.allclose(acc.parts.get(sink, zero), zero, atol=1e-7 * out.abs().max())
    tokens = {"class_token", "register_tokens"} & set(acc.parts)
    explained = acc.input + acc.parts["positional_embedding"] + sum(acc.parts[k] for k in tokens)
    assert torch.allclose(explained, out, rtol=1e-5, atol=1e-12)
    assert (acc.parts["positional_embedding"].abs() > 1e-6).all()  # a real share, not vacuous
    e = lrpkit.LRP(model, presets.AttnLRP(epsilon=1e-12))(x, normalize_output=False)
    acc = e.accounting
    assert torch.allclose(acc.total(), out, rtol=1e-5, atol=1e-12)
    assert torch.allclose(acc.parts.get("bias", zero), zero, atol=1e-7 * out.abs().max())
    assert (acc.parts["attention"].abs() > 1e-6).all()


# -- batches, edge inputs, dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP"])
def test_batch_independence(preset):
    model = small_eva("swiglu+scale_mlp+separate-qkv")
    x = image(3)
    lrp = lrpkit.LRP(model, PRESETS[preset]())
    batch = lrp(x, target=[0, 4, 2]).relevance
    single = torch.cat([lrp(x[i:i + 1], target=c).relevance for i, c in enumerate([0, 4, 2])])
    assert torch.allclose(batch, single, rtol=1e-4, atol=1e-6 * single.abs().max())


def degenerate_inputs(dtype=torch.float32):
    x = image(1)
    return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP", "EpsilonPlusFlat"])
def test_finite_for_zeros_constants_and_bfloat16(preset, dtype):
    model = small_eva("half-rope+qk-norm+layer-scale+registers").to(dtype)
    e = lrpkit.LRP(model, PRESETS[preset]())(degenerate_inputs(dtype))
    assert e.relevance.dtype == dtype and torch.isfinite(e.relevance).all()
    assert all(torch.isfinite(v).all() for v in e.accounting.parts.values())
    if dtype == torch.float32 and preset != "EpsilonPlusFlat":  # (LRP-flat spreads relevance over any input)
        assert not e.relevance[0].any()  # zero input, zero relevance (R_in = x ⊙ ...)


def test_bfloat16_forward_and_relevance_stay_close_to_float32():
    model = small_eva("swiglu+scale_mlp+separate-qkv")
    x = image(1)
    e32 = lrpkit.LRP(model, presets.CPLRP())(x)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        assert relative(lrpkit.canonize(model16)(x.bfloat16()).float(), model16(x.bfloat16()).float()) < 1e-2
    e16 = lrpkit.LRP(model16, presets.CPLRP())(x.to(torch.bfloat16), target=e32.target)
    cos = F.cosine_similarity(e32.patch_relevance.flatten(), e16.patch_relevance.float().flatten(), dim=0)
    assert cos > 0.9, cos


# -- methods -------------------------------------------------------------------------------------------------------

def timm_attention(model, x, target):
    """Logits, the attention probabilities A_b of every block and ∂y_target/∂A_b from timm itself (EvaAttention's
    non-fused path, hooks on attn_drop, which sees the softmax output of the rotated q and k)."""
    model = copy.deepcopy(model)
    store = []

    def hook(module, inputs, out):
        out.retain_grad()
        store.append(out)

    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(hook)
    logits = model(x)
    logits[:, target].sum().backward()
    return logits.detach(), [a.detach() for a in store], [a.grad for a in store]


def test_attention_methods_read_timms_rotated_attention():
    from lrpkit.methods import AttentionGradCAM, AttentionRollout, GenericAttention, GradientRollout, RawAttention
    from lrpkit.methods.rollout import gradient_rollout, normalize_rows, rollout

    model = small_eva("half-rope+qk-norm+layer-scale+registers")  # 3 prefix tokens, avg pooling over 9 patches
    x = image(3)
    logits, attns, grads = timm_attention(model, x, target=2)

    def readout(m):  # the avg-pooled model reads the mean of the patch rows (tokens 3..11), over the patch columns
        return m[:, 3:].mean(1)[:, 3:].reshape(3, 3, 3)

    raw = RawAttention(model)(x, target=2)
    assert torch.allclose(raw.token_relevance, readout(attns[-1].mean(1)), atol=1e-6)
    generic = GenericAttention(model)(x, target=2)
    r = torch.eye(12).repeat(3, 1, 1)
    for a, g in zip(attns, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    assert torch.allclose(generic.token_relevance, readout(r), atol=1e-6)
    cam = AttentionGradCAM(model)(x, target=2)
    a, g = attns[-1][:, :, 3:].mean(2), grads[-1][:, :, 3:].mean(2)  # the read-out rows per head
    expected = (g[..., 3:].mean(-1, keepdim=True) * a).mean(1).clamp(min=0)[:, 3:].reshape(3, 3, 3)
    assert torch.allclose(cam.token_relevance, expected, atol=1e-6)
    roll = AttentionRollout(model)(x, target=2)
    assert torch.allclose(roll.token_relevance, readout(rollout([normalize_rows(a.mean(1)) for a in attns])),
                          atol=1e-6)
    grad_roll = GradientRollout(model)(x, target=2)
    assert torch.allclose(grad_roll.token_relevance, readout(gradient_rollout(attns, grads, protect=0)), atol=1e-6)
    for e in (raw, generic, cam, roll, grad_roll):
        assert torch.allclose(e.output, logits, atol=1e-5) and e.patch_relevance.shape == (3, 3, 3)


def test_gradient_methods_and_vitcx():
    from lrpkit.methods import Gradient, InputXGradient, IntegratedGradients, SmoothGrad, ViTCX

    model = small_eva("swiglu+scale_mlp+separate-qkv")
    x = image(2)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    assert torch.allclose(Gradient(model)(x, target=1).relevance, grad, atol=1e-6)
    assert torch.allclose(InputXGradient(model)(x, target=1).relevance, x * grad, atol=1e-6)
    for method in (IntegratedGradients(model, steps=4), SmoothGrad(model, n=2, seed=0)):
        e = method(x, target=1)
        assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()
    # ViT-CX: its feature maps are the input of the last block's attention, timm's blocks[-1].norm1 output
    vitcx = ViTCX(model, seed=0, progress=False, batch_size=8)
    seen = []
    model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(x)
    _, feats = vitcx.features(x)
    assert torch.allclose(feats, seen[0][:, 1:].transpose(1, 2).reshape(2, 32, 3, 3), atol=1e-5)
    e = vitcx(x, target=1)
    assert e.heatmap.shape == (2, 42, 42) and torch.isfinite(e.heatmap).all()


# Chefer's rules on EVA-02: the rotary embedding is part of the attention product (CheferAttentionRule)
@pytest.mark.parametrize("method", ["TransformerAttribution", "PartialLRP"])
def test_chefer_methods_on_a_class_token_eva_with_rope(method):
    """On a class-token EVA (global_pool='token'), a rotary embedding whose angles are all 0 (cos 1, sin 0) is the
    identity: Chefer's methods must give what they give on the same model without RoPE; and on the real
    rotation, a finite map that follows the target."""
    from lrpkit import methods

    cls = getattr(methods, method)
    rotated = small_eva("token-pool+pre-norm+no-embed-class")
    identity = copy.deepcopy(rotated)
    d = identity.rope.pos_embed.shape[-1] // 2
    identity.rope.pos_embed[:, :d] = 0.0  # sin
    identity.rope.pos_embed[:, d:] = 1.0  # cos
    plain = copy.deepcopy(identity)
    plain.rope = None
    x = image(2)
    expected = cls(plain)(x, target=1).token_relevance
    assert torch.allclose(cls(identity)(x, target=1).token_relevance, expected, atol=1e-6)
    explainer = cls(rotated)
    a, b = explainer(x, target=1), explainer(x, target=3)
    assert torch.isfinite(a.token_relevance).all() and a.token_relevance.shape == (2, 3, 3)
    assert not torch.allclose(a.token_relevance, b.token_relevance)
    assert not torch.allclose(a.token_relevance, expected)  # the rotation changes the attention


@pytest.mark.parametrize("method", ["TransformerAttribution", "PartialLRP"])
def test_chefer_methods_on_the_eva02_layout(method):
    from lrpkit import methods

    model = small_eva("glu+fused-qkv")
    e = getattr(methods, method)(model)(image(2), target=1)
    assert torch.isfinite(e.token_relevance).all() and e.token_relevance.shape == (2, 3, 3)


# -- weights and the command line ------------------------------------------------------------------------------------

def test_named_model_weights_from_a_local_safetensors_file(tmp_path):
    """``eva02_tiny_patch14_224`` (a MIM model without a head, num_classes=0) with a 4-class head in the file:
    the app's loader builds the head from the file, the weights are the file's, the preprocessing timm's."""
    from safetensors.torch import save_file

    from lrpkit import catalog

    torch.manual_seed(3)
    source = perturb(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=4).eval())
    weights = tmp_path / "eva02_tiny.safetensors"
    save_file(source.state_dict(), str(weights))
    model, prep = catalog.load_model("eva02_tiny_patch14_224", weights)
    assert model.num_classes == 4 and prep.size == (224, 224) and prep.interpolation == "bicubic"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        assert relative(lrpkit.canonize(model)(x), source(x)) < 1e-5
    assert catalog.class_names("eva02_tiny_patch14_224", model) is None  # 4 classes: no known names
    headless, _ = catalog.load_model("eva02_tiny_patch14_224")
    assert headless.num_classes == 0 and catalog.class_names("eva02_tiny_patch14_224", headless) is None


def test_cli_explain_and_evaluate_accept_the_timm_name(tmp_path, capsys):
    import csv

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from lrpkit import catalog, cli

    torch.manual_seed(4)
    source = perturb(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3).eval())
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    picture = tmp_path / "img.png"
    Image.fromarray((torch.rand(200, 240, 3) * 255).byte().numpy()).save(picture)
    out = tmp_path / "explain"
    code = cli.main(["explain", str(picture), "--model", "eva02_tiny_patch14_224", "--weights", str(weights),
                     "--method", "lrp", "attnlrp", "--save-relevance", "npy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    model, prep = catalog.load_model("eva02_tiny_patch14_224", weights)
    x = prep.normalize(prep.load(picture))[None]
    with torch.no_grad():
        expected = source(x)[0]
    with (out / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["predicted"]) == int(expected.argmax())  # timm's model with the weights from the file
    lrp = catalog.make_method("lrp", model, prep, 0)(x, None)
    saved = np.load(out / "lrp" / "img.relevance.npy")
    assert np.allclose(saved, lrp.relevance[0].numpy(), rtol=1e-4, atol=1e-6 * float(lrp.relevance.abs().max()))
    code = cli.main(["evaluate", "--model", "eva02_tiny_patch14_224", "--weights", str(weights), "--n", "1",
                     "--method", "lrp", "rollout", "--steps", "2", "--deletion-steps", "2", "--out",
                     str(tmp_path / "evaluate"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [line.split()[0] for line in captured.out.splitlines()[2:4]] == ["lrp", "rollout"]
