"""The transformer rules, one layer at a time, on cases small enough to derive by hand.

Each test builds a one-layer (or one-block) chain, maps the rule under test onto it, starts from an explicit
output relevance R and compares the input relevance with the numbers derived in the comments. Conservation is
checked wherever the rule conserves, and the relevance accounting wherever a rule reports a sink. float64 and a
tiny ε throughout, so that the hand-derived values hold to ~1e-9.
"""

import math

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import Composite, GlobalTypeMap
from lrpkit.layers import (Chain, ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Scale,
                           SelectClassToken, SelfAttention, SkipConnection, TokenMean)
from lrpkit.rules import (ClassTokenRule, EpsilonRule, IncompatibleRuleError, LayerNormRule, PatchFlattenRule,
                          PositionalEmbeddingRule, SelectClassTokenRule, SelfAttentionRule, SkipConnectionRule,
                          TokenMeanRule)


EPS = 1e-12
D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def run(layer, mapping, x, R):
    """LRP through ``Chain([layer])`` with the rules ``mapping`` ({type: rule}), starting from ``R``."""
    lrp = lrpkit.LRP(Chain([layer]).eval(), Composite(GlobalTypeMap(mapping)))
    return lrp(x, R=R)


def parts(expl):
    """The accounting's parts without the (here exactly zero) stabilizer remainder."""
    out = {k: v.tolist() for k, v in expl.accounting.parts.items()}
    assert out.pop("stabilizer", [0.0]) == [0.0] * expl.output.shape[0]
    return out


# -- PatchFlatten ----------------------------------------------------------------------------------------------

def test_patch_flatten_rule_is_the_inverse_reshape():
    # x: (B=1, C=2, H=2, W=2); token n = h·W + w, so R_in[0, c, h, w] = R[0, 2h + w, c]
    x = torch.randn(1, 2, 2, 2, dtype=D)
    R = t([[[1, 2], [3, 4], [5, 6], [7, 8]]])  # (1, N=4, C=2): R[0, n, c]
    e = run(PatchFlatten(), {PatchFlatten: PatchFlattenRule()}, x, R)
    # channel 0 carries R[:, :, 0] = 1 3 5 7 on the grid (h, w) = (0,0) (0,1) (1,0) (1,1); channel 1: 2 4 6 8
    assert torch.equal(e.relevance, t([[[[1, 3], [5, 7]], [[2, 4], [6, 8]]]]))
    assert e.accounting.input.item() == e.accounting.output.item() == 36  # conserves exactly


# -- ClassToken --------------------------------------------------------------------------------------------------

def test_class_token_rule_drops_prefix_relevance_into_the_accounting():
    layer = ClassToken(t([[[1, 2], [3, 4], [5, 6]]]), ["class", "distillation", "register"])
    x = t([[[0.5, 0.5], [0.5, 0.5]]])  # two patch tokens
    R = t([[[1, 2], [3, 4], [-1, 7], [5, 6], [7, 8]]])  # (1, P + N = 5, C = 2)
    e = run(layer, {ClassToken: ClassTokenRule()}, x, R)
    assert torch.equal(e.relevance, t([[[5, 6], [7, 8]]]))  # the patch tokens' rows
    # class: 1 + 2 = 3; distillation: 3 + 4 = 7; register: -1 + 7 = 6; input: 5+6+7+8 = 26; 26 + 3 + 7 + 6 = 42
    assert parts(e) == {"class_token": [3.0], "distillation_token": [7.0], "register_tokens": [6.0]}
    assert e.accounting.output.item() == 42 and e.accounting.total().item() == 42


def test_class_token_rule_sums_several_register_tokens():
    layer = ClassToken(t([[[0, 0], [0, 0], [0, 0]]]), ["class", "register", "register"])
    R = t([[[1, 0], [2, 0], [0, 4], [9, 9]]])
    e = run(layer, {ClassToken: ClassTokenRule()}, t([[[1, 1]]]), R)
    assert parts(e) == {"class_token": [1.0], "register_tokens": [6.0]}  # 2 + 4
    assert torch.equal(e.relevance, t([[[9, 9]]]))


# -- SelectClassToken / TokenMean ----------------------------------------------------------------------------------

