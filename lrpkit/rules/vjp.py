"""Vector-Jacobian products of the linear layers, from their weights alone.

For a layer that is linear in its input (``z = W a + b``), ``c = (∂z/∂a)ᵀ s = Wᵀ s`` does not depend on ``a``, so
the rules need no autograd graph (which would keep the layer's input alive) and no second forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Scale

CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def has_input_vjp(layer: nn.Module) -> bool:
    """Whether :func:`input_vjp` handles ``layer`` (Linear, Scale, zero-padded Conv1d/2d/3d)."""
    if isinstance(layer, (nn.Linear, Scale)):
        return True
    return type(layer) in CONV_DIMS and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def input_vjp(layer: nn.Module, s: torch.Tensor, input_shape: torch.Size, overwrite: bool = False) -> torch.Tensor:
    """``(∂ layer(a) / ∂a)ᵀ s`` for a Linear, Scale or zero-padded ConvNd layer (see :func:`has_input_vjp`).
    ``overwrite``: ``s`` is the caller's own and read no more, so an element-wise layer may write the result into
    it."""
    if isinstance(layer, nn.Linear):
        return s @ layer.weight
    if isinstance(layer, Scale):
        w = layer.weight.view(layer._shape(s))
        return s.mul_(w) if overwrite and not s.requires_grad else s * w
    dims = CONV_DIMS[type(layer)]
    # the adjoint of a convolution is the transposed convolution with the same weight; output_padding restores
    # the input rows a strided convolution did not reach
    extra = [input_shape[2 + i] - ((s.shape[2 + i] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                   + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1) for i in range(dims)]
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return transpose(s, layer.weight, None, layer.stride, layer.padding, extra, layer.groups, layer.dilation)


def vjp(layer: nn.Module, a: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None,
        overwrite: bool = False) -> torch.Tensor:
    """``(∂ layer(a) / ∂a)ᵀ s``: from the weights for linear layers, else by autograd — through the recorded
    output ``z`` if its graph leads to ``a``, or through a fresh forward pass of ``layer`` on ``a``. ``overwrite``:
    as in :func:`input_vjp`."""
    if has_input_vjp(layer):
        return input_vjp(layer, s, a.shape, overwrite)
    if z is None or not a.requires_grad:  # torch.func: also under CRP's vmap over concepts
        _, pullback = torch.func.vjp(layer, a.detach())
        (c,) = pullback(s)
        return c
    (c,) = torch.autograd.grad(z, a, s)
    return c
