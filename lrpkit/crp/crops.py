"""The crop of a reference sample: the input region a concept's maximal position sees.

- **Feature maps** (B, C, *S) of a CNN: the *receptive field* of the position, computed analytically by mapping
  the position back through every layer below it. A convolution or pooling with kernel k, stride s, padding p and
  dilation d maps the output range [o₀, o₁] of a spatial dim to the input range

  $$[\\,o_0 s - p,\\; o_1 s - p + d (k - 1)\\,] \\cap [0, n - 1]$$

  (n: the input's size in that dim); an adaptive pooling maps output i to
  [⌊i n / m⌋, ⌈(i + 1) n / m⌉ − 1] (m: the output size); element-wise layers (activations, BatchNorm,
  ``Scale``) keep the range; a layer that mixes a dim (a ``Linear`` over the last dim, ``LayerNormalize`` over its
  dim, a global pooling, ``Flatten``, ``GlobalResponseNormalize``) makes it the whole dim; ``Permute`` reorders the
  dims; a residual connection or parallel branches take the union (the bounding box) of their branches' ranges (the
  identity path of a ``SkipConnection`` included). The result is exact: the smallest box that holds every input
  pixel the position depends on for some input (ReLUs that happen to be off for one image do not shrink it).
- **Tokens** (B, N, C) of a ViT: the *patch* of the token, ``[r·ph, (r+1)·ph) × [c·pw, (c+1)·pw)`` for patch
  token ``t = prefix + r·gw + c`` (gw patches per row, ``prefix`` class/register tokens in front); the whole image
  for a prefix token (the class token holds no patch of its own). Self-attention mixes all tokens, so the patch is
  not the token's receptive field (which is the whole image from the first attention layer on); it is where the
  token's own content came from, the convention of zennit-crp's and the CRP paper's ViT figures.
- A vector (B, C): the whole input.

A box is ``(y0, x0, y1, x1)``, half-open (``image[:, y0:y1, x0:x1]``), in the pixels of the model's input.

Reference: Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
Relevance Propagation", Nature Machine Intelligence 5 (reference samples shown as receptive-field crops);
Araujo et al. 2019, "Computing receptive fields of convolutional neural networks", Distill.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import (Chain, ClassToken, GlobalResponseNormalize, LayerNormalize, Multiply, Permute,
                      PositionalEmbedding, Scale, SkipConnection, Sum, TokenMean)
from ..walk import branches_of, run
from .locate import LayerRef

__all__ = ["crop_boxes", "check_crop_geometry"]

#: Layers that act on every element alone (the range of every dim is kept).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
               nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.BatchNorm1d, nn.BatchNorm2d,
               nn.BatchNorm3d, Scale, PositionalEmbedding)
#: Layers after which every dim depends on the whole input.
GLOBAL = (nn.Flatten, nn.Linear, GlobalResponseNormalize, TokenMean, ClassToken, nn.GroupNorm, nn.LayerNorm)
_WINDOWED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
             nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

Box = list  # per non-batch dim: (lo, hi) inclusive, or None for the whole dim


class _Unknown(Exception):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _union(a: Box, b: Box) -> Box:
    return [None if x is None or y is None else (min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b)]


def _windowed(layer, box: Box, shape: tuple) -> Box:
    nd = len(shape) - 1  # spatial dims after the channel
    k, s = _tuple(layer.kernel_size, nd), _tuple(layer.stride or layer.kernel_size, nd)
    d = _tuple(getattr(layer, "dilation", 1), nd)
    p = layer.padding
    if p == "valid":
        p = (0,) * nd
    elif p == "same":
        p = tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    p = _tuple(p, nd)
    out = [None if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else box[0]]
    for i in range(nd):
        r, n = box[1 + i], shape[1 + i]
        if r is None:
            out.append(None)
            continue
        lo, hi = r[0] * s[i] - p[i], r[1] * s[i] - p[i] + d[i] * (k[i] - 1)
        out.append((max(lo, 0), min(hi, n - 1)))
    return out


def _adaptive(box: Box, shape: tuple, out_shape: tuple) -> Box:
    out = [box[0]]
    for i in range(1, len(shape)):
        r, n, m = box[i], shape[i], out_shape[i]
        out.append(None if r is None else (r[0] * n // m, math.ceil((r[1] + 1) * n / m) - 1))
    return out


def _leaf(layer, box: Box, shape: tuple, out_shape: tuple) -> Box:
    """The input box of a leaf layer for an output box (``shape``, ``out_shape``: without the batch dim)."""
    if isinstance(layer, ELEMENTWISE):
        return list(box)
    if isinstance(layer, _WINDOWED):
        return _windowed(layer, box, shape)
    if isinstance(layer, _ADAPTIVE):
        return _adaptive(box, shape, out_shape)
    if isinstance(layer, LayerNormalize):
        out = list(box)
        out[layer.dim if layer.dim < 0 else layer.dim - 1] = None
        return out
    if isinstance(layer, Permute):  # out dim i is in dim dims[i] (batch dims included)
        out: Box = [None] * len(shape)
        for i, src in enumerate(layer.dims[1:]):
            out[src - 1] = box[i]
        return out
    if isinstance(layer, GLOBAL):
        return [None] * len(shape)
    raise _Unknown(layer)


class _Shapes:
    """Input and output shape (without the batch dim) of every layer, from one forward pass of a zero input."""

    def __init__(self, chain: Chain, input_shape: tuple, dtype, device):
        self.inputs, self.outputs = {}, {}

        def seen(layer, x, y):
            self.inputs.setdefault(id(layer), tuple(x.shape[1:]))
            self.outputs.setdefault(id(layer), tuple(y.shape[1:]))

        with torch.no_grad():
            run(chain, torch.zeros((1, *input_shape), dtype=dtype, device=device), seen=seen)


def _through(layer, box: Box, shapes: _Shapes) -> Box:
    """Map an output box of ``layer`` (a leaf or a container) to its input."""
    branches = branches_of(layer)
    if not branches:
        return _leaf(layer, box, shapes.inputs[id(layer)], shapes.outputs[id(layer)])
    if not isinstance(layer, (SkipConnection, Sum, Multiply)):
        raise _Unknown(layer)
    result = list(box) if isinstance(layer, SkipConnection) else None
    for branch in branches:
        b = _chain_back(branch, len(branch), box, shapes)
        result = b if result is None else _union(result, b)
    return result


def _chain_back(chain: Chain, end: int, box: Box, shapes: _Shapes) -> Box:
    """Map a box at the output of ``chain[end - 1]`` back to the chain's input."""
    for i in reversed(range(end)):
        box = _through(chain[i], box, shapes)
    return box


