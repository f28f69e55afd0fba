"""What the execution plan may assume about a rule on one layer: :class:`Traits`.

A rule declares its traits in one place, :meth:`lrpkit.rules.Rule.traits`, and only the plan
(:mod:`lrpkit.plan`) and the accounting read them. Every default is the safe choice: a rule that declares nothing
is run with everything kept, nothing recomputed and nothing overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traits:
    """The facts about ``rule`` on ``layer`` that let the plan save memory and time without changing a result.

    - ``graph``: the rule's ``forward`` keeps an autograd graph that ``lrp`` differentiates (e.g. the generic rule
      on a pooling layer).
    - ``output``: ``lrp`` reads ``record.output``; False lets the recording pass drop it. (A rule with a
      recomputable output may still find it there in the reverse loop: the tape leaves the input it recomputed for
      the layer above in the record below as its output.)
    - ``lazy_input``: ``lrp`` may find ``record.input`` recomputed from the layer below (its output recomputed
      from its own recorded input) instead of kept.
    - ``output_recomputable``: the layer's output is cheap to recompute from its input (element-wise layers).
    - ``vanishes_with_input``: ``lrp`` returns zero relevance wherever the layer's input is zero
      (``R_in = a ⊙ c``). For a container: given that its branches' first layers do.
    - ``output_in_record_only``: ``forward`` leaves the output nowhere but in ``record.output``, so that a ReLU
      above may run in place on it once it is dropped.
    - ``uses_gate``: handed ``record.gate = relu(z)`` (a buffer it may overwrite), ``lrp`` takes its denominator
      from it and reads nothing of ``record.output``.
    - ``moves_only``: ``R_in`` is ``R`` rearranged; the layer absorbs nothing (the accounting skips a sum).
    - ``remainder``: the accounting's name for what the layer loses beyond the sinks it reports itself.
    - ``split``: a container rule whose loss is the proportional split's stabiliser, which the accounting derives
      from its branches' totals (:class:`lrpkit.rules.SkipConnectionRule`, :class:`lrpkit.rules.SumRule`).
    """

    graph: bool = False
    output: bool = True
    lazy_input: bool = False
    output_recomputable: bool = False
    vanishes_with_input: bool = False
    output_in_record_only: bool = False
    uses_gate: bool = False
    moves_only: bool = False
    remainder: str = "stabilizer"
    split: bool = False