def test_select_class_token_rule_puts_everything_on_the_selected_token():
    x = torch.randn(2, 3, 2, dtype=D)
    R = t([[5, -2], [1, 1]])
    e = run(SelectClassToken(1), {SelectClassToken: SelectClassTokenRule()}, x, R)
    expected = torch.zeros(2, 3, 2, dtype=D)
    expected[:, 1] = R
    assert torch.equal(e.relevance, expected)
    assert torch.equal(e.accounting.input, e.accounting.output)


def test_token_mean_rule_by_hand():
    # x = [[9, 9], [1, 2], [3, -6]], start = 1: y = mean([1, 2], [3, -6]) = [2, -2]
    # R = [4, 1]: s = R / y = [2, -1/2]; R_n = x_n ⊙ s / 2 (M = 2 tokens)
    #   token 1: [1·2/2, 2·(-1/2)/2] = [1, -0.5]; token 2: [3·2/2, -6·(-1/2)/2] = [3, 1.5]; prefix token 0: 0
    x = t([[[9, 9], [1, 2], [3, -6]]])
    e = run(TokenMean(1), {TokenMean: TokenMeanRule(EPS)}, x, t([[4, 1]]))
    assert torch.allclose(e.relevance, t([[[0, 0], [1, -0.5], [3, 1.5]]]), atol=1e-9)
    assert e.accounting.input.item() == pytest.approx(5)  # = 4 + 1: conserves


def test_token_mean_rule_without_prefix():
    # start = 0 (e.g. pool_include_prefix): y = ([2, 0] + [4, 6]) / 2 = [3, 3]; R = [3, 6]: s = [1, 2]
    # R_0 = [2·1/2, 0] = [1, 0]; R_1 = [4·1/2, 6·2/2] = [2, 6]; total 9 = 3 + 6
    e = run(TokenMean(0), {TokenMean: TokenMeanRule(EPS)}, t([[[2, 0], [4, 6]]]), t([[3, 6]]))
    assert torch.allclose(e.relevance, t([[[1, 0], [2, 6]]]), atol=1e-9)


# -- PositionalEmbedding -------------------------------------------------------------------------------------------

def test_positional_embedding_rule_by_hand():
    # grid (C=1, H=1, W=2): x = [3, 2], e = [1, -1], y = x + e = [4, 1], R = [2, 5]
    # R_x = x / y ⊙ R = [3/4·2, 2/1·5] = [1.5, 10]; the embedding keeps e / y ⊙ R = [1/4·2, -1·5] = [0.5, -5]
    layer = PositionalEmbedding(t([[[[1, -1]]]]))
    e = run(layer, {PositionalEmbedding: PositionalEmbeddingRule(EPS)}, t([[[[3, 2]]]]), t([[[[2, 5]]]]))
    assert torch.allclose(e.relevance, t([[[[1.5, 10]]]]))
    acc = e.accounting
    assert acc.parts["positional_embedding"].item() == pytest.approx(-4.5)
    assert acc.parts["stabilizer"].item() == pytest.approx(0, abs=1e-9)
    assert acc.input.item() + acc.parts["positional_embedding"].item() == pytest.approx(7)  # 11.5 - 4.5 = ΣR


def test_positional_embedding_rule_is_stabilised_at_zero():
    # x = 1, e = -1: y = 0 exactly. R / stab(0) = R / ε is large but finite, never NaN; what the two shares do
    # not cover (Σ y·s = 0) is the stabilizer's part.
    layer = PositionalEmbedding(t([[[[-1.0]]]]))
    e = run(layer, {PositionalEmbedding: PositionalEmbeddingRule(1e-6)}, t([[[[1.0]]]]), t([[[[1.0]]]]))
    assert torch.isfinite(e.relevance).all()
    assert e.relevance.item() == pytest.approx(1e6)
    assert e.accounting.parts["positional_embedding"].item() == pytest.approx(-1e6)
    assert e.accounting.parts["stabilizer"].item() == pytest.approx(1.0)
    assert e.accounting.total().item() == pytest.approx(1.0)


# -- LayerNorm -------------------------------------------------------------------------------------------------------

