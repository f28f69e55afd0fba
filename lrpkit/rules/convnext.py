"""Rules for the layers of timm's ConvNeXt that the other families do not have: channel permutes and ConvNeXt V2's
global response normalisation. (Its LayerNorm2d is a :class:`~lrpkit.layers.LayerNormalize` over dim 1 with
:class:`~lrpkit.rules.LayerNormRule`.)
"""

from __future__ import annotations

import torch

from ..layers import GlobalResponseNormalize, Permute
from ..propagate import Record, Step, per_sample
from ..traits import Traits
from .base import Rule, divide


class PermuteRule(Rule):
    """Inverse of :class:`~lrpkit.layers.Permute`: ``R_in = R.permute(inverse)``, a view, laid out in memory as the
    layer's input is (:class:`~lrpkit.layers.Permute`). Conserves exactly."""

    targets = ()
    accepted = (Permute,)

    def __init__(self):
        pass

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        return Record(x.detach(), step.layer(x.detach()))

    def lrp(self, step, rec, R, tape):
        return R.permute(step.layer.inverse)

    def traits(self, layer) -> Traits:
        # a view of the input: nothing to keep or recompute beyond the input's shape
        return Traits(output=False, lazy_input=True, output_recomputable=True, moves_only=True)


class GlobalResponseNormRule(Rule):
    """LRP-ε through global response normalisation ``y = x ⊙ (1 + γ ⊙ N(x)) + β``
    (:class:`~lrpkit.layers.GlobalResponseNormalize`) with the normalised response ``N`` held constant, as
    LayerNorm's σ is (:class:`~lrpkit.rules.LayerNormRule`): the layer is then an element-wise affine map and
    ``R_x = x ⊙ (1 + γ ⊙ N) / stab(y) ⊙ R``; the rest, ``β / stab(y) ⊙ R``, is absorbed by the bias (reported as
    ``bias``). With ε → 0 this is gradient × input of the layer with ``N`` detached."""

    targets = ()
    accepted = (GlobalResponseNormalize,)

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        # the response N (one value per sample and channel) is kept: the rule would otherwise recompute it from x
        with torch.no_grad():
            y, response = step.layer.forward_with_response(x.detach())
        return Record(x.detach(), y, extras={"response": response})

    def lrp(self, step, rec, R, tape):
        layer, x = step.layer, rec.input
        shape = layer._shape()
        s = divide(R, rec.output, self.epsilon)  # a fresh tensor: multiplied in place below
        rec.absorbed["bias"] = per_sample(s * layer.bias.view(shape))
        factor = torch.addcmul(torch.ones_like(layer.weight).view(shape), layer.weight.view(shape),
                               rec.extras["response"])
        return (x * factor).mul_(s)
