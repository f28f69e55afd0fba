"""Rules that split a layer into several modified copies ("terms"), as zennit's ``BasicHook`` does.

A term ``t = (input_fn, param_fn, sign)`` is the layer with parameters ``param_fn(p, name)`` applied to
``input_fn(a)``. Terms form groups ``g`` with a weight ``w_g`` and an optional mask on the original output ``z``:

    z_g   = Σ_{t∈g} sign_t · layer_t(ã_t)
    s_g   = w_g · mask_g(z) · R / stab(z_g)
    R_in  = Σ_g Σ_{t∈g} sign_t · ã_t ⊙ (∂layer_t/∂ã_t)ᵀ s_g

A term whose input is identically zero (e.g. the negative part of a post-ReLU input) passes no relevance to the
input and is skipped, which saves a forward and a backward pass of the layer; only its (modified) bias, if non-zero,
is still added to ``z_g`` (e.g. ``b⁺`` in z^B with ``low = 0``), so that skipping never changes the result.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..propagate import Record, Step
from ..traits import Traits
from .base import LINEAR_TYPES, Rule, divide, layer_with_params, times_input
from .vjp import vjp


def pos(t: torch.Tensor, name: str = "") -> torch.Tensor:
    """``t⁺ = max(t, 0)``."""
    return t.clamp(min=0)


def neg(t: torch.Tensor, name: str = "") -> torch.Tensor:
    """``t⁻ = min(t, 0)``."""
    return t.clamp(max=0)


def same(t: torch.Tensor, name: str = "") -> torch.Tensor:
    return t


def no_bias(fn: Callable) -> Callable:
    """``fn`` on the weight, zero bias."""
    return lambda p, name: torch.zeros_like(p) if name == "bias" else fn(p, name)


class Term(NamedTuple):
    input: Callable[[torch.Tensor], torch.Tensor]
    param: Callable[[torch.Tensor, str], torch.Tensor]
    sign: float = 1.0


class Group(NamedTuple):
    terms: tuple[Term, ...]
    weight: float = 1.0
    mask: Callable[[torch.Tensor], torch.Tensor] | None = None  # on the unmodified output z


def _bias_output(layer):
    """The layer's output for a zero input (its bias, broadcastable to the output), or None if zero."""
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or not bool(bias.any()):
        return None
    return bias if isinstance(layer, torch.nn.Linear) else bias.view(-1, *([1] * (layer.weight.ndim - 2)))


class TermRule(Rule):
    """Base class of the rules defined by groups of terms (see the module docstring)."""

    stabilizer: float = 1e-6
    targets = LINEAR_TYPES
    accepted = LINEAR_TYPES

    def groups(self) -> tuple[Group, ...]:
        raise NotImplementedError

    def _groups(self) -> tuple[Group, ...]:
        # built once per rule, so that the term functions are the same objects in prepare and lrp
        if "_cached_groups" not in vars(self):
            self._cached_groups = self.groups()
        return self._cached_groups

    def prepare(self, layer):
        # one modified copy per distinct parameter function, built once per analyzer
        cache = {}
        for group in self._groups():
            for term in group.terms:
                if term.param not in cache:
                    cache[term.param] = layer_with_params(layer, term.param)
        return cache

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        with torch.no_grad():
            return Record(x.detach(), step.layer(x.detach()))

    def traits(self, layer) -> Traits:
        # the output is read only by group masks; every term multiplies its input by a function of a that is zero
        # where a is (a, a⁺, a⁻), so R_in vanishes with the input
        own_lrp, own_forward = self._inherits("lrp", TermRule), self._inherits("forward", TermRule)
        return Traits(output=any(group.mask is not None for group in self._groups()),
                      lazy_input=own_lrp and own_forward, output_in_record_only=own_forward,
                      vanishes_with_input=own_lrp and all(term.input in (pos, neg, same) for group in self._groups()
                                                          for term in group.terms),
                      remainder="bias" if getattr(layer, "bias", None) is not None else "stabilizer")

    @staticmethod
    def _term_input(fn, x: torch.Tensor, nonneg: bool) -> torch.Tensor | None:
        """``fn(x)``, or None where it is identically zero; with a non-negative ``x`` (after a ReLU) ``pos`` and
        ``neg`` need no pass over the data."""
        if nonneg and fn is pos:
            return x
        if nonneg and fn is neg:
            return None
        a = fn(x)
        return a if bool(a.any()) else None

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        # every tensor built here is fresh, so the sums and products are accumulated in place
        x, R_in = rec.input, None
        nonneg = bool(x.min() >= 0)
        for group in self._groups():
            z, used = None, []
            for term in group.terms:
                layer = step.state[term.param]
                a = self._term_input(term.input, x, nonneg)
                if a is not None:
                    with torch.no_grad():
                        out = layer(a)
                    used.append((term.sign, layer, a))
                else:  # no relevance reaches a zero input, but the term's (modified) bias still enters z_g
                    out = _bias_output(layer)
                    if out is None:
                        continue
                if z is None:
                    z = out if term.sign == 1 and a is not None else term.sign * out
                elif z.shape == torch.broadcast_shapes(z.shape, out.shape):
                    z.add_(out, alpha=term.sign)
                else:
                    z = z + term.sign * out
            if not used:
                continue
            s = divide(R, z, self.stabilizer)  # z has R's shape: some term had a non-zero input
            if group.weight != 1:
                s.mul_(group.weight)
            if group.mask is not None:
                s.mul_(group.mask(rec.output))
            for sign, layer, a in used:
                c = times_input(vjp(layer, a, s), a)
                if R_in is None:
                    R_in = c if sign == 1 else c.mul_(sign)
                else:
                    R_in.add_(c, alpha=sign)
        return R_in if R_in is not None else torch.zeros_like(x)