def test_layer_norm_rule_by_hand():
    # x = [1, 1, 5, 5]: μ = 3, Var = 4, σ = 2 (eps = 0), y = (x − μ)/σ = [-1, -1, 1, 1]
    # R = [1, 2, 3, 4]: s = R / y = [-1, -2, 3, 4], mean(s) = 1, s − mean(s) = [-2, -3, 2, 3]
    # R_x = x / σ ⊙ (s − mean(s)) = [0.5·-2, 0.5·-3, 2.5·2, 2.5·3] = [-1, -1.5, 5, 7.5]; Σ = 10 = ΣR
    e = run(LayerNormalize(eps=0.0), {LayerNormalize: LayerNormRule(EPS)}, t([[1, 1, 5, 5]]), t([[1, 2, 3, 4]]))
    assert torch.allclose(e.relevance, t([[-1, -1.5, 5, 7.5]]), atol=1e-9)
    assert e.accounting.input.item() == pytest.approx(10)


def test_layer_norm_sigma_below_float64_is_torchs():
    # x = [1, 1, 5, 5]: μ = 3, Var = (4 + 4 + 4 + 4) / 4 = 4, σ = sqrt(4 + eps) = sqrt(4.25) for eps = 0.25
    sigma = LayerNormalize(eps=0.25).sigma(torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    assert sigma.dtype == torch.float32 and sigma.item() == pytest.approx(math.sqrt(4.25), rel=1e-7)
    # below float64 the variance is accumulated in float64 by the two-pass formula; rounded to float32 it is the
    # value of torch's var (Welford in float64), bit for bit on rows like these (channels last or first, and a
    # channels-last memory layout as in a timm ConvNeXt)
    torch.manual_seed(0)
    maps = torch.randn(2, 96, 9, 9) * 3 + 1
    channels_last = maps.contiguous(memory_format=torch.channels_last)
    for dim, x in ((-1, torch.randn(64, 7, 96) * 3 + 1), (1, maps), (1, channels_last)):
        expected = torch.sqrt(x.var(dim, unbiased=False, keepdim=True) + 1e-6)
        assert torch.equal(LayerNormalize(eps=1e-6, dim=dim).sigma(x), expected)
    # float64 is torch's var itself
    x = torch.randn(5, 33, dtype=D) * 1e4 + 1e8
    assert torch.equal(LayerNormalize(eps=1e-6).sigma(x), torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6))


def test_layer_norm_rule_is_gradient_times_input_with_sigma_constant_and_conserves():
    # with R = y ⊙ g (what LRP-ε delivers in the ε → 0 limit), R_x = x ⊙ ∂(y·g)/∂x with σ detached
    torch.manual_seed(0)
    layer = LayerNormalize(eps=1e-5)
    x = torch.randn(3, 4, 8, dtype=D) * 3 + 1
    g = torch.randn(3, 4, 8, dtype=D)
    y = layer(x)
    e = run(layer, {LayerNormalize: LayerNormRule(EPS)}, x, y * g)
    xr = x.clone().requires_grad_(True)
    sigma = torch.sqrt(xr.var(-1, unbiased=False, keepdim=True) + 1e-5).detach()
    (grad,) = torch.autograd.grad(((xr - xr.mean(-1, keepdim=True)) / sigma * g).sum(), xr)
    assert torch.allclose(e.relevance, x * grad, atol=1e-9)
    # conservation per token: Σ_c R_x = Σ_c R (Σ y = 0 makes the mean term vanish)
    assert torch.allclose(e.relevance.sum(-1), (y * g).sum(-1), atol=1e-9)


def test_layer_norm_affine_part_is_epsilon_with_bias_sink():
    # Scale: y = w ⊙ x + b with w = [2, -1], b = [1, 0], x = [1, 3]: z = [3, -3]; R = [6, 3]
    # LRP-ε: R_x = x·w / z ⊙ R = [2/3·6, -3/-3·3] = [4, 3]; the bias takes b / z ⊙ R = [1/3·6, 0] = [2, 0]
    e = run(Scale(t([2, -1]), t([1, 0])), {Scale: EpsilonRule(EPS)}, t([[1, 3]]), t([[6, 3]]))
    assert torch.allclose(e.relevance, t([[4, 3]]))
    assert e.accounting.parts["bias"].item() == pytest.approx(2)


# -- SkipConnection --------------------------------------------------------------------------------------------------

