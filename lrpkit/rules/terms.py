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

from ..propagate import Propagation, Record, Step
from .base import LINEAR_TYPES, Rule, layer_with_params, stabilize


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

    def forward(self, step: Step, x: torch.Tensor, prop: Propagation) -> Record:
        with torch.no_grad():
            return Record(x.detach(), step.layer(x.detach()))

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, prop: Propagation) -> torch.Tensor:
        R_in = torch.zeros_like(rec.input)
        for group in self._groups():
            inputs, outputs, signs, const = [], [], [], 0.0
            with torch.enable_grad():
                for term in group.terms:
                    layer = step.state[term.param]
                    a = term.input(rec.input)
                    if not bool(a.any()):
                        # no relevance reaches a zero input, but the term's (modified) bias still enters z_g
                        bias = getattr(layer, "bias", None)
                        if isinstance(bias, torch.Tensor) and bool(bias.any()):
                            with torch.no_grad():
                                const = const + term.sign * layer(a)
                        continue
                    a = a.detach().requires_grad_(True)
                    inputs.append(a)
                    outputs.append(layer(a))
                    signs.append(term.sign)
            if not inputs:
                continue
            z = sum(sign * out.detach() for sign, out in zip(signs, outputs)) + const
            s = group.weight * R / stabilize(z, self.stabilizer)
            if group.mask is not None:
                s = s * group.mask(rec.output)
            grads = torch.autograd.grad(outputs, inputs, [sign * s for sign in signs])
            for a, c in zip(inputs, grads):
                R_in = R_in + a.detach() * c
        return R_in

    def remainder_category(self, layer) -> str:
        return "bias" if getattr(layer, "bias", None) is not None else "stabilizer"
