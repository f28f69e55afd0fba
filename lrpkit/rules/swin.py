"""Rules for the layers of timm's Swin Transformer that the other families do not have. Its window attention,
:class:`~lrpkit.layers.WindowSelfAttention`, is a :class:`~lrpkit.layers.SelfAttention` and gets
:class:`~lrpkit.rules.SelfAttentionRule` (CP and AttnLRP) unchanged: the rule runs on the windows and passes the
relevance back through the inverse of the shift and the window partition.
"""

from __future__ import annotations

import torch

from ..layers import SpaceToDepth
from ..propagate import Record, Step
from ..traits import Traits
from .base import Rule


class SpaceToDepthRule(Rule):
    """Inverse of :class:`~lrpkit.layers.SpaceToDepth` (Swin's patch merging): the relevance of output channel
    ``s·2C + r·C + k`` at position (i, j) goes back to channel k at input position (2i + r, 2j + s),
    ``R_in = SpaceToDepth.inverse(R)``. Conserves exactly when the grid is even; for an odd grid the relevance of
    the zero padding is dropped, which is zero under a rule below that weighs by its input (LayerNorm's, LRP-ε); the
    accounting reports what was dropped as ``padding``."""

    targets = ()
    accepted = (SpaceToDepth,)

    def __init__(self):
        pass

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        with torch.no_grad():
            return Record(x.detach(), step.layer(x.detach()), extras={"shape": tuple(x.shape)})

    def lrp(self, step, rec, R, tape):
        return SpaceToDepth.inverse(R, rec.extras["shape"])

    def traits(self, layer) -> Traits:
        # reads neither the input's values (its shape is in the record's extras) nor the output
        return Traits(output=False, lazy_input=True, output_recomputable=True, remainder="padding")
