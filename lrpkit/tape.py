"""The tape: one analysis call. It carries out the analyzer's :class:`~lrpkit.plan.Plan` around the two loops of
:mod:`lrpkit.propagate`, holds the records between them, and tells its observers what passed.

The propagation options are explicit arguments of :class:`Tape`:

- ``graph_from=k``: the recording pass keeps the autograd graph from the layer with index ``k`` on (its input is
  the graph's root; rules that keep the graph of their input, as Chefer et al.'s, pass it on), so that a caller
  can differentiate the output with respect to what the rules hand out (attention probabilities);
- ``stop_after=k``: the reverse loop ends right after the layer with index ``k``, at any depth (the rules of the
  containers around it do not finish); that layer's rule may leave its input relevance uncomputed
  (:meth:`Tape.needed` is False), and :meth:`Tape.backward` returns the relevance at the output of the layer where
  it stopped;
- ``stop_at=k``: the reverse loop ends at the output of the layer with index ``k``, at any depth, before that
  layer's rule (or, ``stop_at=(k, site)``, inside the rule at an inner site of it: ``Rule.sites``):
  :meth:`Tape.backward` returns the relevance there and sets ``reached_stop``. Nothing at or below the layer runs
  (the rules of the containers around it are left where they hand their branch on), and the records of the layer
  and of those below it stay on the tape, so that :meth:`Tape.backward_from` can go on from there (CRP: once per
  concept); observers see no end of the loops it leaves;
- ``relevance_at``: layer indices whose input relevance is kept (``tape.relevances[k]``), at any depth;
- ``observers``: objects with ``loop_started(R)``, ``step_passed(step, plan, record, R_out, R_in)`` and
  ``loop_ended(R)`` (the accounting, :class:`lrpkit.accounting.AccountingObserver`; the layerwise relevance).

What rules hand out (:meth:`Tape.hand_out`: Chefer's attention relevances, attention probabilities with their
graph) is collected in ``tape.handed``: ``{key: [(step index, tensor), ...]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import propagate
from .plan import Plan
from .propagate import Record, Step


def owns_memory(out: torch.Tensor, inp: torch.Tensor) -> bool:
    """Whether ``out`` owns its memory: not a view, not the input itself, outside autograd (so a ReLU may run on
    it in place)."""
    return out._base is None and not out.requires_grad and \
        out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()


class _Recompute:
    """``layer(record.input)``, evaluated when the reverse loop first reads it, and left in ``record.output`` too
    (the output of the layer below, which that layer's rule, next in the loop, would otherwise recompute)."""

    __slots__ = ("layer", "record")

    def __init__(self, layer: nn.Module, record: Record):
        self.layer, self.record = layer, record

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.layer(self.record.input)
        if self.record.output is None:
            self.record.output = out
        return out


class Tape:
    """One analysis call under ``plan``; see the module docstring for the options."""

    def __init__(self, plan: Plan, *, graph_from: int | None = None, stop_after: int | None = None,
                 stop_at: int | tuple[int, str] | None = None, relevance_at=(), observers=()):
        self.plan = plan
        self.graph_from, self.stop_after, self.stop_at = graph_from, stop_after, stop_at
        self.relevance_at = frozenset(relevance_at)
        self.observers = list(observers)
        self.records: dict[int, Record] = {}
        self.handed: dict[str, list] = {}
        self.relevances: dict[int, torch.Tensor] = {}
        self.stopped = False  # stop_after
        self.reached_stop = False  # stop_at
        self._gates: dict[int, torch.Tensor] = {}
        self._below = None  # (step, its input, whether it ran in place): the last step recorded in this branch
        self._loops = 0  # reverse loops under way (a container's rule runs one per branch inside its own)

    # -- the loops, for the analyzer and for container rules ----------------------------------------------------
    def forward(self, steps: list[Step], x: torch.Tensor) -> torch.Tensor:
        """Record ``steps`` on ``x`` (:func:`lrpkit.propagate.forward`)."""
        return propagate.forward(steps, x, self)

    def backward(self, steps: list[Step], R: torch.Tensor) -> torch.Tensor:
        """The reverse loop over ``steps`` from ``R`` (:func:`lrpkit.propagate.backward`), observed; with
        ``stop_at``, the relevance at the output of that layer."""
        for observer in self.observers:
            observer.loop_started(R)
        self._loops += 1
        try:
            R = propagate.backward(steps, R, self)
        except propagate.ReachedStop as stop:
            if self._loops > 1:
                raise  # on to the outermost loop, through the rules of the containers around the layer
            self.reached_stop = not self.stopped  # stop_at (stop_after has ``stopped``)
            return stop.relevance
        finally:
            self._loops -= 1
        for observer in self.observers:
            observer.loop_ended(R)
        return R

    def backward_from(self, steps: list[Step], index: int, R: torch.Tensor, site: str | None = None) -> torch.Tensor:
        """The reverse loop from ``R`` at the output of the layer with index ``index`` (at any depth of ``steps``;
        with ``site``, at that inner site of its rule) down to their input, through that layer only
        (:func:`lrpkit.propagate.backward_from`); the records of the layer and of those below it must be on the tape
        (a forward pass, or a loop that stopped there)."""
        for observer in self.observers:
            observer.loop_started(R)
        R = propagate.backward_from(steps, index, R, self, site)
        for observer in self.observers:
            observer.loop_ended(R)
        return R

    # -- what rules may ask and give --------------------------------------------------------------------------
    def needed(self, step: Step) -> bool:
        """Whether anything reads the relevance at ``step``'s input (False where the loop stops after it)."""
        return step.index != self.stop_after

    def stops_at(self, step: Step, site: str | None = None) -> bool:
        """Whether the reverse loop ends at ``step``'s output, or at the inner site ``site`` of its rule
        (``stop_at``; once: a later loop, as :meth:`backward_from` from there, goes through)."""
        where = step.index if site is None else (step.index, site)
        return where == self.stop_at and not self.reached_stop

    def hand_out(self, step: Step, key: str, value: torch.Tensor) -> None:
        """Give the caller an intermediate result of ``step`` (collected in ``self.handed[key]``)."""
        self.handed.setdefault(key, []).append((step.index, value))

    # -- the plan, carried out ----------------------------------------------------------------------------------
    def record(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """Run ``step`` in the recording pass; return its output."""
        p = self.plan[step.index]
        below, x_in, below_in_place = self._below or (None, None, False)  # read only where the plan names a step below
        if step.index == self.graph_from and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # the root of the graph the caller differentiates
        in_place = p.relu_in_place and owns_memory(x, x_in)
        if in_place:  # the record's input is relu(z) from here on: the ReLU's PassRule reads only its shape
            with torch.no_grad():
                rec = Record(x, torch.relu_(x))
        else:
            rec = step.rule.forward(step, x, self)
        if p.lazy_input and not below_in_place:
            rec.input = _Recompute(below.layer, self.records[below.index])
        self.records[step.index] = rec
        self._below = (step, x, in_place)
        out = rec.output
        if not p.keep_output:
            rec.output = None
        return out

    def output_to_keep(self, branch: list[Step], out: torch.Tensor):
        """What a container's record keeps of ``out``, the output of ``branch``: ``out`` itself, or, where the plan
        drops the output of the branch's last layer and that output is cheap to recompute (a layer scale, an
        activation), a recipe that recomputes it from that layer's record and leaves it there as its output (as a
        lazy input does), so that the container's rule, which reads it before the reverse loop enters the branch,
        and the layer's own rule compute it once between them."""
        last = branch[-1] if branch else None
        if last is None or last.children:
            return out
        p = self.plan[last.index]
        if p.keep_output or not p.traits.output_recomputable:
            return out
        return _Recompute(last.layer, self.records[last.index])

    def recall(self, step: Step) -> Record:
        """The record of ``step`` for the reverse loop, with its gate where the plan hands one over."""
        rec = self.records.pop(step.index)
        rec.gate = self._gates.pop(step.index, None)
        return rec

    def put_back(self, step: Step, rec: Record) -> None:
        """Return the record of a container whose rule the stop (``stop_at``) left, gate and all."""
        self.records[step.index] = rec
        if rec.gate is not None:
            self._gates[step.index] = rec.gate

    def skip(self, step: Step) -> None:
        """A step that :meth:`backward_from` does not run (above the layer it starts at, or a container around it):
        hand its gate over as :meth:`passed` would and let its records go; nothing for a step already passed."""
        rec = self.records.pop(step.index, None)
        self._gates.pop(step.index, None)
        for branch in step.children:
            for inner in branch:
                self.skip(inner)
        p = self.plan[step.index]
        if rec is not None and p.gate_to is not None:
            self._gates[p.gate_to] = rec.input

    def passed(self, step: Step, rec: Record, R_out: torch.Tensor, R_in: torch.Tensor | None) -> None:
        """After ``step``'s rule: observers, kept relevances, the gate hand-over, freeing, the stop."""
        p = self.plan[step.index]
        if step.index == self.stop_after:
            self.stopped = True
            return
        for observer in self.observers:
            observer.step_passed(step, p, rec, R_out, R_in)
        if step.index in self.relevance_at:  # a copy: the rule above may add to R_in in place (a residual split)
            self.relevances[step.index] = R_in.clone()
        if p.gate_to is not None:
            self._gates[p.gate_to] = rec.input  # relu(z) below, dead from here on: that step may overwrite it
        rec.input = rec.output = rec.gate = None  # free the activations as the loop goes down, as autograd does
        rec.extras = {}
