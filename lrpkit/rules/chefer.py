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
  their two factors, each half; the softmax and the qk-norms pass relevance unchanged. It hands out the
  relevance of the attention probabilities of each block under :data:`ATTENTION_RELEVANCE`.
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

from ..layers import LayerNormalize, PositionalEmbedding, Scale, SelfAttention
from ..propagate import Record, Step, per_sample
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
    """Forward that keeps the autograd graph of its input (if it has one): ``Record(x.detach(), layer(x))``.
    The next layer receives the graph-connected output; ``lrp`` works on detached values."""

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        return Record(x.detach(), step.layer(x))


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
    """

    targets = (nn.Linear,)
    accepted = (nn.Linear,)

    def __init__(self, epsilon: float = SAFE_EPS):
        self.epsilon = epsilon

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer = step.layer
        zn = F.linear(x, layer.weight)
        out = zn if layer.bias is None else zn + layer.bias
        return Record(x.detach(), out, extras={"zn": zn.detach()})

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        w = step.layer.weight
        with torch.no_grad():
            x = rec.input.reshape(-1, w.shape[1])
            zn = rec.extras["zn"].reshape(-1, w.shape[0])
            r = R.reshape(-1, w.shape[0])
            rows = None
            if r.shape[0] > 1:
                active = r.ne(0).any(1)
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
        s = (r / z2).masked_fill_(z2 <= 2 * self.epsilon, 0)
        return (s @ w).mul_(x).addcmul_(x_abs, s @ w_abs)

    def traits(self, layer) -> Traits:
        return Traits(output=False)  # lrp reads the input and a W from the record's extras


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
            a, f = rescaled_split([summand * s for summand in rec.extras["summands"]], R)
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
            shares = rescaled_split([summand * s for summand in rec.extras["summands"]], R)
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
    - softmax and the constant factor ``scale`` pass: the relevance of ``dots = q kᵀ`` is ``R_A``;
    - ``dots = q kᵀ``: ``s' = sdiv(R_A, dots)``; ``R_q = q ⊙ (s' k) / 2``, ``R_k = k ⊙ (s'ᵀ q) / 2``; qk-norms
      (LayerNorm) pass;
    - ``[R_q, R_k, R_v]`` through the qkv projection with ``linear_rule``.

    ``R_A`` (B, heads, N, N), the relevance of the attention probabilities, is handed out as ``(step.index, R_A)``
    under :data:`ATTENTION_RELEVANCE` (→ ``Explanation.extras``); where the tape stops after this step, nothing
    below ``R_A`` is computed. The recording pass keeps the graph of its input (if it has one) and then hands out
    the attention probabilities under :data:`ATTENTION`. Conserves at both products; the projections conserve as
    :class:`CheferLinearRule` does.
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

    def prepare(self, layer: SelfAttention):
        sub = {"qkv": Step(layer.qkv, self.linear_rule, -1, "qkv", "qkv"),
               "proj": Step(layer.proj, self.linear_rule, -1, "proj", "proj")}
        for s in sub.values():
            s.state = self.linear_rule.prepare(s.layer)
        return sub

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer, sub = step.layer, step.state
        qkv = self.linear_rule.forward(sub["qkv"], x, tape)
        q, k, v = (layer.split_heads(t) for t in qkv.output.chunk(3, dim=-1))
        qn, kn = layer.q_norm(q), layer.k_norm(k)
        dots = qn @ kn.transpose(-2, -1)
        attn = (dots * layer.scale).softmax(-1)
        y = attn @ v
        out = self.linear_rule.forward(sub["proj"], layer.merge_heads(y), tape)
        if attn.requires_grad:
            tape.hand_out(step, ATTENTION, attn)
        extras = {"qkv": qkv, "out": out, "qn": qn.detach(), "kn": kn.detach(), "v": v.detach(),
                  "attn": attn.detach(), "dots": dots.detach(), "y": y.detach()}
        return Record(x.detach(), out.output, extras=extras)

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor | None:
        layer, sub, e, eps = step.layer, step.state, rec.extras, self.epsilon
        R_y = layer.split_heads(self.linear_rule.lrp(sub["proj"], e["out"], R, tape))
        with torch.no_grad():
            attn, v, qn, kn = e["attn"], e["v"], e["qn"], e["kn"]
            s = safe_divide(R_y * 0.5, e["y"], eps)  # the halves folded into s
            R_attn = (s @ v.transpose(-2, -1)).mul_(attn)
            tape.hand_out(step, ATTENTION_RELEVANCE, R_attn)
            if not tape.needed(step):
                return None
            R_v = (attn.transpose(-2, -1) @ s).mul_(v)
            s2 = safe_divide(R_attn, e["dots"], eps)
            R_q = (s2 @ kn).mul_(qn).mul_(0.5)
            R_k = (s2.transpose(-2, -1) @ qn).mul_(kn).mul_(0.5)
            R_qkv = torch.cat([layer.merge_heads(t) for t in (R_q, R_k, R_v)], dim=-1)
        return self.linear_rule.lrp(sub["qkv"], e["qkv"], R_qkv, tape)


__all__ = [
    "ATTENTION", "ATTENTION_RELEVANCE", "CheferAttentionRule", "CheferLinearRule",
    "CheferPassRule", "CheferPositionalEmbeddingRule", "CheferSelectTokenRule", "CheferSkipConnectionRule",
    "CheferSumRule", "CheferTokenMeanRule", "CheferZBoxRule", "CheferZPlusRule", "product_split",
    "rescaled_split", "safe_divide",
]
