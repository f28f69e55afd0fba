"""Rules for the transformer layers: attention, positional embedding, LayerNorm and the token layers.

References: Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative Propagation"
(CP-LRP: attention probabilities and LayerNorm σ held constant); Achtibat et al. 2024, "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers"; RelevancePropagation.jl pull request #15 (SelfAttentionRule,
PositionalEmbeddingRule, SelectClassToken). Notation as in :mod:`lrpkit.rules.basic`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import (ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Rotary, SelectClassToken,
                      SelfAttention, TokenMean)
from ..propagate import ReachedStop, Record, Step, per_sample
from ..traits import Traits
from .base import IncompatibleRuleError, Rule, divide, writable
from .basic import EpsilonRule


class _ClosedFormRule(Rule):
    """A rule computed in closed form from the recorded input and output: no graph is kept."""

    targets = ()

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        with torch.no_grad():
            return Record(x.detach(), step.layer(x.detach()))


class PatchFlattenRule(_ClosedFormRule):
    """Inverse of :class:`~lrpkit.layers.PatchFlatten`: ``R_in[b, c, h, w] = R[b, h·W + w, c]``. Conserves."""

    accepted = (PatchFlatten,)

    def lrp(self, step, rec, R, tape):
        # dense, in the grid's order (R is a slice after the prefix tokens): the steps below and the accounting
        # read it whole
        return R.transpose(1, 2).reshape(rec.input.shape).contiguous()


class ClassTokenRule(_ClosedFormRule):
    """Drops the prefix tokens: ``R_in = R[:, P:]``. The prefix tokens' relevance (constants, not input) is
    reported in the accounting as ``class_token``, ``distillation_token`` and ``register_tokens``
    (RelevancePropagation.jl maps a ZeroRule onto this layer, which has the same effect)."""

    accepted = (ClassToken,)
    _keys = {"class": "class_token", "distillation": "distillation_token", "register": "register_tokens"}

    def lrp(self, step, rec, R, tape):
        layer = step.layer
        for i, kind in enumerate(layer.kinds):
            key = self._keys[kind]
            rec.absorbed[key] = rec.absorbed.get(key, 0) + per_sample(R[:, i])
        return R[:, layer.num_prefix:]


class PositionalEmbeddingRule(_ClosedFormRule):
    """``y = x + e``: ``R_x = x / stab(x + e) ⊙ R``; the rest, ``e / stab(x + e) ⊙ R``, stays with the embedding
    (reported as ``positional_embedding``). RelevancePropagation.jl's PositionalEmbeddingRule."""

    accepted = (PositionalEmbedding,)

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def lrp(self, step, rec, R, tape):
        s = divide(R, rec.output, self.epsilon)
        rec.absorbed["positional_embedding"] = per_sample((rec.output - rec.input) * s)
        return rec.input * s


class SelectClassTokenRule(_ClosedFormRule):
    """``y = x[:, i]``: all relevance to the selected token, ``R_in[:, i] = R``, zero elsewhere. Conserves."""

    accepted = (SelectClassToken,)

    def lrp(self, step, rec, R, tape):
        R_in = torch.zeros_like(rec.input)
        R_in[:, step.layer.index] = R
        return R_in


class TokenMeanRule(_ClosedFormRule):
    """``y = 1/M Σ_{n>=start} x_n``: ``R_in[:, n] = x_n / M / stab(y) ⊙ R`` for ``n >= start``, zero for the
    prefix tokens (LRP-ε on the mean)."""

    accepted = (TokenMean,)

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def lrp(self, step, rec, R, tape):
        start = step.layer.start
        tokens = rec.input[:, start:]
        s = divide(R, rec.output, self.epsilon)
        R_in = torch.zeros_like(rec.input)
        R_in[:, start:] = tokens * s.unsqueeze(1) / tokens.shape[1]
        return R_in


