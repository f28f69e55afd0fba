"""The two loops of LRP, as in RelevancePropagation.jl: a forward pass that records each layer, and a reverse loop
over the chain (from the output, or, :func:`backward_from`, from a layer: CRP).

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


class ReachedStop(Exception):
    """Raised by :func:`backward` where it reaches the tape's ``stop_at`` layer, with the relevance at that layer's
    output: it leaves the rules of the containers around the layer where they hand their branch on (nothing of
    theirs below it runs), and :meth:`lrpkit.tape.Tape.backward` returns ``relevance``."""

    def __init__(self, relevance: torch.Tensor):
        super().__init__("the reverse loop reached the tape's stop_at layer")
        self.relevance = relevance


def backward(steps: list[Step], R: torch.Tensor, tape) -> torch.Tensor:
    """``R[k] = rule_k.lrp(layer_k, a[k], R[k+1])`` for k = L..1."""
    for step in reversed(steps):
        if tape.stops_at(step):
            raise ReachedStop(R)
        record = tape.recall(step)
        try:
            R_in = step.rule.lrp(step, record, R, tape)
        except ReachedStop:  # the stop is inside this container: its record stays for backward_from to leave
            tape.put_back(step, record)
            raise
        tape.passed(step, record, R, R_in)
        if tape.stopped:  # stop_after: out of every loop, with the relevance at this layer's output
            raise ReachedStop(R)
        R = R_in
    return R


def backward_from(steps: list[Step], index: int, R: torch.Tensor, tape, site: str | None = None) -> torch.Tensor:
    """The reverse loop from ``R`` at the output of the layer with index ``index``, at any depth of ``steps``, down
    to the input of ``steps``: that layer and the layers below it in its chain, then, for each container around
    it (innermost first), the layers below the container in the container's chain. With ``site``, ``R`` is the
    relevance at that inner site of the layer's rule (``Rule.sites``), and the rule goes on from there
    (``Rule.lrp_from``).

    Every branch of a container reads the container's input, so the relevance at the input of the branch that
    holds the layer is the relevance at the container's input; the container's other branches and its identity
    path get none. The result is the relevance that flows through the layer, and only that: what CRP calls the
    conditional relevance with parallel paths excluded (Achtibat et al. 2023; zennit-crp's
    ``exclude_parallel=True``). With the layer at the top level, it is the plain reverse loop below it. The layers
    that do not run (above the layer, the containers around it) still hand down what the plan says they hand down
    (:meth:`lrpkit.tape.Tape.skip`), whether or not a reverse loop from the output passed them before.
    """
    *around, (chain, k) = enclosing(steps, index)
    for step in reversed(chain[k + 1:]):
        tape.skip(step)  # what the plan hands down from the layers that do not run
    if site is not None:
        R = resume(chain[k], site, R, tape)
    R = backward(chain[:k] if site is not None else chain[: k + 1], R, tape)
    for chain, k in reversed(around):  # each container around the layer, innermost first: it does not run
        for step in reversed(chain[k:]):
            tape.skip(step)
        R = backward(chain[:k], R, tape)
    return R


def resume(step: Step, site: str, R: torch.Tensor, tape) -> torch.Tensor:
    """``step``'s rule from its inner site ``site`` (with ``R`` there) down to its input."""
    record = tape.recall(step)
    R_in = step.rule.lrp_from(site, step, record, R, tape)
    tape.passed(step, record, R, R_in)
    return R_in


def enclosing(steps: list[Step], index: int) -> list[tuple[list[Step], int]]:
    """Where the layer with index ``index`` sits: ``[(chain, position), ...]`` from ``steps`` down to the layer's own
    chain; each position but the last is that of a container holding the next chain. ValueError if absent."""
    def find(chain: list[Step]) -> list | None:
        for k, step in enumerate(chain):
            if step.index == index:
                return [(chain, k)]
            for branch in step.children:
                below = find(branch)
                if below is not None:
                    return [(chain, k)] + below
        return None

    levels = find(steps)
    if levels is None:
        raise ValueError(f"no layer with index {index} in these steps")
    return levels


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """``Σ t`` per sample, (B,). A channels-last feature map (a timm ConvNeXt's) is summed where it lies; other
    tensors are summed in their logical order (a strided one after a copy), as they always were."""
    t = t.detach()
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.sum((1, 2, 3))
    return t.flatten(1).sum(1)