def test_skip_connection_rule_by_hand():
    # y = a + f(a), f = Scale(w, b): a = [2, -1], w = [1, 3], b = [2, 0] -> f = [4, -3], y = [6, -4]; R = [6, 8]
    # identity share: a / y ⊙ R = [2/6·6, -1/-4·8] = [2, 2]; branch share: f / y ⊙ R = [4/6·6, -3/-4·8] = [4, 6]
    # through f (LRP-ε): a·w / f ⊙ [4, 6] = [2/4·4, -3/-3·6] = [2, 6], bias keeps [2/4·4, 0] = [2, 0]
    # R_a = [2, 2] + [2, 6] = [4, 8]; Σ = 12 = 14 − 2 (bias)
    block = SkipConnection(Chain([Scale(t([1, 3]), t([2, 0]))]))
    e = run(block, {SkipConnection: SkipConnectionRule(EPS), Scale: EpsilonRule(EPS)}, t([[2, -1]]), t([[6, 8]]))
    assert torch.allclose(e.relevance, t([[4, 8]]))
    assert e.accounting.parts["bias"].item() == pytest.approx(2)
    assert e.accounting.parts["stabilizer"].item() == pytest.approx(0, abs=1e-9)


def _vit_chain(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                              **kw).double().eval()
    return lrpkit.canonize(model)


@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_skip_connection_rule_on_vit_blocks_splits_then_propagates(which):
    # A canonized ViT block a -> a + f(a): the rule's R_a must be a/y ⊙ R plus f's own LRP of f(a)/y ⊙ R, which
    # we compute separately by running LRP on f alone.
    chain = _vit_chain(init_values=0.5, qk_norm=True)
    block = chain[4] if which == "attn" else chain[5]
    assert isinstance(block, SkipConnection)
    torch.manual_seed(1)
    a = torch.randn(2, 5, 16, dtype=D)
    R = torch.randn(2, 5, 16, dtype=D)
    comp = lrpkit.presets.CPLRP(epsilon=EPS)
    comp = Composite(*comp.primitives, GlobalTypeMap({SkipConnection: SkipConnectionRule(EPS)}))
    whole = lrpkit.LRP(Chain([block]).eval(), comp)(a, R=R)
    with torch.no_grad():
        fa = block.inner(a)
        y = a + fa
    inner = lrpkit.LRP(block.inner, comp)(a, R=fa / y * R)
    assert torch.allclose(whole.relevance, a / y * R + inner.relevance, atol=1e-9)
    # the accounting closes: ΣR = ΣR_a + the inner layers' sinks (biases, stabilisers)
    acc = whole.accounting
    assert torch.allclose(acc.total(), R.flatten(1).sum(1), atol=1e-9)
    assert torch.allclose(acc.parts["stabilizer"], torch.zeros(2, dtype=D), atol=1e-6)


# -- SelfAttention ---------------------------------------------------------------------------------------------------

def _attention(wq, wk, wv, proj_bias=(0.0, 0.0)):
    """Single-head SelfAttention on d = 2 with q = x wqᵀ, k = x wkᵀ, v = x wvᵀ, scale 1, out = y + proj_bias."""
    qkv = nn.Linear(2, 6, bias=False).double()
    proj = nn.Linear(2, 2).double()
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([t(wq), t(wk), t(wv)]))
        proj.weight.copy_(torch.eye(2, dtype=D))
        proj.bias.copy_(t(proj_bias))
    return SelfAttention(qkv, proj, num_heads=1, scale=1.0)


def _attn_rule(mode):
    return {SelfAttention: SelfAttentionRule(EpsilonRule(EPS), EpsilonRule(EPS), mode=mode, epsilon=EPS)}


