"""The execution plan: what the recording pass keeps, recomputes and overwrites, decided once per analyzer from the
rules' :class:`~lrpkit.traits.Traits`, and inspectable as data (``LRP(model).plan``).

Per step (:class:`StepPlan`):

- ``keep_output``: the recording pass keeps the layer's output for the reverse loop (the rule reads it and takes
  no gate instead).
- ``lazy_input``: the layer's input is not kept but recomputed from the layer below when the reverse loop reaches
  it (below it an element-wise layer whose output is cheap to recompute and is not kept), so that a
  Conv→ReLU→Conv chain keeps one tensor per layer, as autograd does. Where the layer below keeps its output, the
  layer's input is that same tensor, kept once.
- The ReLU plan, on each ``low → ReLU → high`` whose ReLU passes relevance unchanged (``moves_only``):

  - ``gated`` (on ``low``): ``high``'s rule returns zero wherever its input ``relu(z)`` is zero, so the relevance
    reaching ``low`` vanishes wherever ``z ≤ 0``, and wherever it does not, ``stab(z) = z + ε = relu(z) + ε``;
  - ``takes_gate`` (on ``low``): gated and its rule ``uses_gate``: the reverse loop hands it ``relu(z)`` (``high``'s
    recorded input, dead by then; ``gate_to`` on ``high`` names the receiver) as ``record.gate``, and it keeps no
    output;
  - ``relu_in_place`` (on the ReLU): ``low`` keeps no output and its rule leaves the output nowhere else, so the
    recording pass applies the ReLU in place on it (when it owns that memory: see
    :func:`lrpkit.tape.owns_memory`) and ``high`` records ``relu(z)`` instead of recomputing it.

None of these changes a result (tests/test_plan.py compares with the plan switched off, bitwise where the
arithmetic is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .propagate import Step
from .traits import Traits


@dataclass(frozen=True)
class StepPlan:
    """How the tape runs one step; see the module docstring."""

    index: int
    path: str
    traits: Traits
    keep_output: bool = True
    lazy_input: bool = False
    gated: bool = False
    takes_gate: bool = False
    gate_to: int | None = None
    relu_in_place: bool = False


class Plan:
    """The :class:`StepPlan` of every step of a chain (containers' branches included), by step index.

    ``Plan(steps)`` plans everything; ``Plan(steps, relus=False)`` leaves out the ReLU plan (every layer keeps what
    its rule reads and uses ``stab(z)``): the reference that the tests compare with.
    """

    def __init__(self, steps: list[Step], relus: bool = True):
        self.steps: dict[int, StepPlan] = {}
        self._plan(steps, relus)

    def __getitem__(self, index: int) -> StepPlan:
        return self.steps[index]

    def __iter__(self):
        return iter(self.steps.values())

    def _plan(self, steps: list[Step], relus: bool) -> None:
        traits = [step.rule.traits(step.layer) for step in steps]
        gated, in_place, gate_to = set(), set(), {}
        for branch in (b for step in steps for b in step.children):
            self._plan(branch, relus)
        for k in range(len(steps) - 1) if relus else ():
            if type(steps[k + 1].layer) is not nn.ReLU or not traits[k + 1].moves_only:
                continue
            if k + 2 < len(steps) and self._vanishes(steps[k + 2], traits[k + 2]):
                gated.add(k)
                if traits[k].uses_gate:
                    gate_to[k + 2] = steps[k].index
            keeps = traits[k].output and not (k in gated and traits[k].uses_gate)
            if not keeps and traits[k].output_in_record_only:
                in_place.add(k + 1)
        kept = [t.output and not (k in gated and t.uses_gate) for k, t in enumerate(traits)]
        for k, (step, t) in enumerate(zip(steps, traits)):
            self.steps[step.index] = StepPlan(
                step.index, step.path, t, keep_output=kept[k],
                lazy_input=k > 0 and traits[k - 1].output_recomputable and not kept[k - 1] and t.lazy_input,
                gated=k in gated, takes_gate=k in gated and t.uses_gate, gate_to=gate_to.get(k),
                relu_in_place=k in in_place)

    def _vanishes(self, step: Step, traits: Traits) -> bool:
        """Whether the step's relevance vanishes wherever its input is zero (a container: if its branches' first
        layers do; an empty branch passes ``a ⊙ s``, which does)."""
        return traits.vanishes_with_input and all(
            not branch or self._vanishes(branch[0], branch[0].rule.traits(branch[0].layer))
            for branch in step.children)

    def table(self) -> str:
        """One line per step: index, path and the decisions that differ from the defaults."""
        lines = []
        for p in self:
            flags = [name for name in ("lazy_input", "gated", "takes_gate", "relu_in_place") if getattr(p, name)]
            if not p.keep_output:
                flags.append("drops_output")
            if p.gate_to is not None:
                flags.append(f"gate_to={p.gate_to}")
            if p.traits.graph:
                flags.append("graph")
            lines.append(f"{p.index:>4}  {p.path:<24} {' '.join(flags)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({len(self.steps)} steps)\n{self.table()}"
