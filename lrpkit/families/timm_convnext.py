"""The ``timm-convnext`` family: timm's ``ConvNeXt`` (``convnext_atto`` … ``convnext_base`` and larger, the
``_ols`` overlapping stems, ConvNeXt V2 ``convnextv2_*`` with global response normalisation), canonized; default
composite EpsilonPlusFlat; no patch geometry.

The chain (one entry per line)::

    Conv2d [, act, Conv2d]            stem: patchify conv (stem_type 'patch'), or the overlapping 3x3 convs
    LayerNormalize(dim=1), Scale(dim=1)                     stem norm (timm's LayerNorm2d)
    per stage:
      LayerNormalize(dim=1), Scale(dim=1), Conv2d           downsample: LayerNorm2d + strided conv (stages 1-3)
      per block, SkipConnection(Chain(...)) of
        Conv2d                                              depthwise 7x7 (conv_dw)
        conv_mlp=False: Permute(0,2,3,1), LayerNormalize, Scale, Linear, act, [GRN,] Linear, Permute(0,3,1,2)
        conv_mlp=True:  LayerNormalize(dim=1), Scale(dim=1), Conv2d 1x1, act, [GRN,] Conv2d 1x1
        Scale(dim=1)                                        layer scale (gamma), if any
    head (NormMlpClassifierHead):
      AdaptiveAvgPool2d(1) | AdaptiveMaxPool2d(1)           global_pool 'avg' | 'max' (none for '')
      LayerNormalize(dim=1), Scale(dim=1)                   head norm
      Flatten
      Linear, act                                           pre-logits MLP (head_hidden_size), if any
      Linear                                                fc (a 1x1 Conv2d without pooling)

``GRN`` is :class:`~lrpkit.layers.GlobalResponseNormalize` (ConvNeXt V2), channels-last or channels-first as in
the block. A block whose shortcut is not the identity becomes ``Sum(Chain(...), Chain(AvgPool2d, Conv2d))``. Drop
path and dropout are the identity in eval mode and are left out: the canonized model computes the eval-mode
output. ``head_norm_first=True`` puts the final LayerNorm2d before a ``ClassifierHead`` (pool, flatten, fc).

Supported exactly: LayerNorm / LayerNorm2d norms (``norm_layer`` 'layernorm' / 'layernorm2d', any ``norm_eps``),
every ``stem_type``, any ``conv_mlp``, ``use_grn``, ``ls_init_value``, ``conv_bias``, ``kernel_sizes``,
``output_stride`` (dilated convolutions), element-wise activations with a registered rule, pooling 'avg', 'max'
or ''. Anything else (RmsNorm / SimpleNorm variants such as ``convnext_atto_rms``, 'avgmax' / 'catavgmax' / 'fast'
pooling, same-padding ``Conv2dSame`` convolutions, other block, MLP or head types, a subclass that overrides a
forward method, ...) is a :class:`~lrpkit.canonize.CanonizationError`, never a silently different model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonize.core import CanonizationError, copy_layer, join, make_chain, overridden
from ..layers import GlobalResponseNormalize, LayerNormalize, Permute, Scale, SkipConnection, Sum
from . import GENERIC, Family, Geometry, preset_composite, register_family

_DROPPED = (nn.Identity, nn.Dropout)


def _unsupported(what: str) -> CanonizationError:
    return CanonizationError(
        f"lrpkit cannot canonize this timm ConvNeXt: {what} is not supported. Supported: LayerNorm/LayerNorm2d "
        f"norms, Mlp/GlobalResponseNormMlp, plain Conv2d/Linear layers, NormMlpClassifierHead/ClassifierHead with "
        f"'avg', 'max' or no pooling.")


def _check_forward(module: nn.Module, base: type, path: str, methods=("forward",)) -> None:
    """``module`` is an instance of ``base`` whose forward methods are ``base``'s own (not a subclass that
    computes something else)."""
    if not isinstance(module, base):
        raise _unsupported(f"the module {path or '<model>'} ({type(module).__name__}, expected {base.__name__})")
    name = overridden(module, base, methods)
    if name is not None:
        raise _unsupported(f"a subclass of {base.__name__} that overrides {name}() ({path or '<model>'})")


def _conv(conv: nn.Module, path: str) -> list:
    if type(conv) is not nn.Conv2d:  # timm's Conv2dSame (dynamic 'same' padding) is a Conv2d subclass
        raise _unsupported(f"the convolution {path} ({type(conv).__name__})")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "valid":
        raise _unsupported(f"the padding of {path} (padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
    return [(path, copy_layer(conv))]


def _linear(fc: nn.Module, path: str) -> list:
    from timm.layers import Linear as TimmLinear

    if type(fc) in (nn.Conv2d,):
        return _conv(fc, path)
    if type(fc) not in (nn.Linear, TimmLinear):
        raise _unsupported(f"the linear layer {path} ({type(fc).__name__})")
    return [(path, copy_layer(fc))]


def _norm(norm: nn.Module, path: str) -> list:
    """timm LayerNorm2d -> LayerNormalize(dim=1) + Scale(dim=1); LayerNorm (channels last) -> LayerNormalize +
    Scale; Identity -> nothing."""
    from timm.layers import LayerNorm, LayerNorm2d

    if isinstance(norm, _DROPPED):
        return []
    if type(norm) is LayerNorm2d:
        dim = 1
    elif type(norm) in (LayerNorm, nn.LayerNorm):
        dim = -1
    else:
        raise _unsupported(f"the norm layer {path} ({type(norm).__name__})")
    if len(norm.normalized_shape) != 1:
        raise _unsupported(f"the norm layer {path} over {tuple(norm.normalized_shape)}")
    entries = [(path, LayerNormalize(norm.eps, dim=dim))]
    if norm.weight is not None or norm.bias is not None:
        weight = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape)
        entries.append((path, Scale(weight, norm.bias, dim=dim)))
    return entries


def _act(act: nn.Module, path: str) -> list:
    """An activation, copied (canonize checks that it has a rule; the rules of ACTIVATION_TYPES are element-wise)."""
    return [] if isinstance(act, _DROPPED) else [(path, copy_layer(act))]


def _sequential(seq: nn.Module, path: str) -> list:
    """The stem or a stage's downsample: convolutions, norms, activations."""
    if isinstance(seq, _DROPPED):
        return []
    if type(seq) is not nn.Sequential:
        raise _unsupported(f"the module {path} ({type(seq).__name__})")
    out = []
    for name, child in seq.named_children():
        sub = join(path, name)
        if isinstance(child, nn.Conv2d):
            out += _conv(child, sub)
        elif isinstance(child, nn.LayerNorm) or type(child).__name__.endswith(("Norm", "Norm2d")):
            out += _norm(child, sub)
        else:
            out += _act(child, sub)
    return out