class LayerNormRule(_ClosedFormRule):
    """LRP-ε through ``y = (x − μ(x)) / σ`` with σ held constant (Ali et al. 2022): with ``s = R / stab(y)``,
    ``R_x = x / σ ⊙ (s − mean(s))`` (μ, σ and the mean over the layer's normalised dimension). Conserves:
    ``Σ R_x = Σ (y + μ/σ) s − (Σ x/σ) mean(s) = Σ R`` up to ε."""

    accepted = (LayerNormalize,)

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def traits(self, layer) -> Traits:
        # y is recomputed from x (cheaper than keeping it), so the next layer (the affine Scale) need not keep
        # its input either
        return Traits(output=False, output_recomputable=True)

    def lrp(self, step, rec, R, tape):
        x, dim = rec.input, step.layer.dim  # dim: the normalised dimension (-1; 1 for timm's LayerNorm2d)
        sigma = step.layer.sigma(x)
        # y as the forward computed it (and R was derived from): in bfloat16, (x − μ)/σ evaluated step by step
        # rounds differently from layer_norm, and R / y would amplify the difference where y is small. The record
        # holds y where the rule above recomputed it as its input (a lazy input, :class:`~lrpkit.tape.Tape`)
        y = rec.output if rec.output is not None else step.layer.normalize(x)
        s = divide(R, y, self.epsilon)  # a fresh tensor unless shapes differ: centred in place
        s = s.sub_(s.mean(dim, keepdim=True)) if writable(s, R) else s - s.mean(dim, keepdim=True)
        xs = torch.div(x, sigma, out=y)  # x / σ in y's buffer (fresh, or recomputed for the rule above: read no more)
        return xs.mul_(s) if writable(xs, s) else xs * s  # (out of place where s is vmapped over CRP's concepts)


def _linear_rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    """A frozen Linear made of some output rows of ``linear``."""
    w = linear.weight.detach()[rows]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w.clone(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=False)
    return out


