"""What a layer holds for a batch, per channel: its relevance (LRP from the output down to the layer's output) or
its activation, and the per-channel maximum over the positions that reference samples are ranked by.

The relevance at the layer's output is read by an observer of the reverse loop (:class:`lrpkit.tape.Tape`'s
``observers``): the rule of the layer receives it as ``R_out``; the loop is cut right after that step, so nothing
below the layer is computed. For a layer inside a branch (a residual block's MLP) this is the share of the
relevance that flows through the branch; what bypasses it on the identity path is not part of it.

Channels (the concepts of CRP): dim 1 of a (B, C, ...) feature map; the last dim of a (B, N, C) token tensor of
a model with a patch grid (a ViT, ``lrp.patch_size`` set); the features of a (B, C) vector.
"""

from __future__ import annotations

import torch

from ..analyzer import output_relevance
from ..tape import Tape
from ..walk import run
from .locate import LayerRef

__all__ = ["layer_relevance", "layer_activation", "tokens_layout", "channel_maps", "channel_scores"]


class _Reached(Exception):
    """Raised inside a loop once the layer's value is in hand: the rest of the loop is not needed."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


class _OutputRelevance:
    """Tape observer: the relevance at the output of step ``index`` (the ``R_out`` its rule received)."""

    def __init__(self, index: int):
        self.index = index

    def loop_started(self, R) -> None:
        pass

    def loop_ended(self, R) -> None:
        pass

    def step_passed(self, step, plan, rec, R_out, R_in) -> None:
        if step.index == self.index:
            raise _Reached(R_out.detach())


def _prepare(lrp, x: torch.Tensor) -> torch.Tensor:
    x = x.to(device=lrp.device or x.device, dtype=lrp.dtype or x.dtype)
    lrp._check_input(x)
    return x.detach()


def layer_relevance(lrp, ref: LayerRef, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, target)``: the LRP relevance at the output of layer ``ref`` for explaining ``output[b, target[b]]``
    (one-hot output relevance, ``normalize_output=True``; ``target`` as in :class:`lrpkit.LRP`: None for the
    argmax, an int, or one per sample), and the resolved target (B,). ``R`` has the layer output's shape."""
    x = _prepare(lrp, x)
    tape = Tape(lrp.plan, observers=[_OutputRelevance(ref.index)])
    with torch.enable_grad():
        output = tape.forward(lrp.steps, x).detach()
    R_out, t = output_relevance(output, target, None, True)
    try:
        tape.backward(lrp.steps, R_out)
    except _Reached as reached:
        return reached.value, t
    raise RuntimeError(f"the reverse loop did not pass layer {ref.index} ({ref.name})")  # pragma: no cover


def layer_activation(lrp, ref: LayerRef, x: torch.Tensor) -> torch.Tensor:
    """The output of layer ``ref`` for input ``x`` (the canonized model's forward pass, stopped there)."""
    x = _prepare(lrp, x)

    def seen(layer, inp, out):
        if layer is ref.layer:
            raise _Reached(out.detach())

    try:
        with torch.no_grad():
            run(lrp.chain, x, seen=seen)
    except _Reached as reached:
        return reached.value
    raise RuntimeError(f"the forward pass did not reach layer {ref.index} ({ref.name})")  # pragma: no cover


def tokens_layout(lrp, value: torch.Tensor) -> bool:
    """Whether a layer value is a (B, N, C) token tensor: 3 dims in a model with a patch grid."""
    return value.ndim == 3 and getattr(lrp, "patch_size", None) is not None


def channel_maps(value: torch.Tensor, tokens: bool) -> torch.Tensor:
    """(B, C, P): each channel's values over its P positions (P = 1 for a (B, C) vector; P = N for tokens)."""
    if value.ndim < 2:
        raise ValueError(f"a layer value needs a batch and a channel dim, got shape {tuple(value.shape)}")
    if tokens:
        return value.transpose(1, 2)
    return value.reshape(value.shape[0], value.shape[1], -1)


def channel_scores(maps: torch.Tensor, channels: torch.Tensor, statistic: str = "max"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, p)``, each (B, K): for channel ``channels[k]`` of each sample its score over the positions,
    ``s = max_p maps[b, c, p]`` (``statistic="max"``) or ``s = Σ_p maps[b, c, p]`` (``"sum"``), and the position of
    the maximum ``p = argmax_p maps[b, c, p]`` (the first one on ties, on the CPU)."""
    selected = maps[:, channels]
    values, positions = selected.max(-1)
    return (values if statistic == "max" else selected.sum(-1)), positions