def _mlp(mlp: nn.Module, path: str, channels_last: bool) -> list:
    from timm.layers import GlobalResponseNormMlp, Mlp
    from timm.layers.grn import GlobalResponseNorm

    if type(mlp) not in (Mlp, GlobalResponseNormMlp):
        raise _unsupported(f"the MLP {path} ({type(mlp).__name__})")
    kind = nn.Linear if channels_last else nn.Conv2d
    for fc in ("fc1", "fc2"):
        if not isinstance(getattr(mlp, fc), kind):
            raise _unsupported(f"{join(path, fc)} ({type(getattr(mlp, fc)).__name__}) with conv_mlp="
                               f"{not channels_last}")
    out = _linear(mlp.fc1, join(path, "fc1")) + _act(mlp.act, join(path, "act"))
    if type(mlp) is Mlp:
        out += _norm(mlp.norm, join(path, "norm"))
    else:
        grn = mlp.grn
        if type(grn) is not GlobalResponseNorm:
            raise _unsupported(f"the response norm {join(path, 'grn')} ({type(grn).__name__})")
        channel_dim = -1 if grn.channel_dim in (-1, 3) else 1
        if channel_dim != (-1 if channels_last else 1):
            raise _unsupported(f"a {'channels-last' if channel_dim == -1 else 'channels-first'} GRN in "
                               f"{join(path, 'grn')} on {'channels-last' if channels_last else 'NCHW'} features")
        out.append((join(path, "grn"), GlobalResponseNormalize(grn.weight, grn.bias, grn.eps, channel_dim)))
    return out + _linear(mlp.fc2, join(path, "fc2"))


