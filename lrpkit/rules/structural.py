"""Rules for the container layers: residual connections and parallel branches.

Both split the relevance of a sum in proportion to its summands (Montavon et al. 2019, §10.2; zennit's ``Norm``
rule on its ``Sum`` layer), then propagate each share through its branch with the branch's own rules.
"""

from __future__ import annotations

import torch

from ..layers import SkipConnection, Sum
from ..propagate import Propagation, Record, Step, per_sample
from .base import Rule, divide


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
        s = divide(R, rec.output, self.epsilon)
        summands = rec.extras["summands"]
        # the last share is written into s's own (fresh) buffer: one activation-sized allocation fewer per block
        shares = [summand * s for summand in summands[:-1]] + [s.mul_(summands[-1])]
        totals = [per_sample(share) for share in shares]
        rec.absorbed["stabilizer"] = rec.extras["total"] - sum(totals)  # Σ R, handed over by Propagation.backward
        identity = isinstance(step.layer, SkipConnection)
        R_in = shares[0] if identity else None  # the identity's share is a fresh tensor: accumulate in place
        for branch, recs, share, t in zip(step.children, rec.extras["records"], shares[identity:],
                                          totals[identity:]):
            R_branch = prop.backward(branch, recs, share, total=t)
            R_in = R_branch if R_in is None else R_in.add_(R_branch) if identity else R_in + R_branch
        return R_in


class SkipConnectionRule(_SplitRule):
    """Residual split for ``y = a + f(a)``: ``R_a = a / stab(y) ⊙ R``, ``R_f = f(a) / stab(y) ⊙ R``;
    ``R_f`` is propagated through ``f`` and the result added to ``R_a``. Conserves up to the stabiliser."""

    accepted = (SkipConnection,)


class SumRule(_SplitRule):
    """Parallel split for ``y = Σ_i f_i(a)``: ``R_i = f_i(a) / stab(y) ⊙ R``, each propagated through its
    branch, the inputs' relevances added. Conserves up to the stabiliser."""

    accepted = (Sum,)
