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
    gated: bool = False  # the relevance reaching this step vanishes where its output is ≤ 0 (see mark_relus)
    relu_in_place: bool = False  # a ReLU over an output that nothing else reads (see mark_relus)


def mark_relus(steps: list[Step]) -> None:
    """Plan the ReLUs of one list of steps: ``low → ReLU → high``, the ReLU's rule passing relevance on unchanged
    (``moves_only``, e.g. PassRule).

    - ``low.gated`` if ``high``'s rule returns zero wherever its input ``relu(z)`` is zero
      (``rule.vanishes_with_input``): the relevance reaching ``low`` then vanishes wherever ``z ≤ 0``, and the
      backward loop hands ``low`` the tensor ``relu(z)`` (``high``'s recorded input, dead by then) as
      ``Record.extras["gate"]``, a buffer it may overwrite for a cheaper stabiliser
      (:func:`lrpkit.rules.base.divide`). A rule that takes its denominator from it (``rule.uses_gate``) keeps no
      output.
    - ``relu.relu_in_place`` if ``low`` keeps no output (above, or ``not rule.needs_output``) and its record holds
      the output nowhere else (``rule.output_in_record_only``): the recording pass then applies the ReLU in place
      on an output it owns, as torchvision's ResNets do, and ``high`` records ``relu(z)`` itself instead of
      recomputing it in the backward loop.
    """
    for low, relu, high in zip(steps, steps[1:], steps[2:] + [None]):
        if type(relu.layer) is not nn.ReLU or not getattr(relu.rule, "moves_only", False):
            continue
        low.gated = high is not None and high.rule.vanishes_with_input(high)
        relu.relu_in_place = not keeps_output(low) and low.rule.output_in_record_only(low.layer)


def keeps_output(step: Step) -> bool:
    """Whether the recording pass keeps the step's output for the backward loop."""
    return step.rule.needs_output(step.layer) and not (step.gated and step.rule.uses_gate(step.layer))


def _fresh(out: torch.Tensor, inp: torch.Tensor) -> bool:
    """Whether ``out`` owns its memory: not a view, not the input itself, outside autograd."""
    return out._base is None and not out.requires_grad and \
        out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()


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
        records, prev, x_in, in_place = [], None, x, False
        for step in steps:
            lazy = prev is not None and prev.rule.output_recomputable(prev.layer) and not in_place and \
                step.rule.allows_lazy_input(step.layer)
            in_place = step.relu_in_place and _fresh(x, x_in)  # see mark_relus
            if in_place:  # the record's input is relu(z) from here on: the ReLU's PassRule reads only its shape
                with torch.no_grad():
                    rec = Record(x, torch.relu_(x))
            else:
                rec = step.rule.forward(step, x, self)
            if lazy:
                rec.input = _Recompute(prev.layer, records[-1])
            records.append(rec)
            x_in, x = x, rec.output
            if not keeps_output(step):
                rec.output = None
            prev = step
        return x, records

    def backward(self, steps: list[Step], records: list[Record], R: torch.Tensor,
                 layerwise: list | None = None, total: torch.Tensor | None = None) -> torch.Tensor:
        """``R[k] = rule_k.lrp(layer_k, a[k], R[k+1])`` for k = L..1. ``total``: ``Σ R`` per sample if the caller
        knows it (the accounting carries it from one layer to the next instead of summing ``R`` twice)."""
        gates = {}  # position of a gated step -> relu(its output), the input of the step two above
        for k in reversed(range(len(steps))):
            step, rec = steps[k], records[k]
            if k in gates:
                rec.extras["gate"] = gates.pop(k)
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
            low = steps[k - 2] if k >= 2 else None
            if low is not None and low.gated and low.rule.uses_gate(low.layer):
                gates[k - 2] = rec.input  # relu(z[k - 2]), dead from here on: step k - 2 may overwrite it
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