LN3 = math.log(3.0)
# tokens x1 = [1, 1], x2 = [1, -1] (rows of X); q_i = W_q x_i with W_q = (ln3/4)·[[1, 1], [1, 1]]:
#   q1 = (ln3/2)·[1, 1], q2 = [0, 0]; k = x (W_k = I); S_ij = q_i·k_j: S = [[ln3, 0], [0, 0]]
#   A = softmax(S) = [[3/4, 1/4], [1/2, 1/2]]   (not symmetric, so A and Aᵀ cannot be confused)
# v_i = W_v x_i with W_v = [[2, 1], [1, 2]]: v1 = [3, 3], v2 = [1, -1]
# y = A v: y1 = 3/4·[3, 3] + 1/4·[1, -1] = [5/2, 2], y2 = 1/2·[3, 3] + 1/2·[1, -1] = [2, 1]
# the output projection is the identity with zero bias: out = y.
X = [[[1.0, 1.0], [1.0, -1.0]]]
WQ, WK, WV = [[LN3 / 4, LN3 / 4], [LN3 / 4, LN3 / 4]], [[1, 0], [0, 1]], [[2, 1], [1, 2]]
IDENTITY = [[1, 0], [0, 1]]
R_OUT = [[[1.0, 2.0], [3.0, -1.0]]]  # ΣR = 5


def test_self_attention_forward_of_the_hand_case():
    layer = _attention(WQ, WK, WV)
    out, attn = layer(t(X), return_attention=True)
    assert torch.allclose(attn, t([[[[0.75, 0.25], [0.5, 0.5]]]]))
    assert torch.allclose(out, t([[[2.5, 2], [2, 1]]]))
    assert torch.allclose(layer(t(X)), out)  # the fused path computes the same


def test_self_attention_rule_cp_by_hand():
    # out_rule (ε, identity projection): R_y = R = [[1, 2], [3, -1]]
    # s = R_y / y: s1 = [1/(5/2), 2/2] = [2/5, 1], s2 = [3/2, -1]
    # (Aᵀ s)_j = Σ_i A_ij s_i: j=1: 3/4·s1 + 1/2·s2 = [3/10 + 3/4, 3/4 - 1/2] = [21/20, 1/4]
    #                           j=2: 1/4·s1 + 1/2·s2 = [1/10 + 3/4, 1/4 - 1/2] = [17/20, -1/4]
    # R_v = v ⊙ Aᵀ s: R_v1 = [3, 3] ⊙ [21/20, 1/4] = [63/20, 3/4]; R_v2 = [1, -1] ⊙ [17/20, -1/4] = [17/20, 1/4]
    # value_rule (ε): R_x[i, c] = x[i, c]·Σ_d W_v[d, c]·R_v[i, d] / v[i, d]
    #   token 1: R_v/v = [21/20, 1/4]: c=0: 1·(2·21/20 + 1·1/4) = 47/20; c=1: 1·(1·21/20 + 2·1/4) = 31/20
    #   token 2: R_v/v = [17/20, -1/4]: c=0: 1·(2·17/20 - 1/4) = 29/20; c=1: -1·(17/20 - 2/4) = -7/20
    # Σ = (47 + 31 + 29 - 7)/20 = 5 = ΣR: conserves
    e = run(_attention(WQ, WK, WV), _attn_rule("cp"), t(X), t(R_OUT))
    assert torch.allclose(e.relevance, t([[[47 / 20, 31 / 20], [29 / 20, -7 / 20]]]), atol=1e-9)
    assert e.accounting.input.item() == pytest.approx(5)


def test_self_attention_rule_cp_uniform_attention_and_no_query_key_path():
    # With W_q = 0 the scores are 0 and A = [[1/2, 1/2], [1/2, 1/2]]; v = x: y1 = y2 = [1, 0]; R on the non-zero
    # column: R = [[2, 0], [4, 0]]: s = [2, 0], [4, 0]; Aᵀ s = [3, 0] for both tokens; R_v = v ⊙ [3, 0] =
    # [[3, 0], [3, 0]] = R_x; Σ = 6 = ΣR. CP holds A constant, so the keys matter only through A: W_k = 5·I
    # leaves A (and R_x) unchanged.
    for wk in (WK, [[5, 0], [0, 5]]):
        e = run(_attention([[0, 0], [0, 0]], wk, IDENTITY), _attn_rule("cp"), t(X), t([[[2, 0], [4, 0]]]))
        assert torch.allclose(e.relevance, t([[[3, 0], [3, 0]]]), atol=1e-9)


