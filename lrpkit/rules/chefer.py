"""The LRP rules of Chefer, Gur & Wolf 2021, "Transformer Interpretability Beyond Attention Visualization" (CVPR),
as lrpkit rule objects. :func:`lrpkit.methods.chefer.chefer_composite` maps them onto a canonized ViT.

Notation as in :mod:`lrpkit.rules.basic`; ``t⁺ = max(t, 0)``; ``sdiv(a, b) = a / (b + ε·sign(b))`` with
``sdiv(a, 0) := 0`` and ε = 1e-9 (the ``safe_divide`` of the reference code); sums ``Σ`` over one sample.

- :class:`CheferLinearRule`: LRP-α1β0 on Linear layers with the bias ignored,
  ``R_i = Σ_j (a_i w_ij)⁺ / Σ_i' (a_i' w_i'j)⁺ · R_j``.
- :class:`CheferZBoxRule`: LRP-z^B on the patch projection with the bounds taken from the input of each call
  (``l``/``h`` = min/max of each sample by default, as the reference does).
- :class:`CheferZPlusRule`: the same α1β0-without-bias rule for convolutions other than the first (via terms).
- :class:`CheferPassRule`: LayerNorm (LayerNormalize and Scale), GELU and the other activations, dropout:
  ``R_in = R``.
- :class:`CheferAttentionRule`: both attention products (``q kᵀ`` and ``A v``) split by gradient × input between
  their two factors, each half; the softmax and the qk-norms pass relevance unchanged; a constant score bias
  (BEiT's relative position bias) is a summand of the scores and keeps its share of their sum rule; a rotary
  embedding (EVA-02) is part of the product ``rope(q) rope(k)ᵀ``, bilinear in q and k. It hands out the relevance
  of the attention probabilities of each block under :data:`ATTENTION_RELEVANCE`.
- :class:`CheferSkipConnectionRule` / :class:`CheferSumRule`: gradient × input split of a sum, then both (all)
  branches rescaled so that branch ``k`` holds ``|Σ a_k| / Σ_k' |Σ a_k'| · Σ R``.
- :class:`CheferPositionalEmbeddingRule`: ``x + e`` treated as such a sum of two operands; the embedding's
  share stays behind (accounting: ``positional_embedding``).
- :class:`CheferSelectTokenRule`, :class:`CheferTokenMeanRule`: the token-selection rules of
  :mod:`lrpkit.rules.transformer`.

All rules here (except the two below the attention blocks, z^B and the convolution rule) keep the autograd graph
of the forward pass through the chain when their input carries one. A :class:`~lrpkit.tape.Tape` with
``graph_from=k`` starts that graph at the input of layer ``k``; every attention step above it then hands out its
attention probabilities in the graph (key :data:`ATTENTION`), so that :class:`lrpkit.methods.chefer.
TransformerAttribution` gets ``∂y_t/∂A_b`` from the recording forward pass with one backward pass and no second
forward pass. Without it (plain :class:`lrpkit.LRP` use) no graph is built. Every attention step hands out the
relevance of its attention probabilities (key :data:`ATTENTION_RELEVANCE`); where the tape stops after it
(``stop_after``), it computes nothing below.

Memory (issue 16): the records keep, per block, the residual stream after the attention and after the MLP (the
residual rule's input and output), ``x W`` of the four Linear layers (without the bias) and the attention
probabilities ``A``. Everything else that the reverse loop reads is recomputed from them, bitwise as the forward
pass computed it: the LayerNorm, affine and GELU outputs (the Linear layers' inputs, through the tape's lazy inputs),
``x W + b``, q, k, v, ``q kᵀ``, ``y = A v`` and its merged heads. Where the recording pass keeps an autograd graph,
that graph saves ``x W + b`` (the GELU's input) and the per-head copies of q, k and v as the same recipes
(:func:`torch.autograd.graph.saved_tensors_hooks`), recomputed in the backward pass, so that the graph holds
nothing beyond the records but LayerNorm's per-token statistics. No copy of the weights is kept per analyzer.

Reference code: hila-chefer/Transformer-Explainability (``modules/layers_ours.py``, ``baselines/ViT/ViT_LRP.py``).
Differences: everything is per sample (the reference sums over the whole batch, which it only runs at batch 1);
the positional embedding of the class token is folded into :class:`~lrpkit.layers.ClassToken` in lrpkit's chain,
so the positional-embedding rule sums over the patch tokens only.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerNormalize, PositionalEmbedding, Rotary, Scale, SelfAttention
from ..propagate import Record, Step, per_sample
from ..recompute import Recipe, recomputable, saving_recipes, to_keep, value_of
from ..traits import Traits
from .base import ACTIVATION_TYPES, RESHAPE_TYPES, IncompatibleRuleError, Rule
from .basic import PassRule, ZBoxRule
from .structural import SkipConnectionRule, SumRule
from .terms import Group, Term, TermRule, neg, no_bias, pos, same
from .transformer import SelectClassTokenRule, TokenMeanRule

SAFE_EPS = 1e-9

#: Hand-out key (:meth:`lrpkit.tape.Tape.hand_out`, in ``Explanation.extras`` for :class:`lrpkit.LRP`): list of
#: ``(step.index, R_A)``, the relevance of the attention probabilities (B, heads, N, N) of each block, in the order
#: the reverse loop reaches them (sort by index for block order).
ATTENTION_RELEVANCE = "chefer_attention_relevance"
#: Hand-out key: list of ``(step.index, A)`` with ``A`` in the recording pass's autograd graph (attention steps at or
#: above the tape's ``graph_from``).
ATTENTION = "chefer_attention"


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = SAFE_EPS) -> torch.Tensor:
    """``a / (b + ε·sign(b))`` where ``b ≠ 0``, and 0 where ``b = 0``: the reference's ``safe_divide``, except that
    ε moves a negative ``b`` away from zero (the reference adds +ε to every ``b``; a difference of O(ε/|b|))."""
    den = torch.sign(b).mul_(eps).add_(b)  # 0 exactly where b = 0
    return (a / den).masked_fill_(den == 0, 0)


def _safe_divide_into(a: torch.Tensor, b: torch.Tensor, eps: float = SAFE_EPS) -> torch.Tensor:
    """:func:`safe_divide` written into ``b``, a fresh tensor of ``a``'s shape that the caller gives up (the same
    values: ``b + ε·sign(b)`` is ``ε·sign(b) + b``)."""
    b.add_(torch.sign(b).mul_(eps))
    zero = b == 0
    return torch.div(a, b, out=b).masked_fill_(zero, 0)


def _per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def rescaled_split(shares: list[torch.Tensor], R: torch.Tensor) -> list[torch.Tensor]:
    """Chefer et al.'s normalisation of a sum's relevance shares (their eq. for skip connections): share ``k``
    (with per-sample sum ``S_k = Σ a_k``) becomes ``a_k · |S_k| / Σ_k' |S_k'| · ΣR / S_k``
    ``= a_k · sign(S_k) · ΣR / Σ_k' |S_k'|``, so that its sum is ``|S_k| / Σ_k' |S_k'| · ΣR`` (0 where a
    denominator is 0). The shares then sum to ``ΣR`` exactly, per sample."""
    sums = [per_sample(a) for a in shares]
    total = per_sample(R)
    den = sum(s.abs() for s in sums)
    factor = safe_divide(total, den)
    return [a * _per_sample_view(torch.sign(s) * factor, a) for a, s in zip(shares, sums)]


class _GraphForward:
    """Forward that keeps the autograd graph of its input (if it has one): ``Record(x.detach(), layer(x))``
    (the record keeps ``x``'s recipe where it has one, and so does the graph). The next layer receives the
    graph-connected output; ``lrp`` works on detached values."""

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        with saving_recipes():
            return Record(to_keep(x), step.layer(x))


# -- Linear / Conv ---------------------------------------------------------------------------------------------
class CheferLinearRule(Rule):
    """LRP-α1β0 with the bias ignored, for ``nn.Linear`` (Chefer et al. 2021; their reference's ``Linear.relprop``
    with ``alpha=1``):

    ``z⁺_j = Σ_i (a_i w_ij)⁺ = Σ_i a_i⁺ w_ij⁺ + a_i⁻ w_ij⁻``,  ``R_i = Σ_j (a_i w_ij)⁺ · sdiv(R_j, z⁺_j)``.

    Computed in closed form with ``(a w)⁺ = (a w + |a||w|) / 2``: ``z⁺ = (a W + |a| |W|) / 2`` (``a W`` from the
    forward pass) and ``R_in = (a ⊙ (s W) + |a| ⊙ (s |W|)) / 2`` with ``s = sdiv(R, z⁺)``: three matrix products
    instead of four. Conserves ``Σ R_in = Σ R`` except for outputs with ``z⁺_j = 0`` (their relevance is dropped,
    reported as ``stabilizer``). Token rows whose relevance is zero everywhere are skipped (the last block of a ViT,
    where only the class token carries relevance). ``|W|`` is built in ``lrp`` and freed after the layer: no copy of
    the weights is kept per analyzer (one ``abs`` over the weight per call, about 1% of the call at batch 1).

    Memory: the record keeps ``a W`` (without the bias) and, where the layer below is element-wise, not even the
    input (recomputed from below). The output ``a W + b`` is marked as recomputable from ``a W``, so that whoever
    needs it again (the next layer's record, the autograd graph of the recording pass) keeps the recipe instead.
    """

    targets = (nn.Linear,)
    accepted = (nn.Linear,)

    def __init__(self, epsilon: float = SAFE_EPS):
        self.epsilon = epsilon

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer = step.layer
        zn = F.linear(x, layer.weight)
        kept = zn.detach()
        if layer.bias is None:
            return Record(to_keep(x), zn, extras={"zn": kept})
        out = recomputable(zn + layer.bias, torch.add, kept, layer.bias)  # the record keeps zn, not zn + b
        return Record(to_keep(x), out, extras={"zn": kept})

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        w = step.layer.weight
        with torch.no_grad():
            x = rec.input.reshape(-1, w.shape[1])
            zn = rec.extras["zn"].reshape(-1, w.shape[0])
            r = R.reshape(-1, w.shape[0])
            rows = None
            if r.shape[0] > 1:
                active = r.any(1)
                n = int(active.sum())
                if n <= r.shape[0] // 2:
                    rows = active.nonzero().squeeze(1)
                    x, zn, r = x[rows], zn[rows], r[rows]
            out = self._relevance(x, zn, r, w, w.abs())  # |W| built here and freed with the step
            if rows is not None:
                out = torch.zeros(rec.input.numel() // w.shape[1], w.shape[1], dtype=out.dtype,
                                  device=out.device).index_copy_(0, rows, out)
            return out.reshape(rec.input.shape)

    def _relevance(self, x, zn, r, w, w_abs):
        # with z2 = 2 z⁺ = x W + |x| |W| and s = R / (z2 + 2ε) = sdiv(R, z⁺) / 2:  R_in = x ⊙ (s W) + |x| ⊙ (s |W|)
        x_abs = x.abs()
        z2 = torch.addmm(zn, x_abs, w_abs.t()).clamp_(min=0).add_(2 * self.epsilon)
        dropped = z2 <= 2 * self.epsilon
        s = torch.div(r, z2, out=z2).masked_fill_(dropped, 0)  # written into z2
        return (s @ w).mul_(x).addcmul_(x_abs, s @ w_abs)

    def traits(self, layer) -> Traits:
        # lrp reads the input (recomputed where the layer below is element-wise) and zn = a W from the record's
        # extras; the output zn + b is left to whoever keeps it, as its recipe
        return Traits(output=False, lazy_input=True)


class CheferZPlusRule(TermRule):
    """LRP-α1β0 with the bias ignored for convolutions (and Linear), by terms:
    ``R_i = Σ_j (a_i⁺ w_ij⁺ + a_i⁻ w_ij⁻) / stab(Σ_i' a_i'⁺ w_i'j⁺ + a_i'⁻ w_i'j⁻) · R_j`` (the reference's
    ``Conv2d.relprop`` for layers after the first). Same formula as :class:`CheferLinearRule`, computed
    term by term (slower; also the independent check of the closed form in the tests)."""

    def __init__(self, stabilizer: float = SAFE_EPS):
        self.stabilizer = stabilizer

    def groups(self):
        return (Group((Term(pos, no_bias(pos)), Term(neg, no_bias(neg)))),)


class CheferZBoxRule(ZBoxRule):
    """LRP-z^B (Montavon et al. 2017) for the patch projection with the bounds taken from the input of each call
    (Chefer et al.'s reference: ``l`` and ``h`` = min and max of the input image):

    ``R_i = Σ_j (a_i w_ij − l w_ij⁺ − h w_ij⁻) / stab(Σ_i' a_i' w_i'j − l w_i'j⁺ − h w_i'j⁻) · R_j``  (bias ignored).

    ``per_sample=True`` (default, as the reference): ``l``/``h`` are the min/max over each sample (all channels and
    pixels), so a batch gives the relevance of each of its samples analysed alone. ``per_sample=False``: min/max
    over the whole batch. Conserves up to the stabiliser (ε = 1e-9 as in the reference)."""

    def __init__(self, per_sample: bool = True, stabilizer: float = SAFE_EPS):
        self.per_sample, self.stabilizer = per_sample, stabilizer

    def _input_bound(self, kind: str):
        def fn(a, name=""):
            if self.per_sample:
                flat = a.flatten(1)
                v = flat.amin(1) if kind == "low" else flat.amax(1)
                return _per_sample_view(v, a).expand_as(a)
            return (a.amin() if kind == "low" else a.amax()).expand_as(a)
        return fn

    def groups(self):
        return (Group((Term(same, no_bias(same)),
                       Term(self._input_bound("low"), no_bias(pos), -1.0),
                       Term(self._input_bound("high"), no_bias(neg), -1.0))),)

    def traits(self, layer) -> Traits:
        return replace(super().traits(layer), remainder="stabilizer")  # the bias is ignored, not absorbed


# -- element-wise, token and structural layers ------------------------------------------------------------------
class CheferPassRule(_GraphForward, PassRule):
    """``R_in = R``: Chefer et al.'s rule for LayerNorm (lrpkit's ``LayerNormalize`` and its affine ``Scale``, also
    LayerScale), GELU and the other activations, dropout and identity. :class:`~lrpkit.rules.PassRule` that keeps
    the forward graph. Conserves exactly."""

    accepted = (LayerNormalize, Scale, nn.LayerNorm, nn.Dropout, nn.Identity) + ACTIVATION_TYPES + RESHAPE_TYPES

    def traits(self, layer) -> Traits:
        # every layer it accepts is cheap to recompute (element-wise, or a LayerNorm over one token), so the layer
        # above recomputes its input instead of keeping it; dropout only where it cannot be random
        return replace(super().traits(layer), output_recomputable=not isinstance(layer, nn.Dropout))


class CheferSelectTokenRule(_GraphForward, SelectClassTokenRule):
    """``y = x[:, i]``: ``R_in[:, i] = R``, zero elsewhere (the reference's ``IndexSelect``: gradient × input, exact).
    Keeps the forward graph."""

    def lrp(self, step, rec, R, tape):
        with torch.no_grad():
            return super().lrp(step, rec, R, tape)


class CheferTokenMeanRule(_GraphForward, TokenMeanRule):
    """``y = 1/M Σ_{n>=start} x_n``: ``R_in[:, n] = x_n / M / stab(y) ⊙ R`` (gradient × input; not part of the
    reference, which has no mean pooling). Keeps the forward graph."""

    def __init__(self, epsilon: float = SAFE_EPS):
        self.epsilon = epsilon

    def lrp(self, step, rec, R, tape):
        rec = Record(rec.input, rec.output.detach(), rec.extras, rec.absorbed)
        with torch.no_grad():
            return super().lrp(step, rec, R, tape)


class CheferPositionalEmbeddingRule(_GraphForward, Rule):
    """``y = x + e`` as one of Chefer et al.'s sums of two operands: ``a = x ⊙ sdiv(R, y)``, ``b = e ⊙ sdiv(R, y)``,
    then :func:`rescaled_split`; ``R_x`` is the rescaled ``a`` (sum ``|Σa| / (|Σa| + |Σb|) · ΣR``), the rest stays
    with the embedding (accounting: ``positional_embedding``). The reference applies its ``Add`` rule here."""

    targets = ()
    accepted = (PositionalEmbedding,)

    def __init__(self):
        pass

    def lrp(self, step, rec, R, tape):
        with torch.no_grad():
            y = rec.output.detach()
            s = safe_divide(R, y)
            R_x, R_e = rescaled_split([rec.input * s, (y - rec.input) * s], R)
            rec.absorbed["positional_embedding"] = per_sample(R_e)
            return R_x


class CheferSkipConnectionRule(SkipConnectionRule):
    """Chefer et al.'s residual rule for ``y = a + f(a)``: gradient × input split ``a ⊙ sdiv(R, y)``,
    ``f(a) ⊙ sdiv(R, y)``, then both rescaled (:func:`rescaled_split`) so that the branch sums are
    ``|Σa| / (|Σa| + |Σf|) · ΣR`` and ``|Σf| / (|Σa| + |Σf|) · ΣR`` (per sample); the ``f`` share is propagated
    through ``f``, the result added to the ``a`` share. Conserves exactly at the split. Keeps the forward graph."""

    keeps_graph = True

    def __init__(self, epsilon: float = SAFE_EPS):
        self.epsilon = epsilon

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        with torch.no_grad():
            s = safe_divide(R, rec.output.detach(), self.epsilon)
            a, f = rescaled_split([summand * s for summand in self.summands(rec)], R)
        return a + tape.backward(step.children[0], f)


class CheferSumRule(SumRule):
    """:class:`CheferSkipConnectionRule` for parallel branches ``y = Σ_k f_k(a)`` (the distilled head): shares
    ``f_k ⊙ sdiv(R, y)`` rescaled to sums ``|Σ f_k| / Σ_k' |Σ f_k'| · ΣR`` (:func:`rescaled_split`), each propagated
    through its branch. Keeps the forward graph."""

    keeps_graph = True

    def __init__(self, epsilon: float = SAFE_EPS):
        self.epsilon = epsilon

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        with torch.no_grad():
            s = safe_divide(R, rec.output.detach(), self.epsilon)
            shares = rescaled_split([summand * s for summand in self.summands(rec)], R)
        R_in = torch.zeros_like(rec.input)
        for branch, share in zip(step.children, shares):
            R_in = R_in + tape.backward(branch, share)
        return R_in


# -- attention ---------------------------------------------------------------------------------------------------
def product_split(x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, z: torch.Tensor, fn, eps: float = SAFE_EPS):
    """Chefer et al.'s rule for a product ``z = fn(x, y)`` linear in each factor (their ``einsum.relprop`` followed by
    the halving in ``Attention.relprop``): ``s = sdiv(R, z)``, ``R_x = x ⊙ (∂z/∂x)ᵀ s / 2``,
    ``R_y = y ⊙ (∂z/∂y)ᵀ s / 2``. By Euler's theorem ``Σ R_x = Σ R_y = Σ R / 2`` (where ``z ≠ 0``): the halving
    is the normalisation that keeps the sum. Generic (autograd) form; the attention rule uses the closed forms."""
    with torch.enable_grad():
        x_, y_ = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        out = fn(x_, y_)
    gx, gy = torch.autograd.grad(out, (x_, y_), safe_divide(R, z, eps))
    return x * gx / 2, y * gy / 2


class CheferAttentionRule(Rule):
    """Chefer et al.'s relevance through :class:`~lrpkit.layers.SelfAttention`, per head:

    - output projection: ``linear_rule`` (α1β0, bias ignored) gives ``R_y`` for ``y = A v``;
    - ``A v``: ``s = sdiv(R_y, y)``; ``R_A = A ⊙ (s vᵀ) / 2``, ``R_v = v ⊙ (Aᵀ s) / 2``;
    - softmax and the constant factor ``scale`` pass: the relevance of the scores ``S`` is ``R_A``;
    - a constant score bias ``B`` (BEiT's relative position bias; ``S = q kᵀ·scale + B``) is a summand of the
      scores, and Chefer et al. treat a sum of two operands with their sum rule (their ``Add.relprop``, which lrpkit
      applies to the residuals and the positional embedding as well): ``t = sdiv(R_A, S)``, the shares
      ``P ⊙ t`` of the product ``P = q kᵀ·scale`` and ``B ⊙ t`` of the bias, rescaled per sample
      (:func:`rescaled_split`) to ``|ΣPt| / (|ΣPt| + |ΣBt|) · ΣR_A`` and ``|ΣBt| / (|ΣPt| + |ΣBt|) · ΣR_A``. The
      bias's share stays with it (accounting: ``attention_bias``); the product's, ``R_P``, goes on. Without a
      bias ``R_P = R_A``;
    - ``dots = q' k'ᵀ`` with ``q' = rope(norm_q(q))``, ``k' = rope(norm_k(k))``: ``s' = sdiv(R_P, dots)``;
      ``R_q = norm_q(q) ⊙ Jᵀ(s' k') / 2``, ``R_k = norm_k(k) ⊙ Jᵀ(s'ᵀ q') / 2`` with ``J`` the (linear) rotary
      embedding (:class:`~lrpkit.layers.Rotary`; the identity without one). That is Chefer et al.'s product rule,
      gradient × input halved, applied to the map ``(q, k) ↦ rope(q) rope(k)ᵀ``, which is bilinear in q and k, so
      that ``Σ R_q = Σ R_k = Σ R_P / 2`` (Euler), and it equals the rule on ``q' k'ᵀ`` followed by gradient × input
      through the rotation (which has no bias); qk-norms (LayerNorm) pass;
    - ``[R_q, R_k, R_v]`` through the qkv projection with ``linear_rule``.

    ``R_A`` (B, heads, N, N), the relevance of the attention probabilities, is handed out as ``(step.index, R_A)``
    under :data:`ATTENTION_RELEVANCE` (→ ``Explanation.extras``); where the tape stops after this step, nothing
    below ``R_A`` is computed. The recording pass keeps the graph of its input (if it has one) and then hands out
    the attention probabilities under :data:`ATTENTION`. Conserves at both products and at the bias's sum; the
    projections conserve as :class:`CheferLinearRule` does. Attention within groups of tokens (Swin's windows) is
    refused: Chefer et al.'s method composes token-to-token attention maps, which windows do not have.

    The record keeps ``x W_qkv``, ``A`` and ``y W_proj`` (and the input, unless the tape recomputes it); ``lrp``
    recomputes q, k, v, ``q kᵀ``, ``y = A v`` and the merged heads from them (:meth:`values` shows them). The
    products are computed as :func:`torch.matmul` computes them (``bmm`` on per-head copies), so that the graph
    can save those copies as recipes.
    """

    targets = ()
    accepted = (SelfAttention,)

    def __init__(self, linear_rule: CheferLinearRule | None = None, epsilon: float = SAFE_EPS):
        linear_rule = linear_rule if linear_rule is not None else CheferLinearRule()
        if not isinstance(linear_rule, CheferLinearRule):
            raise TypeError(f"CheferAttentionRule needs a CheferLinearRule for its projections (it keeps the "
                            f"forward graph for the attention gradients), got {linear_rule!r}")
        self.linear_rule, self.epsilon = linear_rule, epsilon

    def check(self, layer):
        super().check(layer)
        for norm in (layer.q_norm, layer.k_norm):
            if not isinstance(norm, (nn.Identity, nn.LayerNorm)):
                raise IncompatibleRuleError(f"CheferAttentionRule passes relevance through LayerNorm qk-norms; "
                                            f"got {type(norm).__name__}")
        if not isinstance(layer.norm, nn.Identity):
            raise IncompatibleRuleError("CheferAttentionRule does not handle a norm after the attention "
                                        "(scale_attn_norm)")
        if not isinstance(layer.rope, (nn.Identity, Rotary)):
            raise IncompatibleRuleError(f"CheferAttentionRule handles lrpkit.layers.Rotary position embeddings (a "
                                        f"linear map of q and k); got {type(layer.rope).__name__}")
        if type(layer).group is not SelfAttention.group:
            raise IncompatibleRuleError("CheferAttentionRule handles global attention (every token attends to every "
                                        "token); this layer attends within groups of tokens (windows)")

    def prepare(self, layer: SelfAttention):
        sub = {"qkv": Step(layer.qkv, self.linear_rule, -1, "qkv", "qkv"),
               "proj": Step(layer.proj, self.linear_rule, -1, "proj", "proj")}
        for s in sub.values():
            s.state = self.linear_rule.prepare(s.layer)
        return sub

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer, sub = step.layer, step.state
        with saving_recipes():
            qkv = self.linear_rule.forward(sub["qkv"], x, tape)
            qkv_out = to_keep(qkv.output)  # x W + b, as its recipe from x W
            q, k, v = (recomputable(t, _head, layer, qkv_out, i, False)  # a qk-norm's graph saves its input
                       for i, t in enumerate(_heads(layer, qkv.output)))
            qr, kr = layer.positions(q, k)  # qk-norm, then the rotary embedding (each the identity if absent)
            # the products as torch.matmul computes them (bmm on per-head copies), the copies marked so that the
            # graph saves them as recipes from x W (the record's) instead of a second copy of q, k and v
            q_c = recomputable(_fold(qr), _head, layer, qkv_out, 0, True)
            k_c = recomputable(_fold(kr.transpose(-2, -1)), _head, layer, qkv_out, 1, True)
            v_c = recomputable(_fold(v), _head, layer, qkv_out, 2, True)
            dots = torch.bmm(q_c, k_c).view(qr.shape[:-1] + kr.shape[-2:-1])
            attn = _scores(layer, dots, qr).softmax(-1)
            y = torch.bmm(_fold(attn), v_c).view(attn.shape[:-1] + v.shape[-1:])
            proj = self.linear_rule.forward(sub["proj"], layer.merge_heads(y), tape)
        if attn.requires_grad:
            tape.hand_out(step, ATTENTION, attn)
        # what lrp reads: x (the tape's; recomputed where the layer below is element-wise), x W_qkv (zn of the qkv
        # record), A, and y W_proj (zn of the proj record); q, k, v, q kᵀ, y = A v and its merged heads (the proj
        # record's input) are recomputed from them
        out = proj.output
        qkv.input = qkv.output = proj.input = proj.output = None
        extras = {"qkv": qkv, "qkv_out": qkv_out, "proj": proj, "attn": attn.detach()}
        return Record(to_keep(x), out, extras=extras)

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor | None:
        layer, sub, e = step.layer, step.state, rec.extras
        with torch.no_grad():
            q, k, v = _heads(layer, value_of(e["qkv_out"]))
            y = _attend(e["attn"], v)
        e["proj"].input = layer.merge_heads(y)
        R_y = layer.split_heads(self.linear_rule.lrp(sub["proj"], e["proj"], R, tape))
        R_qkv = self._products(layer, e["attn"], q, k, v, y, R_y, step, tape, rec)
        if R_qkv is None:
            return None
        e["qkv"].input = rec.input
        return self.linear_rule.lrp(sub["qkv"], e["qkv"], R_qkv, tape)

    def _products(self, layer, attn, q, k, v, y, R_y: torch.Tensor, step: Step, tape,
                  rec: Record) -> torch.Tensor | None:
        """``R_y`` through ``y = A v``, the score bias and ``q kᵀ``: the relevance of the qkv projection's output
        (hands out ``R_A``; None where the tape stops after this step). Its temporaries are freed on return."""
        eps = self.epsilon
        with torch.no_grad():
            s = safe_divide(R_y * 0.5, y, eps)  # the halves folded into s
            R_attn = (s @ v.transpose(-2, -1)).mul_(attn)
            tape.hand_out(step, ATTENTION_RELEVANCE, R_attn)
            if not tape.needed(step):
                return None
            B, H, N, d = R_y.shape
            R_qkv = R_y.new_empty(B, N, 3 * H * d)
            R_q, R_k, R_v = _heads(layer, R_qkv)  # [R_q, R_k, R_v] with merged heads, written in place
            R_v.copy_((attn.transpose(-2, -1) @ s).mul_(v))
            del s
            qn, kn = layer.q_norm(q), layer.k_norm(k)
            qr, kr = layer.rope(qn), layer.rope(kn)
            dots = qr @ kr.transpose(-2, -1)  # q kᵀ recomputed, bitwise the forward's
            bias = layer.score_bias(qr)
            if bias is None:
                s2 = _safe_divide_into(R_attn, dots, eps)
            else:  # S = P + B, P = q kᵀ·scale: Chefer's sum rule; the bias keeps its share
                t = safe_divide(R_attn, _scores(layer, dots, qr), eps)
                R_P, R_B = rescaled_split([(dots * layer.scale).mul_(t), t.mul_(bias)], R_attn)
                rec.absorbed["attention_bias"] = per_sample(R_B)
                del t, R_B
                s2 = _safe_divide_into(R_P, dots, eps)
            if isinstance(layer.rope, nn.Identity):
                R_q.copy_((s2 @ kn).mul_(qn).mul_(0.5))
                R_k.copy_((s2.transpose(-2, -1) @ qn).mul_(kn).mul_(0.5))
            else:  # gradient × input of (q, k) ↦ rope(q) rope(k)ᵀ: the rotation's transpose on s' k'
                R_q.copy_(_transposed(layer.rope, qn, s2 @ kr).mul_(qn).mul_(0.5))
                R_k.copy_(_transposed(layer.rope, kn, s2.transpose(-2, -1) @ qr).mul_(kn).mul_(0.5))
            return R_qkv

    def traits(self, layer) -> Traits:
        # lrp reads the input (for the qkv projection) and its extras, not the output (the residual rule keeps that)
        return Traits(output=False, lazy_input=True)

    @staticmethod
    def values(layer: SelfAttention, rec: Record) -> dict:
        """The intermediate values of the recorded forward pass through ``layer``, from its record (as ``lrp`` sees
        them): ``qn``, ``kn`` (after the qk-norms), ``qr``, ``kr`` (rotated; ``qn``, ``kn`` without a rotary
        embedding), ``v`` (B, heads, N, d), ``dots = qr krᵀ``, ``bias`` (the score bias or None), ``scores`` and
        ``attn`` (B, heads, N, N), ``y = attn v`` (B, heads, N, d)."""
        with torch.no_grad():
            q, k, v = _heads(layer, value_of(rec.extras["qkv_out"]))
            qn, kn = layer.q_norm(q), layer.k_norm(k)
            qr, kr = layer.rope(qn), layer.rope(kn)
            dots = qr @ kr.transpose(-2, -1)
            attn = rec.extras["attn"]
            return {"qn": qn, "kn": kn, "qr": qr, "kr": kr, "v": v, "dots": dots, "bias": layer.score_bias(qr),
                    "scores": _scores(layer, dots, qr), "attn": attn, "y": _attend(attn, v)}


def _heads(layer: SelfAttention, qkv: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v (B, heads, N, d): views of the qkv projection's output (B, N, 3·heads·d)."""
    return [layer.split_heads(t) for t in qkv.chunk(3, dim=-1)]


def _scores(layer: SelfAttention, dots: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``S = dots · scale (+ B)`` as the forward computes it, ``dots = q kᵀ`` (B, H, N, N)."""
    scores = dots * layer.scale
    bias = layer.score_bias(q)
    return scores if bias is None else scores + bias


def _transposed(rope: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Jᵀ g`` for the linear map ``rope`` (its vector-Jacobian product; ``x`` gives only the shape)."""
    with torch.enable_grad():
        x_ = torch.zeros_like(x, requires_grad=True)
        (out,) = torch.autograd.grad(rope(x_), x_, g)
    return out


def _fold(t: torch.Tensor) -> torch.Tensor:
    """(B, H, n, m) -> (B·H, n, m) as torch.matmul folds the batch dimensions (a copy unless a view can do)."""
    return t.reshape(-1, *t.shape[-2:])


def _attend(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``y = A v`` (B, H, N, d) as the forward computes it."""
    return torch.bmm(_fold(attn), _fold(v)).view(attn.shape[:-1] + v.shape[-1:])


def _head(layer: SelfAttention, qkv_out, i: int, folded: bool) -> torch.Tensor:
    """Recipe: the ``i``-th of q, k, v from the kept qkv output; ``folded``: normalised and rotated (q, k) and folded
    as the forward's product takes it (kᵀ for k)."""
    if isinstance(qkv_out, Recipe) and qkv_out.fn is torch.add:  # x W + b: only the i-th third (element-wise)
        zn, b = qkv_out.args
        with torch.no_grad():
            t = layer.split_heads(torch.add(zn.chunk(3, dim=-1)[i], b.chunk(3)[i]))
    else:
        t = _heads(layer, value_of(qkv_out))[i]
    if not folded:
        return t
    if i < 2:
        t = layer.rope((layer.q_norm if i == 0 else layer.k_norm)(t))
    return _fold(t.transpose(-2, -1) if i == 1 else t)


__all__ = [
    "ATTENTION", "ATTENTION_RELEVANCE", "CheferAttentionRule", "CheferLinearRule",
    "CheferPassRule", "CheferPositionalEmbeddingRule", "CheferSelectTokenRule", "CheferSkipConnectionRule",
    "CheferSumRule", "CheferTokenMeanRule", "CheferZBoxRule", "CheferZPlusRule", "product_split",
    "rescaled_split", "safe_divide",
]
