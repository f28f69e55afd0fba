"""Rules for the container layers: residual connections and parallel branches.

Both split the relevance of a sum in proportion to its summands (Montavon et al. 2019, §10.2; zennit's ``Norm``
rule on its ``Sum`` layer), then propagate each share through its branch with the branch's own rules.
"""

from __future__ import annotations

import torch

from ..layers import SkipConnection, Sum
from ..propagate import Propagation, Record, Step, per_sample
from .base import Rule, divide, writable


class _SplitRule(Rule):
    targets = ()

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def forward(self, step: Step, x: torch.Tensor, prop: Propagation) -> Record:
        x = x.detach()
        outs, records = [], []
        for branch in step.children:
            out, recs = prop.forward(branch, x)
            outs.append(out.detach())
            records.append(recs)
        if isinstance(step.layer, SkipConnection):
            outs.insert(0, x)
        y = outs[0] + outs[1] if len(outs) > 1 else outs[0].clone()
        for out in outs[2:]:
            y.add_(out)
        return Record(x, y, extras={"summands": outs, "records": records})

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, prop: Propagation) -> torch.Tensor:
        s = divide(R, rec.output, self.epsilon, rec.extras.get("gate"))
        summands, records = rec.extras["summands"], rec.extras["records"]
        if isinstance(step.layer, SkipConnection):  # y = a + f(a): R_in = R_f propagated through f, + a ⊙ s
            a, f = summands
            share = f * s
            t_f = per_sample(share)
            R_in = prop.backward(step.children[0], records[0], share, total=t_f)
            t_branch = _in_total(prop, R_in)
            R_in = R_in.addcmul_(a, s) if writable(R_in, a) else torch.addcmul(R_in, a, s)
            in_total = per_sample(R_in)
            shared = t_f + in_total - t_branch  # Σ R_f + Σ a ⊙ s
        else:  # y = Σ f_i(a): R_in = Σ_i (f_i ⊙ s) propagated through f_i; the last share is written into s
            shares = [summand * s for summand in summands[:-1]] + [s.mul_(summands[-1])]
            R_in, in_total, shared = None, 0, 0
            for branch, recs, share in zip(step.children, records, shares):
                t = per_sample(share)
                R_branch = prop.backward(branch, recs, share, total=t)
                R_in = R_branch if R_in is None else R_in.add_(R_branch) if writable(R_in, R_branch) else \
                    R_in + R_branch
                in_total, shared = in_total + _in_total(prop, R_branch), shared + t
        rec.absorbed["stabilizer"] = rec.extras["total"] - shared  # Σ R, handed over by Propagation.backward
        rec.extras["in_total"] = in_total
        return R_in

    def output_in_record_only(self, layer) -> bool:
        return type(self).forward is _SplitRule.forward  # the record keeps the summands, not their sum

    def uses_gate(self, layer) -> bool:
        return type(self).lrp is _SplitRule.lrp  # the sum y enters only the denominator

    def vanishes_with_input(self, step: Step) -> bool:
        # R_in = Σ of the branches' input relevances (+ a ⊙ s for the identity): zero where a is if every
        # branch's first rule vanishes with its input (an empty branch passes f ⊙ s = a ⊙ s)
        return type(self).lrp is _SplitRule.lrp and all(
            not branch or branch[0].rule.vanishes_with_input(branch[0]) for branch in step.children)


def _in_total(prop: Propagation, R: torch.Tensor) -> torch.Tensor:
    """Σ R per sample at a branch's input: from the branch's accounting where it knows it, else summed."""
    return prop.in_total if prop.in_total is not None else per_sample(R)


class SkipConnectionRule(_SplitRule):
    """Residual split for ``y = a + f(a)``: ``R_a = a / stab(y) ⊙ R``, ``R_f = f(a) / stab(y) ⊙ R``;
    ``R_f`` is propagated through ``f`` and the result added to ``R_a``. Conserves up to the stabiliser."""

    accepted = (SkipConnection,)


class SumRule(_SplitRule):
    """Parallel split for ``y = Σ_i f_i(a)``: ``R_i = f_i(a) / stab(y) ⊙ R``, each propagated through its
    branch, the inputs' relevances added. Conserves up to the stabiliser."""

    accepted = (Sum,)
