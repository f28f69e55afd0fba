"""Where the channels of a layer's output are: dim 1 of (B, C, ...) feature maps, or the last dim of (B, N, C)
tokens and (B, H, W, C) channels-last maps. Followed through a chain from its input (channels in dim 1): each
layer maps the axis of its input to that of its output (:func:`channel_axis_after`). CRP masks channels along this
axis (:func:`lrpkit.crp.locate.channel_axis`), ViT-CX reads its feature maps along it."""

from __future__ import annotations

from torch import nn

from .layers import (GlobalResponseNormalize, LayerNormalize, PatchFlatten, Permute, Scale, SelectClassToken,
                     SelfAttention, TokenMean)

__all__ = ["CHANNELS_FIRST", "CHANNELS_LAST", "channel_axis_after"]

#: layers whose output holds the channels in dim 1: (B, C, ...)
CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Flatten)
#: layers whose output holds the channels in the last dim: (B, N, C) tokens, (B, H, W, C) channels-last maps
CHANNELS_LAST = (nn.Linear, PatchFlatten, SelfAttention, SelectClassToken, TokenMean)


def channel_axis_after(layer: nn.Module, axis: int) -> int:
    """The channel axis of ``layer``'s output (1 or -1), given that of its input: a convolution, BatchNorm or
    Flatten puts them in dim 1; a Linear, an attention layer, the patch flattening or a token pooling last; a
    Permute where it moves them; LayerNormalize, Scale and GlobalResponseNormalize where they work; everything
    else, a container included (its contents end where they began), keeps the layout of its input."""
    if isinstance(layer, CHANNELS_FIRST):
        return 1
    if isinstance(layer, CHANNELS_LAST):
        return -1
    if isinstance(layer, (LayerNormalize, Scale)):
        return layer.dim
    if isinstance(layer, GlobalResponseNormalize):
        return layer.channel_dim
    if isinstance(layer, Permute):
        n = len(layer.dims)
        moved = layer.dims.index(axis % n)
        return -1 if moved == n - 1 else moved
    return axis