def test_self_attention_rule_attnlrp_by_hand():
    # Same layer and R (ΣR = 5). R_y = R (identity projection).
    # A·v, uniform split: s = R_y / (2y): s1 = [1/5, 1/2], s2 = [3/4, -1/2]
    #   R_v = v ⊙ Aᵀ s — half of the CP case: R_v1 = [63/40, 3/8], R_v2 = [17/40, 1/8]           (Σ = 5/2)
    #   R_A = A ⊙ (s_i·v_j): s1·v1 = 3/5 + 3/2 = 21/10, s1·v2 = 1/5 - 1/2 = -3/10,
    #                       s2·v1 = 9/4 - 3/2 = 3/4,   s2·v2 = 3/4 + 1/2 = 5/4
    #         R_A = [[3/4·21/10, 1/4·(-3/10)], [1/2·3/4, 1/2·5/4]] = [[63/40, -3/40], [3/8, 5/8]]   (Σ = 5/2)
    # softmax Taylor rule R_S = S ⊙ (R_A − A ⊙ Σ_j R_A): only S11 = ln3 is non-zero; row sum 1 = 60/40 = 3/2:
    #   R_S11 = ln3·(63/40 − 3/4·3/2) = 9/20·ln3
    # q kᵀ, uniform split: s' = R_S / (2S): s'11 = 9/40; where S = 0, s' = 0/stab(0) = 0 (no NaN)
    #   R_q1 = q1 ⊙ s'11·k1 = (ln3/2)[1, 1] ⊙ 9/40·[1, 1] = 9ln3/80·[1, 1]; R_q2 = 0 (q2 = 0)
    #   R_k1 = k1 ⊙ s'11·q1 = 9ln3/80·[1, 1];                              R_k2 = 0 (s'_12 = s'_22 = 0)
    # qkv projection (ε): R_x = x ⊙ (W_qᵀ R_q/q + W_kᵀ R_k/k + W_vᵀ R_v/v)
    #   q: token 1: R_q1/q1 = 9/40·[1, 1]; W_qᵀ·that = (ln3/4)(9/40)·[2, 2] = 9ln3/80·[1, 1]; token 2: 0/stab(0) = 0
    #   k: W_k = I: 9ln3/80·[1, 1] for token 1, 0 for token 2
    #   v: half of the CP result: [[47/40, 31/40], [29/40, -7/40]]
    #   R_x1 = [47/40 + 9ln3/40, 31/40 + 9ln3/40], R_x2 = [29/40, -7/40]
    # Σ R_x = 5/2 + 9ln3/20: the softmax is not conservative; the rest, 5/2 − 9ln3/20, is the "attention" sink.
    e = run(_attention(WQ, WK, WV), _attn_rule("attnlrp"), t(X), t(R_OUT))
    expected = t([[[47 / 40 + 9 * LN3 / 40, 31 / 40 + 9 * LN3 / 40], [29 / 40, -7 / 40]]])
    assert torch.allclose(e.relevance, expected, atol=1e-9)
    acc = e.accounting
    assert acc.input.item() == pytest.approx(5 / 2 + 9 * LN3 / 20)
    assert acc.parts["attention"].item() == pytest.approx(5 / 2 - 9 * LN3 / 20)
    assert acc.total().item() == pytest.approx(5)


def test_self_attention_rule_cp_second_hand_case_with_a_zero_output():
    # W_q = 0 -> S = 0, A = 1/2 everywhere (exactly); v = x with x1 = [1, 2], x2 = [3, -2]:
    # y1 = y2 = (x1 + x2)/2 = [2, 0] — the second output is exactly 0. R = ones.
    # R_y = y ⊙ R / stab(y) = [1, 0] per token (0/ε·... = 0, no NaN); s = R_y / stab(y) = [1/2, 0]
    # Aᵀ s = [1/2, 0]; R_v = v ⊙ [1/2, 0] = [[1/2, 0], [3/2, 0]]; Σ = 2; the other 2 is the stabilizer's.
    x = t([[[1, 2], [3, -2]]])
    R = torch.ones(1, 2, 2, dtype=D)
    e = run(_attention([[0, 0], [0, 0]], WK, IDENTITY), _attn_rule("cp"), x, R)
    assert torch.isfinite(e.relevance).all()
    assert torch.allclose(e.relevance, t([[[0.5, 0], [1.5, 0]]]), atol=1e-9)
    assert e.accounting.total().item() == pytest.approx(4)
    # AttnLRP on the same case: the score path has S = 0 everywhere, so it gets nothing; A·v gives v half:
    # s = R_y / (2 stab(y)) = [1/4, 0]; R_v = v ⊙ Aᵀ s = [[1/4, 0], [3/4, 0]]; q = 0 exactly -> 0/stab(0) = 0
    e = run(_attention([[0, 0], [0, 0]], WK, IDENTITY), _attn_rule("attnlrp"), x, R)
    assert torch.isfinite(e.relevance).all()
    assert torch.allclose(e.relevance, t([[[0.25, 0], [0.75, 0]]]), atol=1e-9)


