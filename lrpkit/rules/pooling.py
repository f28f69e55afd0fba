"""The rule for attention pooling with learned latent queries (:class:`~lrpkit.layers.AttentionPool`, timm's
``AttentionPoolLatent``, the 'map' head of SigLIP).

The pool is cross-attention from constant queries (the latent, a parameter of the model) to the tokens. Its two modes
are those of :class:`~lrpkit.rules.SelfAttentionRule`, with the query's share made explicit:

- CP-LRP (Ali et al. 2022): A held constant; relevance reaches the tokens only through the values. The latent query
  gets none.
- AttnLRP (Achtibat et al. 2024): the uniform rule on ``A v`` and ``q kᵀ``, the softmax's Taylor rule. Half of what
  reaches the scores goes to the query, a constant: it stays there and is reported as ``latent_query``.

References: Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative Propagation";
Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers"; Zhai et al.
2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP's multi-head attention pooling, MAP).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import AttentionPool
from ..propagate import Record, Step, per_sample
from ..recompute import to_keep
from ..traits import Traits
from .base import IncompatibleRuleError, Rule, divide
from .basic import EpsilonRule
from .chefer import ATTENTION, ATTENTION_RELEVANCE, SAFE_EPS, CheferLinearRule, safe_divide
from .transformer import _linear_rows, _norm_lrp


class AttentionPoolRule(Rule):
    """Relevance through :class:`~lrpkit.layers.AttentionPool`, ``y = merge(A v)`` with
    ``A = softmax(q kᵀ · scale)``, q from the latent (constant), k and v from the tokens ``x[:, start:]``.

    ``mode="cp"`` (CP-LRP): A held constant, per head ``R_v[j] = v[j] ⊙ Σ_l A[l, j] R_y[l] / stab(y[l])``; the
    value projection (the value half of ``W_kv``) uses ``value_rule`` (default LRP-ε). The keys and the latent query
    get nothing. Conserves up to the stabiliser and the bias.

    ``mode="attnlrp"`` (AttnLRP): ``R_A, R_v`` by the uniform rule on ``A v`` (half to each factor: with
    ``s = R_y / (2·stab(y))``, ``R_A = A ⊙ (s vᵀ)``, ``R_v = v ⊙ (Aᵀ s)``); the softmax's Taylor rule
    ``R_S = S ⊙ (R_A − A ⊙ Σ_j R_A)``; ``R_q, R_k`` by the uniform rule on ``q kᵀ · scale``; ``R_k`` through the
    k-norm (LayerNorm, σ constant); ``[R_k, R_v]`` through the whole ``W_kv`` with ``value_rule``. ``R_q`` stays with
    the latent query (a parameter): the accounting reports it as ``latent_query``; what the softmax rule loses as
    ``attention``.

    The prefix tokens the pool leaves out (``start``) get zero relevance in both modes.
    """

    targets = ()
    accepted = (AttentionPool,)

    def __init__(self, value_rule: Rule | None = None, mode: str = "cp", epsilon: float = 1e-6):
        if mode not in ("cp", "attnlrp"):
            raise ValueError(f"AttentionPoolRule mode must be 'cp' or 'attnlrp', got {mode!r}")
        self.value_rule = value_rule if value_rule is not None else EpsilonRule()
        self.mode, self.epsilon = mode, epsilon

    def check(self, layer):
        super().check(layer)
        self.value_rule.check(layer.kv)
        if self.mode == "attnlrp" and not isinstance(layer.k_norm, (nn.Identity, nn.LayerNorm)):
            raise IncompatibleRuleError(
                f"AttentionPoolRule(mode='attnlrp') handles a LayerNorm k-norm, got {layer.k_norm}")

    def prepare(self, layer: AttentionPool):
        width = layer.kv.out_features // 2
        value = _linear_rows(layer.kv, slice(width, 2 * width)) if self.mode == "cp" else layer.kv
        sub = {"value": Step(value, self.value_rule, -1, "value", "kv")}
        sub["value"].state = self.value_rule.prepare(value)
        if self.mode == "cp":
            sub["key"] = _linear_rows(layer.kv, slice(0, width))
        return sub

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer, sub = step.layer, step.state
        x = x.detach()
        tokens = layer.tokens(x)
        v_rec = self.value_rule.forward(sub["value"], tokens, tape)
        with torch.no_grad():
            q = layer.query().expand(x.shape[0], -1, -1, -1)
            if self.mode == "cp":
                k = kn = layer.k_norm(layer.split_heads(sub["key"](tokens)))
                v = layer.split_heads(v_rec.output.detach())
            else:
                k, v = (layer.split_heads(t) for t in v_rec.output.detach().chunk(2, dim=-1))
                kn = layer.k_norm(k)
            scores = (q * layer.scale) @ kn.transpose(-2, -1)
            attn = scores.softmax(-1)
            y = attn @ v
        extras = {"value": v_rec, "attn": attn, "v": v, "y": y}
        if self.mode == "attnlrp":
            extras.update(q=q, k=k, kn=kn, scores=scores)
        return Record(x, layer.merge_heads(y), extras=extras)

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        layer, sub, e = step.layer, step.state, rec.extras
        R_y = layer.split_heads(R)
        if self.mode == "cp":
            s = divide(R_y, e["y"], self.epsilon)
            R_t = layer.merge_heads(e["v"] * (e["attn"].transpose(-2, -1) @ s))
        else:
            R_t = self._attnlrp(layer, e, R_y, rec)
        R_tokens = self.value_rule.lrp(sub["value"], e["value"], R_t, tape)
        if "bias" in e["value"].absorbed:
            rec.absorbed["bias"] = e["value"].absorbed["bias"]
        if not layer.start:
            return R_tokens
        R_in = R_tokens.new_zeros(rec.input.shape)
        R_in[:, layer.start:] = R_tokens
        return R_in

    def _attnlrp(self, layer: AttentionPool, e: dict, R_y: torch.Tensor, rec: Record) -> torch.Tensor:
        # The uniform rule of both products in closed form, as SelfAttentionRule's: for O = X Y with
        # s = R_O / (2·stab(O)), R_X = X ⊙ (s Yᵀ) and R_Y = Y ⊙ (Xᵀ s)
        eps, A, S, q, kn, v = self.epsilon, e["attn"], e["scores"], e["q"], e["kn"], e["v"]
        s = divide(R_y, e["y"], eps).mul_(0.5)  # y = A v
        R_attn, R_v = A * (s @ v.transpose(-2, -1)), v * (A.transpose(-2, -1) @ s)
        # softmax Taylor rule (Achtibat et al. 2024, Prop. 3.1): R_S = S ⊙ (R_A − A ⊙ Σ_j R_A)
        R_S = S * (R_attn - A * R_attn.sum(-1, keepdim=True))
        t = divide(R_S, S, eps).mul_(0.5)  # S = (q·scale) knᵀ
        R_q = q * ((t @ kn) * layer.scale)
        R_kn = kn * ((q * layer.scale).transpose(-2, -1) @ t).transpose(-2, -1)
        rec.absorbed["latent_query"] = per_sample(R_q)  # the query is the latent's: a parameter, not the input
        R_k = _norm_lrp(layer.k_norm, e["k"], e["kn"], R_kn, eps)
        return torch.cat([layer.merge_heads(R_k), layer.merge_heads(R_v)], dim=-1)

    def traits(self, layer) -> Traits:
        # lrp reads y from the extras, not the record's output; AttnLRP's softmax rule is not conservative: what it
        # loses is reported as ``attention``
        return Traits(output=False, remainder="attention" if self.mode == "attnlrp" else "stabilizer")


class CheferAttentionPoolRule(Rule):
    """Chefer, Gur & Wolf 2021's attention rule (:class:`~lrpkit.rules.chefer.CheferAttentionRule`) on
    :class:`~lrpkit.layers.AttentionPool`, per head:

    - ``y = A v``: ``s = sdiv(R_y, y)``; ``R_A = A ⊙ (s vᵀ) / 2``, ``R_v = v ⊙ (Aᵀ s) / 2``;
    - the softmax passes: the relevance of ``dots = q kᵀ`` is ``R_A``;
    - ``dots``: ``s' = sdiv(R_A, dots)``; ``R_k = k ⊙ (s'ᵀ q) / 2``; the query's half stays with the latent (a
      parameter; reported as ``latent_query``); the k-norm passes;
    - ``[R_k, R_v]`` through the key/value projection with ``linear_rule`` (α1β0, bias ignored).

    ``R_A`` (B, heads, L, N − start) is handed out under :data:`~lrpkit.rules.chefer.ATTENTION_RELEVANCE`, the
    attention probabilities with the recording pass's graph under :data:`~lrpkit.rules.chefer.ATTENTION` (where the
    tape keeps one), as the blocks' rule does; nothing below ``R_A`` is computed where the tape stops after this
    step. The prefix tokens the pool leaves out get zero.
    """

    targets = ()
    accepted = (AttentionPool,)

    def __init__(self, linear_rule: CheferLinearRule | None = None, epsilon: float = SAFE_EPS):
        linear_rule = linear_rule if linear_rule is not None else CheferLinearRule()
        if not isinstance(linear_rule, CheferLinearRule):
            raise TypeError(f"CheferAttentionPoolRule needs a CheferLinearRule for its projection (it keeps the "
                            f"forward graph for the attention gradients), got {linear_rule!r}")
        self.linear_rule, self.epsilon = linear_rule, epsilon

    def check(self, layer):
        super().check(layer)
        if not isinstance(layer.k_norm, (nn.Identity, nn.LayerNorm)):
            raise IncompatibleRuleError(f"CheferAttentionPoolRule passes relevance through a LayerNorm k-norm; got "
                                        f"{type(layer.k_norm).__name__}")

    def prepare(self, layer: AttentionPool):
        sub = Step(layer.kv, self.linear_rule, -1, "kv", "kv")
        sub.state = self.linear_rule.prepare(layer.kv)
        return sub

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        layer = step.layer
        kv = self.linear_rule.forward(step.state, layer.tokens(x), tape)  # keeps the graph of x, if it has one
        k, v = (layer.split_heads(t) for t in kv.output.chunk(2, dim=-1))
        kn = layer.k_norm(k)
        with torch.no_grad():
            q = layer.query().expand(x.shape[0], -1, -1, -1)
        attn = ((q * layer.scale) @ kn.transpose(-2, -1)).softmax(-1)
        y = attn @ v
        if attn.requires_grad:
            tape.hand_out(step, ATTENTION, attn)
        extras = {"kv": kv, "q": q, "kn": kn.detach(), "v": v.detach(), "attn": attn.detach(), "y": y.detach()}
        return Record(to_keep(x), layer.merge_heads(y), extras=extras)

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor | None:
        layer, e = step.layer, rec.extras
        with torch.no_grad():
            s = safe_divide(layer.split_heads(R) * 0.5, e["y"], self.epsilon)  # the halves folded into s
            R_attn = (s @ e["v"].transpose(-2, -1)).mul_(e["attn"])
            tape.hand_out(step, ATTENTION_RELEVANCE, R_attn)
            if not tape.needed(step):
                return None
            R_v = (e["attn"].transpose(-2, -1) @ s).mul_(e["v"])
            q, kn = e["q"], e["kn"]
            s2 = safe_divide(R_attn, q @ kn.transpose(-2, -1), self.epsilon)
            R_k = (s2.transpose(-2, -1) @ q).mul_(kn).mul_(0.5)
            rec.absorbed["latent_query"] = per_sample((s2 @ kn).mul_(q).mul_(0.5))
            R_kv = torch.cat([layer.merge_heads(R_k), layer.merge_heads(R_v)], dim=-1)
        R_tokens = self.linear_rule.lrp(step.state, e["kv"], R_kv, tape)
        if not layer.start:
            return R_tokens
        R_in = R_tokens.new_zeros(rec.input.shape)
        R_in[:, layer.start:] = R_tokens
        return R_in

    def traits(self, layer) -> Traits:
        return Traits(output=False)


__all__ = ["AttentionPoolRule", "CheferAttentionPoolRule"]