class SelfAttentionRule(Rule):
    """Relevance through :class:`~lrpkit.layers.SelfAttention`.

    ``mode="cp"`` (CP-LRP, Ali et al. 2022; RelevancePropagation.jl's SelfAttentionRule): the attention
    probabilities A are held constant, so relevance reaches the input only through the values. Per head,
    ``y = A v``: ``R_v[j] = v[j] ⊙ Σ_i A[i, j] R_y[i] / stab(y[i])``; the query and key paths get none, and so do a
    score bias ``B`` (relative position bias, window mask) and a rotary embedding. The output projection uses
    ``out_rule``, the value projection ``value_rule`` (default LRP-ε for both). Conserves up to the stabilisers and
    the biases.

    ``mode="attnlrp"`` (Achtibat et al. 2024): both matrix products (``q kᵀ`` and ``A v``) split relevance evenly
    between their factors (for ``O = X Y`` and ``s = R_O / (2·stab(O))``: ``R_X = X ⊙ (s Yᵀ)``,
    ``R_Y = Y ⊙ (Xᵀ s)``); the softmax gets ``R_S = S ⊙ (R_A − A ⊙ Σ_j R_A)`` (its Taylor /
    LRP-ε rule). A score bias is a summand of ``S = q kᵀ·scale + B``: LRP-ε on the sum gives it
    ``R_B = B ⊙ R_S / stab(S)`` (reported in the accounting as ``attention_bias``) and the product the rest, so
    ``q`` and ``k`` get ``s = R_S / (2·stab(S))`` each through their gradient. A rotary embedding, linear in
    ``q`` (``k``), passes relevance by LRP-ε, ``R_q = q ⊙ Jᵀ (R_q' / stab(q'))``; qk-norms the LayerNorm rule; the
    whole qkv projection ``value_rule``. The softmax is not conservative (its bias term); the loss appears in the
    accounting under ``attention``.

    Attention within groups of tokens (:meth:`SelfAttention.group`, Swin's windows) runs on the grouped tokens;
    relevance returns through the inverse permutation, which conserves it exactly.
    """

    targets = ()
    accepted = (SelfAttention,)

    def __init__(self, value_rule: Rule | None = None, out_rule: Rule | None = None, mode: str = "cp",
                 epsilon: float = 1e-6):
        if mode not in ("cp", "attnlrp"):
            raise ValueError(f"SelfAttentionRule mode must be 'cp' or 'attnlrp', got {mode!r}")
        self.value_rule = value_rule if value_rule is not None else EpsilonRule()
        self.out_rule = out_rule if out_rule is not None else EpsilonRule()
        self.mode, self.epsilon = mode, epsilon

    def check(self, layer):
        super().check(layer)
        if not isinstance(layer.norm, nn.Identity):
            raise IncompatibleRuleError(f"{self!r} cannot handle a SelfAttention with a norm before the output "
                                        f"projection (timm's scale_attn_norm)")
        for rule, part in ((self.value_rule, layer.qkv), (self.out_rule, layer.proj)):
            rule.check(part)
        if self.mode == "attnlrp":
            for norm in (layer.q_norm, layer.k_norm):
                if not isinstance(norm, (nn.Identity, nn.LayerNorm)):
                    raise IncompatibleRuleError(
                        f"SelfAttentionRule(mode='attnlrp') handles LayerNorm qk-norms, got {norm}")

    def prepare(self, layer: SelfAttention):
        d = layer.qkv.out_features // 3
        value = _linear_rows(layer.qkv, slice(2 * d, 3 * d)) if self.mode == "cp" else layer.qkv
        sub = {"value": Step(value, self.value_rule, -1, "value", "value"),
               "out": Step(layer.proj, self.out_rule, -1, "proj", "proj")}
        if self.mode == "cp":
            sub["qk"] = _linear_rows(layer.qkv, slice(0, 2 * d))
        for step in (sub["value"], sub["out"]):
            step.state = step.rule.prepare(step.layer)
        return sub

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer, sub = step.layer, step.state
        x = x.detach()
        xg = layer.group(x)
        v_rec = self.value_rule.forward(sub["value"], xg, tape)
        if self.mode == "cp":
            with torch.no_grad():
                q, k = sub["qk"](xg).chunk(2, dim=-1)
                attn = layer.attention(*layer.positions(layer.split_heads(q), layer.split_heads(k)))
                v = layer.split_heads(v_rec.output.detach())
                y = attn @ v
            extras = {"value": v_rec, "attn": attn, "v": v}  # y: a view of the out projection's input
        else:
            with torch.no_grad():
                q, k, v = (layer.split_heads(t) for t in v_rec.output.detach().chunk(3, dim=-1))
                qn, kn = layer.q_norm(q), layer.k_norm(k)
                y = layer.scores(layer.rope(qn), layer.rope(kn)).softmax(-1) @ v
            # the scores S, A = softmax(S), the rotated q and k are recomputed in lrp (the same operations, the
            # same numbers), not kept: the record holds no (B, H, N, N) tensor; y is the out projection's input
            extras = {"value": v_rec, "q": q, "k": k, "qn": qn, "kn": kn, "v": v}
        o_rec = self.out_rule.forward(sub["out"], layer.merge_heads(y), tape)
        extras["out"], extras["batch"] = o_rec, x.shape[0]
        return Record(x, layer.ungroup(o_rec.output.detach(), x.shape[0]), extras=extras)

    # -- backward -----------------------------------------------------------------------------------------
    #: the inner site of the reverse pass (where CRP can condition): ``"values"``, the heads' value outputs
    #: ``y_h = A_h v_h`` merged over the heads, (B, N, H·d), the output projection's input; channels last
    sites = {"values": -1}

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        R = step.layer.group(R)  # the tokens in the groups that attend to each other (Swin's windows)
        R_values = self.out_rule.lrp(step.state["out"], rec.extras["out"], R, tape)  # at the heads' value outputs
        if tape.stops_at(step, "values"):
            raise ReachedStop(R_values)
        return self.lrp_from("values", step, rec, R_values, tape)

    def lrp_from(self, site: str, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        """The rule from its ``"values"`` site down: ``R`` at the heads' value outputs (B, N, H·d) to the input."""
        layer, sub, e = step.layer, step.state, rec.extras
        batch = e["batch"]
        R_y = layer.split_heads(R)
        if self.mode == "cp":
            s = divide(R_y, layer.split_heads(e["out"].input), self.epsilon)
            R_v = e["v"] * (e["attn"].transpose(-2, -1) @ s)
            R_t = layer.merge_heads(R_v)
        else:
            R_t = self._attnlrp(layer, e, R_y, rec, batch)
        R_in = layer.ungroup(self.value_rule.lrp(sub["value"], e["value"], R_t, tape), batch)
        bias = [r.absorbed["bias"] for r in (e["out"], e["value"]) if "bias" in r.absorbed]
        if bias:
            rec.absorbed["bias"] = _regroup(sum(bias), batch)
        return R_in

    def _attnlrp(self, layer: SelfAttention, e: dict, R_y: torch.Tensor, rec: Record, batch: int) -> torch.Tensor:
        # The uniform rule of both products in closed form (no second product, no autograd graph): for O = X Y with
        # s = R_O / (2·stab(O)), R_X = X ⊙ (s Yᵀ) and R_Y = Y ⊙ (Xᵀ s).
        eps = self.epsilon
        qr, kr, v = layer.rope(e["qn"]), layer.rope(e["kn"]), e["v"]
        S = layer.scores(qr, kr)
        A, y = S.softmax(-1), layer.split_heads(e["out"].input)  # as the forward computed them
        s = divide(R_y, y, eps).mul_(0.5)  # y = A v
        R_v = v * (A.transpose(-2, -1) @ s)
        g = s @ v.transpose(-2, -1)  # R_A = A ⊙ g
        # softmax Taylor rule (Achtibat et al. 2024, Prop. 3.1): R_S = S ⊙ (R_A − A ⊙ Σ_j R_A) = S ⊙ A ⊙ (g − Σ_j A g)
        R_S = g.sub_((A.unsqueeze(-2) @ g.unsqueeze(-1)).squeeze(-1)).mul_(A).mul_(S)
        del A, g
        # S = q kᵀ·scale + B, t = R_S / stab(S): the bias B takes B ⊙ t, the product the rest, half to each factor
        t = divide(R_S, S, eps)
        del R_S
        bias = layer.score_bias(qr)
        if bias is not None:
            rec.absorbed["attention_bias"] = _regroup(_sum_product(bias, t), batch)
        half = 0.5 * layer.scale
        R_qr = qr * (t @ kr).mul_(half)
        R_kr = kr * (t.transpose(-2, -1) @ qr).mul_(half)
        del t
        R_qn = _rope_lrp(layer.rope, e["qn"], qr, R_qr, eps)
        R_kn = _rope_lrp(layer.rope, e["kn"], kr, R_kr, eps)
        R_q = _norm_lrp(layer.q_norm, e["q"], e["qn"], R_qn, eps)
        R_k = _norm_lrp(layer.k_norm, e["k"], e["kn"], R_kn, eps)
        return torch.cat([layer.merge_heads(t) for t in (R_q, R_k, R_v)], dim=-1)

    def traits(self, layer) -> Traits:
        # AttnLRP's softmax rule is not conservative: what it loses is reported as ``attention``
        return Traits(remainder="attention" if self.mode == "attnlrp" else "stabilizer")


def _sum_product(bias: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ B ⊙ t`` per group, (G,), for ``t`` (G, H, n, n) and a bias broadcastable to it, as dot products (the
    product ``B ⊙ t`` is not materialised)."""
    b = torch.broadcast_to(bias.to(t.dtype), t.shape)
    flat = t.reshape(t.shape[0], -1)
    if b.stride(0) == 0:  # one bias for every group
        return flat @ b[0].reshape(-1)
    return (flat.unsqueeze(1) @ b.reshape(t.shape[0], -1, 1)).reshape(-1)


def _regroup(per_group: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample sums (B,) from per-group sums (B·G,) of grouped attention (the identity without groups)."""
    return per_group if per_group.shape[0] == batch else per_group.view(batch, -1).sum(1)


def _rope_lrp(rope: nn.Module, x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP-ε through a rotary embedding ``y = rope(x)`` (linear, no bias): ``R_x = x ⊙ Jᵀ (R / stab(y))``; the
    identity passes ``R``. ``Jᵀ`` in closed form for a :class:`~lrpkit.layers.Rotary`, else by autograd."""
    if isinstance(rope, nn.Identity):
        return R
    if isinstance(rope, Rotary):
        return x * rope.transpose(divide(R, y, eps))
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(rope(x_), x_, divide(R, y, eps))
    return x * g


def _norm_lrp(norm: nn.Module, x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP-ε through a qk-norm (LayerNorm with σ held constant, affine part included), or pass for Identity."""
    if isinstance(norm, nn.Identity):
        return R
    s = divide(R, y, eps)
    w = norm.weight if norm.weight is not None else 1.0
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    g = s * w
    return x / sigma * (g - g.mean(-1, keepdim=True))
