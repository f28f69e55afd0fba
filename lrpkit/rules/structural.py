"""Rules for the container layers: residual connections, parallel branches and products of two branches.

The first two split the relevance of a sum in proportion to its summands (Montavon et al. 2019, §10.2; zennit's
``Norm`` rule on its ``Sum`` layer), then propagate each share through its branch with the branch's own rules.
:class:`ProductRule` holds a gate constant or splits a product uniformly.
"""

from __future__ import annotations

import torch

from ..layers import Multiply, SkipConnection, Sum
from ..propagate import Record, Step
from ..recompute import to_keep, value_of
from ..traits import Traits
from .base import Rule, divide, vmapped, writable


class _SplitRule(Rule):
    targets = ()
    #: the recording pass keeps the autograd graph of the summands and passes it on (Chefer et al.'s split rules,
    #: :mod:`lrpkit.rules.chefer`); the record then keeps each summand's recipe where it has one
    keeps_graph = False

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        keep = self.keeps_graph
        x = x if keep else x.detach()
        outs = [out if keep else out.detach() for out in (tape.forward(branch, x) for branch in step.children)]
        if isinstance(step.layer, SkipConnection):
            outs.insert(0, x)
        y = outs[0] + outs[1] if len(outs) > 1 else outs[0].clone()
        for out in outs[2:]:
            y = y.add_(out) if not y.requires_grad else y + out
        if keep:  # the graph goes on; the record keeps each summand's recipe where it has one (a Linear's output)
            kept = [to_keep(out) for out in outs]
        else:
            first = 1 if isinstance(step.layer, SkipConnection) else 0  # the identity summand a: the record's input
            kept = outs[:first] + [tape.output_to_keep(branch, out)
                                   for branch, out in zip(step.children, outs[first:])]
        return Record(x.detach(), y, extras={"summands": [t.detach() if torch.is_tensor(t) else t for t in kept]})

    @staticmethod
    def summands(rec: Record) -> list[torch.Tensor]:
        """The summands of the recorded sum (a branch's output recomputed where the record keeps its recipe)."""
        return [value_of(kept) for kept in rec.extras["summands"]]

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        s = divide(R, rec.output, self.epsilon, rec.gate)
        summands = self.summands(rec)
        if isinstance(step.layer, SkipConnection):  # y = a + f(a): R_in = R_f propagated through f, + a ⊙ s
            a, f = summands
            R_in = tape.backward(step.children[0], f * s)
            in_place = writable(R_in, a) and not vmapped(R_in)  # vmap has no batching rule for addcmul_
            return R_in.addcmul_(a, s) if in_place else torch.addcmul(R_in, a, s)
        # y = Σ f_i(a): R_in = Σ_i (f_i ⊙ s) propagated through f_i; the last share is written into s
        shares = [summand * s for summand in summands[:-1]] + [s.mul_(summands[-1])]
        R_in = None
        for branch, share in zip(step.children, shares):
            R_branch = tape.backward(branch, share)
            R_in = R_branch if R_in is None else R_in.add_(R_branch) if writable(R_in, R_branch) else \
                R_in + R_branch
        return R_in

    def traits(self, layer) -> Traits:
        # the record keeps the summands, not their sum; the sum y enters only the denominator (so the gate can
        # replace it); R_in vanishes where a does if every branch's first rule does (the plan checks the branches);
        # a kept graph holds y too
        own_lrp = self._inherits("lrp", _SplitRule)
        in_record_only = self._inherits("forward", _SplitRule) and not self.keeps_graph
        return Traits(output_in_record_only=in_record_only, uses_gate=own_lrp,
                      vanishes_with_input=own_lrp, split=own_lrp)


class SkipConnectionRule(_SplitRule):
    """Residual split for ``y = a + f(a)``: ``R_a = a / stab(y) ⊙ R``, ``R_f = f(a) / stab(y) ⊙ R``;
    ``R_f`` is propagated through ``f`` and the result added to ``R_a``. Conserves up to the stabiliser."""

    accepted = (SkipConnection,)


class SumRule(_SplitRule):
    """Parallel split for ``y = Σ_i f_i(a)``: ``R_i = f_i(a) / stab(y) ⊙ R``, each propagated through its
    branch, the inputs' relevances added. Conserves up to the stabiliser."""

    accepted = (Sum,)


class ProductRule(Rule):
    """Relevance through :class:`~lrpkit.layers.Multiply`, ``y = s ⊙ g`` (``s`` the signal branch, ``g`` the gate
    branch, broadcast against each other):

    - ``mode="gate"`` (the default, and what the CNN presets and CP-LRP use): the gate is held constant, as CP-LRP
      holds attention probabilities constant; ``y`` is then linear in ``s`` and the relevance passes through the
      signal unchanged, ``R_s = R`` (summed over the dimensions along which ``s`` was broadcast); the gate branch
      gets none (the recording pass evaluates it without recording its layers). For a squeeze-excitation block
      ``x ⊙ σ(g(mean(x)))`` this is ``R_x = R``.
    - ``mode="uniform"`` (AttnLRP's rule for a product of two signals, Achtibat et al. 2024): half to each factor,
      ``R_s = R / 2``, ``R_g = R / 2`` (each summed over its broadcast dimensions), each propagated through its
      branch and the input relevances added. The ε → 0 limit of LRP-ε with the halving (``R_s = s ⊙ ∂y/∂s ⊙
      R / (2y)``), taken exactly.

    Both conserve: ``Σ R_s + Σ R_g = Σ R``.
    """

    targets = ()
    accepted = (Multiply,)

    def __init__(self, mode: str = "gate"):
        if mode not in ("gate", "uniform"):
            raise ValueError(f"ProductRule mode must be 'gate' or 'uniform', got {mode!r}")
        self.mode = mode

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        x = x.detach()
        signal, gate = step.children
        s = tape.forward(signal, x).detach()
        if self.mode == "gate":  # a constant: evaluated, not recorded (the reverse loop never enters the branch)
            with torch.no_grad():
                g = step.layer.gate(x)
        else:
            g = tape.forward(gate, x).detach()
        return Record(x, s * g, extras={"shapes": (s.shape, g.shape)})

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        (signal, gate), (s_shape, g_shape) = step.children, rec.extras["shapes"]
        if self.mode == "gate":
            return tape.backward(signal, R.sum_to_size(s_shape))
        half = R / 2
        R_in = tape.backward(signal, half.sum_to_size(s_shape))
        return R_in + tape.backward(gate, half.sum_to_size(g_shape))

    def traits(self, layer) -> Traits:
        return Traits(output=False)  # lrp reads only the factors' shapes
