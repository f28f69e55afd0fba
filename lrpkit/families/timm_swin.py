"""The ``timm-swin`` family: timm's ``SwinTransformer`` (``swin_tiny/small/base/large_patch4_window7_224``,
``swin_base/large_patch4_window12_384``, the ``swin_s3_*`` models with per-stage windows), canonized; default
composite CP-LRP; geometry: timm's patch size, no prefix tokens, attention within windows (not global), feature maps
channels last.

The chain (one entry per line; every tensor after the patch projection is channels last, (B, H, W, C))::

    Conv2d                         patch projection (patch_embed.proj)
    Permute(0, 2, 3, 1)            (B, C, H, W) -> (B, H, W, C)
    LayerNormalize, Scale          patch_embed.norm
    per stage:
      SpaceToDepth, LayerNormalize, Scale, Linear     patch merging (downsample; stages 1, 2, ...): 2x2 -> 4C, norm,
                                                      reduction to 2C without bias
      per block:
        SkipConnection(Chain(LayerNormalize, Scale, WindowSelfAttention))   norm1, (shifted) window attention
        SkipConnection(Chain(LayerNormalize, Scale, Linear, act, Linear))   norm2, MLP
    LayerNormalize, Scale          final norm
    Flatten(1, 2), TokenMean       timm's head pool 'avg': the mean over H·W positions (none for global_pool='')
    Linear                         head.fc (if any)

:class:`~lrpkit.layers.WindowSelfAttention` holds each block's window size, shift and feature grid as timm resolved
them (a window as large as the map where the map is smaller, and then no shift; ``always_partition``), the relative
position bias read from the block's table and the block's shift mask. Drop path and dropout are the identity in eval
mode and are left out: the canonized model computes the eval-mode output.

Supported exactly: timm's ``PatchEmbed`` (Conv2d, channels-last output, its norm), ``PatchMerging``,
``SwinTransformerBlock`` with ``WindowAttention`` and ``Mlp``, LayerNorm norms (``nn.LayerNorm``, timm's
``LayerNorm``), any window sizes (per stage too), ``head_dim``, ``qkv_bias``, ``mlp_ratio``, element-wise activations
with a registered rule, ``always_partition``, grids that are not a multiple of the window (timm's zero padding) or
odd (patch merging's padding), ``global_pool`` 'avg' or ''. Anything else is a
:class:`~lrpkit.canonize.CanonizationError` that names it: ``strict_img_size=False`` / ``dynamic_img_size=True``
(shift masks built per input), other pools ('max', 'avgmax', ...), other norm, block, attention, MLP or embedding
types, a patch-embedding ``dynamic_img_pad``, a subclass that overrides a forward method.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonize.core import CanonizationError, copy_layer, join, make_chain, overridden
from ..layers import LayerNormalize, Permute, Scale, SkipConnection, SpaceToDepth, TokenMean, WindowSelfAttention
from . import Family, Geometry, register_family

_DROPPED = (nn.Identity, nn.Dropout)


def _unsupported(what: str) -> CanonizationError:
    return CanonizationError(
        f"lrpkit cannot canonize this timm SwinTransformer: {what} is not supported. Supported: PatchEmbed, "
        f"PatchMerging, SwinTransformerBlock with WindowAttention and Mlp, LayerNorm norms, a fixed input size "
        f"(strict_img_size=True), global_pool 'avg' or ''.")


def _check_forward(module: nn.Module, base: type, path: str, methods=("forward",)) -> None:
    """``module`` is an instance of ``base`` whose forward methods are ``base``'s own."""
    if not isinstance(module, base):
        raise _unsupported(f"the module {path or '<model>'} ({type(module).__name__}, expected {base.__name__})")
    name = overridden(module, base, methods)
    if name is not None:
        raise _unsupported(f"a subclass of {base.__name__} that overrides {name}() ({path or '<model>'})")


def _linear(fc: nn.Module, path: str) -> list:
    from timm.layers import Linear as TimmLinear

    if type(fc) not in (nn.Linear, TimmLinear):
        raise _unsupported(f"the linear layer {path} ({type(fc).__name__})")
    return [(path, copy_layer(fc))]


def _norm(norm: nn.Module, path: str) -> list:
    """LayerNorm over the channels (last dimension) -> LayerNormalize + Scale; Identity -> nothing."""
    from timm.layers import LayerNorm

    if isinstance(norm, _DROPPED):
        return []
    if type(norm) not in (nn.LayerNorm, LayerNorm) or len(norm.normalized_shape) != 1:
        raise _unsupported(f"the norm layer {path} ({type(norm).__name__})")
    entries = [(path, LayerNormalize(norm.eps))]
    if norm.weight is not None or norm.bias is not None:
        weight = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape)
        entries.append((path, Scale(weight, norm.bias)))
    return entries


def _patch_embed(model: nn.Module, path: str) -> list:
    from timm.layers import PatchEmbed
    from timm.layers.format import Format

    pe = model.patch_embed
    _check_forward(pe, PatchEmbed, path)
    if type(pe.proj) is not nn.Conv2d:
        raise _unsupported(f"the patch projection {join(path, 'proj')} ({type(pe.proj).__name__})")
    if pe.flatten or getattr(pe, "output_fmt", None) != Format.NHWC:
        raise _unsupported(f"a patch embedding with output format {getattr(pe, 'output_fmt', None)} (not NHWC)")
    if getattr(pe, "dynamic_img_pad", False):
        raise _unsupported("dynamic_img_pad in the patch embedding")
    return ([(join(path, "proj"), copy_layer(pe.proj)), (path, Permute((0, 2, 3, 1)))]
            + _norm(pe.norm, join(path, "norm")))


