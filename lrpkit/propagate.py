"""The two loops of LRP, as in RelevancePropagation.jl: a forward pass that records each layer, and a reverse loop
over the chain.

A :class:`Step` is one layer with its rule and the rule's prepared state (modified layers), built once per
analyzer. A :class:`Record` is what one forward pass through a step leaves for the reverse loop. Container layers
(:class:`~lrpkit.layers.SkipConnection`, :class:`~lrpkit.layers.Sum`) have ``children``, one list of steps per
branch; their rules run the same two loops on them through the tape.

Everything about memory and reuse (what to keep, what to recompute, what may be overwritten) and everything that
watches the loop (accounting, layerwise relevance, hand-outs, where to stop) lives in the tape,
:class:`lrpkit.tape.Tape`, which carries out the analyzer's :class:`~lrpkit.plan.Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(eq=False)
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
    """What the forward pass through one step leaves for the reverse loop: the layer's ``input`` and ``output``,
    what the rule wants besides (``extras``), the relevance it removes on purpose, per sample (``absorbed``, by
    sink, reported in the accounting), and ``gate``: ``relu(output)`` where the plan hands it over (see
    :class:`lrpkit.traits.Traits`).

    ``input`` may be given as a callable that recomputes it when first read (the plan's lazy inputs).
    """

    __slots__ = ("_input", "output", "extras", "absorbed", "gate")

    def __init__(self, input, output, extras: dict | None = None, absorbed: dict | None = None):
        self._input = input
        self.output = output
        self.extras = extras if extras is not None else {}
        self.absorbed = absorbed if absorbed is not None else {}
        self.gate = None

    @property
    def input(self) -> torch.Tensor:
        if callable(self._input):
            self._input = self._input()
        return self._input

    @input.setter
    def input(self, value) -> None:
        self._input = value


def forward(steps: list[Step], x: torch.Tensor, tape) -> torch.Tensor:
    """``a[k+1] = layer_k(a[k])``, each step recorded on the tape."""
    for step in steps:
        x = tape.record(step, x)
    return x


def backward(steps: list[Step], R: torch.Tensor, tape) -> torch.Tensor:
    """``R[k] = rule_k.lrp(layer_k, a[k], R[k+1])`` for k = L..1."""
    for step in reversed(steps):
        record = tape.recall(step)
        R_in = step.rule.lrp(step, record, R, tape)
        tape.passed(step, record, R, R_in)
        if tape.stopped:
            return R
        R = R_in
    return R


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """``Σ t`` per sample, (B,). A channels-last feature map (a timm ConvNeXt's) is summed where it lies; other
    tensors are summed in their logical order (a strided one after a copy), as they always were."""
    t = t.detach()
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.sum((1, 2, 3))
    return t.flatten(1).sum(1)