def _path_back(chain: Chain, parts: list[str], box: Box, shapes: _Shapes) -> Box:
    """Map a box at the output of the layer at chain path ``parts`` (``["7", "branch0", "2"]``) to the input."""
    i = int(parts[0])
    if len(parts) == 1:
        box = _through(chain[i], box, shapes)
    else:
        branches = branches_of(chain[i])
        b = 0 if parts[1] == "inner" else int(parts[1][len("branch"):])
        box = _path_back(branches[b], parts[2:], box, shapes)
    return _chain_back(chain, i, box, shapes)


def _fail(error: _Unknown) -> ValueError:
    layer = error.layer
    return ValueError(f"the crop of a reference sample needs the receptive field, and lrpkit does not know the "
                      f"geometry of {type(layer).__module__}.{type(layer).__qualname__} ({layer}); pass crops=False "
                      f"to scan without crops")


def check_crop_geometry(lrp, ref: LayerRef, input_shape: tuple) -> None:
    """Raise ``ValueError`` now if :func:`crop_boxes` would not know a layer between the input and ``ref``."""
    crop_boxes(lrp, ref, torch.zeros(1, dtype=torch.long), input_shape)


def _patch_boxes(lrp, positions: torch.Tensor, input_shape: tuple, tokens: int) -> torch.Tensor:
    (ph, pw), (_, _, h, w) = lrp.patch_size, _whole(input_shape)
    gh, gw = h // ph, w // pw
    prefix = tokens - gh * gw
    if prefix < 0:
        raise ValueError(f"{tokens} tokens cannot hold the {gh}x{gw} patches of a {h}x{w} input")
    p = positions - prefix
    r, c = p.div(gw, rounding_mode="floor"), p % gw
    boxes = torch.stack([r * ph, c * pw, (r + 1) * ph, (c + 1) * pw], -1)
    whole = torch.tensor(_whole(input_shape), dtype=torch.long).expand_as(boxes)
    return torch.where((p < 0)[..., None], whole, boxes)


def _whole(input_shape: tuple) -> tuple:
    """``(0, 0, H, W)`` of an image (C, H, W); ``(0, 0, 1, L)`` of a sequence (C, L)."""
    h, w = (input_shape[-2], input_shape[-1]) if len(input_shape) >= 3 else (1, input_shape[-1])
    return 0, 0, h, w


def crop_boxes(lrp, ref: LayerRef, positions: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """The crop boxes ``(..., 4)`` = ``(y0, x0, y1, x1)`` of positions (flat indices into the layer output's
    positions, as :func:`lrpkit.crp.probe.channel_maps` lays them out) of layer ``ref``, for inputs of shape
    ``input_shape`` (C, H, W) (see the module docstring). Raises ``ValueError`` for a layer of unknown geometry
    between the input and ``ref``."""
    positions = torch.as_tensor(positions, dtype=torch.long)
    shapes = _Shapes(lrp.chain, tuple(input_shape), lrp.dtype or torch.float32, lrp.device or "cpu")
    out_shape = shapes.outputs[id(ref.layer)]
    if len(out_shape) == 2 and getattr(lrp, "patch_size", None) is not None:
        return _patch_boxes(lrp, positions, input_shape, out_shape[0])
    if len(out_shape) < 2:
        return torch.tensor(_whole(input_shape), dtype=torch.long).expand(*positions.shape, 4).clone()
    spatial, flat, found = out_shape[1:], positions.reshape(-1), {}
    for p in flat.unique().tolist():
        coords, q = [], p
        for size in reversed(spatial):
            q, r = divmod(q, size)
            coords.append(r)
        try:
            back = _path_back(lrp.chain, ref.path.split("."), [None] + [(c, c) for c in reversed(coords)], shapes)
        except _Unknown as err:
            raise _fail(err) from None
        ranges = [(0, n - 1) if r is None else r for r, n in zip(back[1:], input_shape[1:])]
        (y0, y1), (x0, x1) = ([(0, 0)] + ranges)[-2:]
        found[p] = (y0, x0, y1 + 1, x1 + 1)
    return torch.tensor([found[p] for p in flat.tolist()], dtype=torch.long).reshape(*positions.shape, 4)