def _block(block: nn.Module, path: str) -> list:
    from timm.models.convnext import ConvNeXtBlock, Downsample

    _check_forward(block, ConvNeXtBlock, path)
    inner = _conv(block.conv_dw, join(path, "conv_dw"))
    if block.use_conv_mlp:
        inner += _norm(block.norm, join(path, "norm")) + _mlp(block.mlp, join(path, "mlp"), channels_last=False)
    else:
        inner += ([(join(path, "permute"), Permute((0, 2, 3, 1)))] + _norm(block.norm, join(path, "norm"))
                  + _mlp(block.mlp, join(path, "mlp"), channels_last=True)
                  + [(join(path, "unpermute"), Permute((0, 3, 1, 2)))])
        if any(isinstance(layer, LayerNormalize) and layer.dim != -1 for _, layer in inner):
            raise _unsupported(f"a LayerNorm2d in the channels-last block {path}")
    if block.gamma is not None:
        inner.append((join(path, "gamma"), Scale(block.gamma, dim=1)))
    if isinstance(block.shortcut, nn.Identity):
        return [(path, SkipConnection(make_chain(inner)))]
    _check_forward(block.shortcut, Downsample, join(path, "shortcut"))
    shortcut = []
    if not isinstance(block.shortcut.pool, nn.Identity):
        if type(block.shortcut.pool) is not nn.AvgPool2d:
            raise _unsupported(f"the shortcut pool {join(path, 'shortcut.pool')} "
                               f"({type(block.shortcut.pool).__name__})")
        shortcut.append((join(path, "shortcut.pool"), copy_layer(block.shortcut.pool)))
    if not isinstance(block.shortcut.conv, nn.Identity):
        shortcut += _conv(block.shortcut.conv, join(path, "shortcut.conv"))
    return [(path, Sum(make_chain(inner), make_chain(shortcut)))]


def _pool(pool: nn.Module, path: str) -> list:
    from timm.layers import SelectAdaptivePool2d

    _check_forward(pool, SelectAdaptivePool2d, path)
    if pool.is_identity():
        return []
    inner = pool.pool
    if type(inner) not in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d) or inner.output_size not in (1, (1, 1)):
        raise _unsupported(f"the global pooling {path} (pool_type {pool.pool_type!r})")
    out = [(path, copy_layer(inner))]
    if isinstance(pool.flatten, nn.Flatten):
        out.append((join(path, "flatten"), nn.Flatten(1)))
    return out


def _head(model: nn.Module, path: str) -> list:
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    head = model.head
    if isinstance(head, NormMlpClassifierHead):
        _check_forward(head, NormMlpClassifierHead, path)
        out = _pool(head.global_pool, join(path, "global_pool")) + _norm(head.norm, join(path, "norm"))
        if isinstance(head.flatten, nn.Flatten):
            out.append((join(path, "flatten"), nn.Flatten(1)))
        if not isinstance(head.pre_logits, _DROPPED):
            pre = head.pre_logits
            if type(pre) is not nn.Sequential or set(dict(pre.named_children())) != {"fc", "act"}:
                raise _unsupported(f"the pre-logits module {join(path, 'pre_logits')}")
            out += _linear(pre.fc, join(path, "pre_logits.fc")) + _act(pre.act, join(path, "pre_logits.act"))
    elif isinstance(head, ClassifierHead):
        _check_forward(head, ClassifierHead, path)
        out = _pool(head.global_pool, join(path, "global_pool"))
        if isinstance(head.flatten, nn.Flatten):
            out.append((join(path, "flatten"), nn.Flatten(1)))
    else:
        raise _unsupported(f"the head {path} ({type(head).__name__})")
    if not isinstance(head.fc, nn.Identity):
        out += _linear(head.fc, join(path, "fc"))
    return out


def _convnext(model: nn.Module, path: str) -> list:
    from timm.models.convnext import ConvNeXt, ConvNeXtStage

    _check_forward(model, ConvNeXt, path, ("forward", "forward_features", "forward_head"))
    out = _sequential(model.stem, join(path, "stem"))
    for i, stage in enumerate(model.stages):
        spath = join(path, f"stages.{i}")
        _check_forward(stage, ConvNeXtStage, spath)
        out += _sequential(stage.downsample, join(spath, "downsample"))
        for j, block in enumerate(stage.blocks):
            out += _block(block, join(spath, f"blocks.{j}"))
    out += _norm(model.norm_pre, join(path, "norm_pre"))
    return out + _head(model, join(path, "head"))


try:
    from timm.models.convnext import ConvNeXt as _ConvNeXt
except ImportError:  # pragma: no cover  (timm is optional for canonization)
    pass
else:
    register_family(Family(
        "timm-convnext", (_ConvNeXt,), {_ConvNeXt: _convnext},
        composite=preset_composite("EpsilonPlusFlat"), geometry=lambda model, chain=None: Geometry(),
        methods=GENERIC.methods))