def test_self_attention_rule_cp_equals_gradient_times_input_with_attention_detached():
    # multi-head, biases, random weights: with ε → 0 CP-LRP through the layer, started from R = out ⊙ g, is
    # x ⊙ ∂(out·g)/∂x with the attention probabilities detached
    torch.manual_seed(0)
    layer = SelfAttention(nn.Linear(8, 24).double(), nn.Linear(8, 8).double(), num_heads=2, scale=0.5)
    x = torch.randn(2, 5, 8, dtype=D)
    g = torch.randn(2, 5, 8, dtype=D)
    with torch.no_grad():
        out = layer(x)
    e = run(layer, _attn_rule("cp"), x, out * g)
    xr = x.clone().requires_grad_(True)
    q, k, v = layer.qkv_heads(xr)
    A = layer.attention(q, k).detach()
    y = layer.proj(layer.merge_heads(A @ v))
    (grad,) = torch.autograd.grad((y * g).sum(), xr)
    assert torch.allclose(e.relevance, x * grad, atol=1e-8)
    # the relevance not reaching the input sits in the two biases (qkv's value part and proj)
    acc = e.accounting
    assert torch.allclose(acc.input + acc.parts["bias"], acc.output, atol=1e-8)


def test_self_attention_rule_refuses_what_it_cannot_handle():
    layer = SelfAttention(nn.Linear(4, 12), nn.Linear(4, 4), num_heads=2, scale=1.0, norm=nn.LayerNorm(4))
    with pytest.raises(IncompatibleRuleError, match="scale_attn_norm"):
        Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule()})).assign(Chain([layer]))
    layer = SelfAttention(nn.Linear(4, 12), nn.Linear(4, 4), num_heads=2, scale=1.0, q_norm=nn.BatchNorm1d(2))
    with pytest.raises(IncompatibleRuleError, match="qk-norm"):
        Composite(GlobalTypeMap({SelfAttention: SelfAttentionRule(mode="attnlrp")})).assign(Chain([layer]))
    with pytest.raises(ValueError, match="mode"):
        SelfAttentionRule(mode="rollout")


def _biased_attention():
    """The hand case's layer with the constant score bias B = [[0, 0], [ln3, 0]] (a relative position bias)."""
    layer = _attention(WQ, WK, WV)
    return SelfAttention(layer.qkv, layer.proj, num_heads=1, scale=1.0, bias=t([[[[0.0, 0.0], [LN3, 0.0]]]]))


