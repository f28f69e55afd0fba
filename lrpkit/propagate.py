"""The two loops of LRP: a forward pass that records every layer's input, and a reverse loop over the chain.

A :class:`Step` is one layer with its rule and the rule's prepared state (modified layers), built once per
analyzer. A :class:`Record` is what one forward pass through a step leaves for the backward loop. Container
layers (:class:`~lrpkit.layers.SkipConnection`, :class:`~lrpkit.layers.Sum`) have ``children``: one list of
steps per branch, propagated by the same two loops. Nothing here keeps state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Step:
    """One layer of the canonized chain with its rule (built once per analyzer)."""

    layer: nn.Module
    rule: Any
    index: int  # position in the depth-first list of layers (containers included)
    path: str  # position in the chain, e.g. "5.inner.2"
    name: str  # path of the module in the original model
    state: Any = None  # what ``rule.prepare(layer)`` built
    children: list[list["Step"]] = field(default_factory=list)


class Record:
    """What the forward pass through one step leaves for the backward loop.

    ``input`` may be stored lazily: after an element-wise activation whose rule can recompute its output from
    its input (:meth:`Rule.output_recomputable`), the next layer's input is recomputed when the backward loop
    reaches it instead of being kept, so that a Conv→ReLU→Conv chain keeps one tensor per layer, as autograd does.
    """

    __slots__ = ("_input", "output", "extras", "absorbed")

    def __init__(self, input, output, extras: dict | None = None, absorbed: dict | None = None):
        self._input = input
        self.output = output
        self.extras = extras if extras is not None else {}
        self.absorbed = absorbed if absorbed is not None else {}  # explicit relevance sinks, per sample (B,)

    @property
    def input(self) -> torch.Tensor:
        if isinstance(self._input, _Recompute):
            self._input = self._input()
        return self._input

    @input.setter
    def input(self, value) -> None:
        self._input = value


class _Recompute:
    """``layer(record.input)``, evaluated when needed."""

    __slots__ = ("layer", "record")

    def __init__(self, layer: nn.Module, record: Record):
        self.layer, self.record = layer, record

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(self.record.input)


class Propagation:
    """One analysis call: runs the recording forward pass and the reverse relevance loop.

    ``accounting[k]`` collects, per step, the relevance each layer absorbed (output relevance minus input
    relevance, per sample), split into the parts a rule reports explicitly (``Record.absorbed``) and a remainder.
    """

    def __init__(self):
        self.absorbed: list[tuple[Step, dict[str, torch.Tensor]]] = []
        self.store: dict = {}  # what rules want to hand out (e.g. attention relevances), in Explanation.extras
        self.in_total: torch.Tensor | None = None  # Σ R per sample at the input of the last backward call, if known

    def forward(self, steps: list[Step], x: torch.Tensor) -> tuple[torch.Tensor, list[Record]]:
        """``a[k+1] = layer_k(a[k])``, recording each layer's input."""
        records, prev = [], None
        for step in steps:
            rec = step.rule.forward(step, x, self)
            if prev is not None and prev.rule.output_recomputable(prev.layer) and \
                    step.rule.allows_lazy_input(step.layer):
                rec.input = _Recompute(prev.layer, records[-1])
            records.append(rec)
            x = rec.output
            if not step.rule.needs_output(step.layer):
                rec.output = None
            prev = step
        return x, records

    def backward(self, steps: list[Step], records: list[Record], R: torch.Tensor,
                 layerwise: list | None = None, total: torch.Tensor | None = None) -> torch.Tensor:
        """``R[k] = rule_k.lrp(layer_k, a[k], R[k+1])`` for k = L..1. ``total``: ``Σ R`` per sample if the caller
        knows it (the accounting carries it from one layer to the next instead of summing ``R`` twice)."""
        for step, rec in zip(reversed(steps), reversed(records)):
            R_out = R
            if step.children:  # a container splits R and hands each branch its share with the share's total
                rec.extras["total"] = per_sample(R_out) if total is None else total
            R = step.rule.lrp(step, rec, R_out, self)
            if layerwise is not None:
                layerwise.append(R)
            if not step.children:  # containers report their own sinks; their children report theirs
                total = self.account(step, rec, per_sample(R_out) if total is None else total, R)
            else:
                self.absorbed.append((step, dict(rec.absorbed)))
                total = rec.extras.get("in_total")  # a container that knows Σ R_in per sample hands it on
            rec.input = rec.output = None  # free the activations as the loop goes down, as autograd does
            rec.extras = {}
        self.in_total = total
        return R

    def account(self, step: Step, rec: Record, out_total: torch.Tensor, R_in: torch.Tensor) -> torch.Tensor:
        """Record what the layer absorbed (per sample); return Σ R_in per sample for the next layer. A rule that
        only moves relevance (``rule.moves_only``, e.g. PassRule) absorbs nothing: no pass over ``R_in``."""
        if getattr(step.rule, "moves_only", False):
            self.absorbed.append((step, {}))
            return out_total
        in_total = per_sample(R_in)
        parts = {k: v.detach() for k, v in rec.absorbed.items()}
        rest = out_total - in_total
        for value in parts.values():
            rest = rest - value
        key = step.rule.remainder_category(step.layer) if hasattr(step.rule, "remainder_category") else "other"
        parts[key] = parts[key] + rest if key in parts else rest
        self.absorbed.append((step, parts))
        return in_total


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """``Σ t`` per sample, (B,): the relevance totals of the accounting."""
    return t.detach().flatten(1).sum(1)