def _patch_merging(merge: nn.Module, path: str) -> list:
    from timm.models.swin_transformer import PatchMerging

    if isinstance(merge, _DROPPED):
        return []
    _check_forward(merge, PatchMerging, path)
    if getattr(merge.reduction, "bias", None) is not None:
        raise _unsupported(f"a patch-merging reduction with a bias ({join(path, 'reduction')})")
    return ([(path, SpaceToDepth())] + _norm(merge.norm, join(path, "norm"))
            + _linear(merge.reduction, join(path, "reduction")))


def _attention(block: nn.Module, path: str) -> WindowSelfAttention:
    from timm.models.swin_transformer import WindowAttention

    attn = block.attn
    _check_forward(attn, WindowAttention, join(path, "attn"), ("forward", "_get_rel_pos_bias"))
    if getattr(block, "dynamic_mask", False):
        raise _unsupported(f"a shift mask built per input (dynamic_img_size=True / strict_img_size=False; {path})")
    window, shift, grid = tuple(block.window_size), tuple(block.shift_size), tuple(block.input_resolution)
    if tuple(attn.window_size) != window:
        raise _unsupported(f"a window attention of window {tuple(attn.window_size)} in a block of window {window} "
                           f"({path})")
    if any(shift) and block.attn_mask is None:
        raise _unsupported(f"a shifted block without its shift mask ({path})")
    with torch.no_grad():
        relative = attn._get_rel_pos_bias()[0].detach().clone()  # (heads, n, n)
    mask = block.attn_mask if any(shift) else None
    return WindowSelfAttention(copy_layer(attn.qkv), copy_layer(attn.proj), attn.num_heads, attn.scale, window, grid,
                               shift=shift, relative_bias=relative, mask=mask)


def _mlp(mlp: nn.Module, path: str) -> list:
    from timm.layers import Mlp

    _check_forward(mlp, Mlp, path)
    out = _linear(mlp.fc1, join(path, "fc1"))
    if not isinstance(mlp.act, _DROPPED):
        out.append((join(path, "act"), copy_layer(mlp.act)))
    return out + _norm(mlp.norm, join(path, "norm")) + _linear(mlp.fc2, join(path, "fc2"))


def _block(block: nn.Module, path: str) -> list:
    from timm.models.swin_transformer import SwinTransformerBlock

    _check_forward(block, SwinTransformerBlock, path, ("forward", "_attn"))
    attn = _norm(block.norm1, join(path, "norm1")) + [(join(path, "attn"), _attention(block, path))]
    mlp = _norm(block.norm2, join(path, "norm2")) + _mlp(block.mlp, join(path, "mlp"))
    return [(join(path, "attn"), SkipConnection(make_chain(attn))),
            (join(path, "mlp"), SkipConnection(make_chain(mlp)))]


def _head(model: nn.Module, path: str) -> list:
    from timm.layers import ClassifierHead, SelectAdaptivePool2d
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool

    head = model.head
    _check_forward(head, ClassifierHead, path)
    pool = head.global_pool
    _check_forward(pool, SelectAdaptivePool2d, join(path, "global_pool"))
    if head.use_conv:
        raise _unsupported("a convolutional classifier (use_conv=True)")
    out = []
    if not pool.is_identity():
        inner = pool.pool
        if type(inner) is not FastAdaptiveAvgPool or tuple(inner.dim) != (1, 2) or not inner.flatten:
            raise _unsupported(f"global_pool={pool.pool_type!r}")
        out += [(join(path, "global_pool"), nn.Flatten(1, 2)), (join(path, "global_pool"), TokenMean(0))]
    if not isinstance(head.fc, _DROPPED):
        out += _linear(head.fc, join(path, "fc"))
    return out


def canonize_swin(model: nn.Module, path: str = "") -> list:
    """The flat chain of a timm SwinTransformer (see the module docstring)."""
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage

    _check_forward(model, SwinTransformer, path, ("forward", "forward_features", "forward_head"))
    out = _patch_embed(model, join(path, "patch_embed"))
    for i, stage in enumerate(model.layers):
        spath = join(path, f"layers.{i}")
        _check_forward(stage, SwinTransformerStage, spath)
        out += _patch_merging(stage.downsample, join(spath, "downsample"))
        for j, block in enumerate(stage.blocks):
            out += _block(block, join(spath, f"blocks.{j}"))
    out += _norm(model.norm, join(path, "norm")) + _head(model, join(path, "head"))
    for _, layer in out:
        layer.eval()
    return out


def swin_geometry(model, chain=None) -> Geometry:
    """timm's ``patch_embed.patch_size``, no prefix tokens, windowed (not global) attention, channels-last feature
    maps."""
    size = model.patch_embed.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return Geometry(size, 0, global_attention=False)


def _cplrp(chain):
    from ..presets import CPLRP
    return CPLRP()


#: The methods ``lrpkit evaluate`` runs by default on a Swin Transformer (the attention methods need global
#: attention, which Swin's windows do not have).
SWIN_METHODS = ("lrp", "attnlrp", "gradient", "input-x-gradient", "integrated-gradients", "smoothgrad")

try:
    from timm.models.swin_transformer import SwinTransformer as _SwinTransformer
except ImportError:  # pragma: no cover  (timm is optional for canonization)
    pass
else:
    register_family(Family("timm-swin", (_SwinTransformer,), {_SwinTransformer: canonize_swin}, composite=_cplrp,
                           geometry=swin_geometry, methods=SWIN_METHODS))