def test_self_attention_rule_attnlrp_with_a_score_bias_by_hand():
    # q kᵀ = [[ln3, 0], [0, 0]] as above, plus B: S = [[ln3, 0], [ln3, 0]], A = [[3/4, 1/4], [3/4, 1/4]]
    # y1 = y2 = 3/4·[3, 3] + 1/4·[1, -1] = [5/2, 2]; R_y = R = [[1, 2], [3, -1]] (ΣR = 5)
    # A·v, uniform split: s = R_y / (2y): s1 = [1/5, 1/2], s2 = [3/5, -1/4]
    #   s1·v1 = 21/10, s1·v2 = -3/10, s2·v1 = 9/5 - 3/4 = 21/20, s2·v2 = 3/5 + 1/4 = 17/20
    #   R_A = [[3/4·21/10, 1/4·(-3/10)], [3/4·21/20, 1/4·17/20]] = [[63/40, -3/40], [63/80, 17/80]]    (Σ 5/2)
    #   Aᵀ s: j=1: 3/4·(s1 + s2) = [3/5, 3/16]; j=2: 1/4·(s1 + s2) = [1/5, 1/16]
    #   R_v = v ⊙ Aᵀ s: R_v1 = [9/5, 9/16], R_v2 = [1/5, -1/16]                                       (Σ 5/2)
    # softmax: row sums of R_A: 3/2 and 1; R_A − A ⊙ rowsum = [[9/20, -9/20], [3/80, -3/80]]
    #   R_S = S ⊙ that = [[9ln3/20, 0], [3ln3/80, 0]]
    # S = q kᵀ + B, LRP-ε on the sum: the bias's share B ⊙ R_S / S is 3ln3/80 (at (2, 1), where B = S);
    #   the product's share is 9ln3/20 at (1, 1) and 0 at (2, 1) (q2 = 0): R_q1 = R_k1 = 9ln3/80·[1, 1] as above
    # qkv (ε): q and k: 9ln3/40·[1, 1] for token 1, 0 for token 2;
    #   v: R_v/v = [3/5, 3/16] and [1/5, 1/16] through W_vᵀ = [[2, 1], [1, 2]]: token 1 [111/80, 78/80] ⊙ x1,
    #   token 2 [37/80, 26/80] ⊙ x2 = [37/80, -26/80]
    # accounting: input 5/2 + 9ln3/20, attention_bias 3ln3/80, attention (the softmax) 5/2 − 39ln3/80: Σ = 5
    e = run(_biased_attention(), _attn_rule("attnlrp"), t(X), t(R_OUT))
    expected = t([[[111 / 80 + 9 * LN3 / 40, 78 / 80 + 9 * LN3 / 40], [37 / 80, -26 / 80]]])
    assert torch.allclose(e.relevance, expected, atol=1e-9)
    acc = e.accounting
    assert acc.input.item() == pytest.approx(5 / 2 + 9 * LN3 / 20)
    assert acc.parts["attention_bias"].item() == pytest.approx(3 * LN3 / 80)
    assert acc.parts["attention"].item() == pytest.approx(5 / 2 - 39 * LN3 / 80)
    assert acc.total().item() == pytest.approx(5)


def test_self_attention_rule_cp_with_a_score_bias_by_hand():
    # CP holds A = [[3/4, 1/4], [3/4, 1/4]] constant: the bias gets nothing, everything goes through v.
    # s = R_y / y: s1 = [2/5, 1], s2 = [6/5, -1/2]; Aᵀ s = 3/4·[8/5, 1/2] = [6/5, 3/8] (j=1), [2/5, 1/8] (j=2)
    # value rule: token 1 [2·6/5 + 3/8, 6/5 + 2·3/8] = [111/40, 78/40]; token 2 [37/40, 26/40] ⊙ [1, -1]
    # Σ = (111 + 78 + 37 − 26)/40 = 5 = ΣR
    e = run(_biased_attention(), _attn_rule("cp"), t(X), t(R_OUT))
    assert torch.allclose(e.relevance, t([[[111 / 40, 78 / 40], [37 / 40, -26 / 40]]]), atol=1e-9)
    assert "attention_bias" not in e.accounting.parts
    assert e.accounting.input.item() == pytest.approx(5)


@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_self_attention_records_hold_one_score_sized_tensor_in_cp_and_none_in_attnlrp(mode):
    # memory (issue 13): CP keeps A (B, H, N, N), which its rule reads; AttnLRP keeps q, k, v and recomputes the scores
    # S = q kᵀ·scale + B and A = softmax(S) in lrp with the same operations (the same numbers), so its record holds
    # no (N, N) tensor. The result is the same as with S kept: the hand-derived cases above and the references.
    from helpers import tiny_vit
    from lrpkit.tape import Tape

    model = tiny_vit()
    preset = lrpkit.presets.CPLRP() if mode == "cp" else lrpkit.presets.AttnLRP()
    lrp = lrpkit.LRP(model, preset)
    tape = Tape(lrp.plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tape.forward(lrp.steps, x)
    n = model.patch_embed.num_patches + 1
    attention = [s for s in lrp.all_steps if isinstance(s.layer, SelfAttention)]
    assert attention
    for step in attention:
        extras = tape.records[step.index].extras
        square = [k for k, v in extras.items() if isinstance(v, torch.Tensor) and v.shape[-2:] == (n, n)]
        assert square == (["attn"] if mode == "cp" else []), (step.name, square)
