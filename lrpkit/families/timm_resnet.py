"""The ``timm-resnet`` family: timm's ``ResNet`` (``timm.models.resnet``: ResNet-18/34/50/101/..., the ``d`` / ``t``
/ ``s`` variants with a deep stem and average-pool downsampling, SE-ResNet(X)t, ECA-ResNet, ResNeXt, Wide ResNet, the
anti-aliased ``resnetaa`` / ``resnetblur`` models, ResNet-RS), canonized; default composite EpsilonPlusFlat; no patch
geometry.

The chain (one entry per line)::

    Conv2d [, ReLU, Conv2d, ReLU, Conv2d]    conv1: 7x7, or the deep stem's three 3x3 (BatchNorms fused)
    ReLU                                     act1 (bn1 fused into the conv before it)
    MaxPool2d | AvgPool2d | Chain           maxpool: max pool, anti-aliased (max pool + blur, or avg pool), or the
                                             replaced stem pool (conv, [blur], ReLU)
    SkipConnection(f) | Sum(f, shortcut)     per block: f = conv1, act1, [aa], conv2 [, act2, [aa], conv3]
                                             [, Multiply(Chain(), gate)], the BatchNorms fused; shortcut = [AvgPool2d,]
                                             Conv2d (downsample, its BatchNorm fused)
    ReLU                                     per block: the activation after the addition
    AdaptiveAvgPool2d(1) | AdaptiveMaxPool2d(1), Flatten      global_pool 'avg' | 'max'
    Linear                                   fc

The attention modules become products whose gate branch is a chain: SE ``x ⊙ gate(fc2(act(bn(fc1(mean(x))))))``
is ``Multiply(Chain([]), Chain([AdaptiveAvgPool2d(1), Conv2d, act, Conv2d, gate]))``; ECA ``x ⊙ gate(conv1d(mean(x)
as a sequence over the channels))`` is ``Multiply(Chain([]), Chain([AdaptiveAvgPool2d(1), Flatten, Unflatten(1, (1,
C)), Conv1d [, act, Conv1d], gate, Flatten, Unflatten(1, (C, 1, 1))]))``: the reshapes are the same view timm takes,
so the Conv1d is timm's own. Anti-aliasing: an ``AvgPool2d`` is kept; timm's ``BlurPool2d`` (pad, then a depthwise
convolution with a fixed binomial filter) is the equal depthwise ``Conv2d`` with the same ``padding_mode``.

Drop path, DropBlock and dropout are the identity in eval mode and are left out. Supported exactly: ``BasicBlock``
and ``Bottleneck`` with BatchNorm norms, any element-wise activation, ``attn_layer`` 'se' (``SEModule`` without
``add_maxpool``) and 'eca' / 'ecam' (``EcaModule``), ``aa_layer`` ``nn.AvgPool2d`` or ``BlurPool2d``, any stem
(``stem_type`` '', 'deep', 'deep_tiered', ``replace_stem_pool``), ``global_pool`` 'avg' / 'max', a Linear ``fc`` or
none (``num_classes=0``). Anything else (other blocks, norms such as GroupNorm, other attention modules, other pools,
a subclass that overrides the forward methods, ...) is a :class:`~lrpkit.canonize.CanonizationError` naming it,
never a silently different model.
"""

from __future__ import annotations

from torch import nn

from ..canonize.core import CanonizationError, copy_layer, join, make_chain, overridden
from ..layers import Chain, Multiply, SkipConnection, Sum
from . import GENERIC, Family, Geometry, preset_composite, register_family

_FORWARD_METHODS = ("forward", "forward_features", "forward_head")
_NORMS = (nn.BatchNorm2d,)


def _unsupported(what: str) -> CanonizationError:
    return CanonizationError(
        f"lrpkit cannot canonize this timm ResNet: {what} is not supported. Supported: BasicBlock / Bottleneck "
        f"with BatchNorm, attn_layer 'se' / 'eca', aa_layer AvgPool2d / BlurPool2d, global_pool 'avg' / 'max'.")


def _absent(m) -> bool:
    """Whether ``m`` computes the identity in eval mode (None, Identity, Dropout, timm's DropPath / DropBlock2d)."""
    from timm.layers import DropBlock2d, DropPath

    return m is None or isinstance(m, (nn.Identity, nn.Dropout, DropPath, DropBlock2d))


def _check_forward(module, base: type, what: str) -> None:
    """Refuse a subclass of ``base`` that changes one of its forward methods."""
    if not isinstance(module, base):
        raise _unsupported(f"{what} ({type(module).__name__})")
    name = overridden(module, base, _FORWARD_METHODS)
    if name is not None:
        raise _unsupported(f"a subclass of {base.__name__} that overrides {name}() ({what})")


def _blur(pool, path: str) -> list:
    """timm's ``BlurPool2d``, ``conv2d(pad(x, p, pad_mode), filt, stride, groups=C)``, as a depthwise ``Conv2d``
    with ``padding=p`` and ``padding_mode=pad_mode``."""
    if pool.channels is None:
        raise _unsupported(f"a BlurPool2d without channels ({path})")
    if len(set(pool.padding)) != 1:
        raise _unsupported(f"a BlurPool2d with asymmetric padding {pool.padding} ({path})")
    mode = {"constant": "zeros"}.get(pool.pad_mode, pool.pad_mode)
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        raise _unsupported(f"a BlurPool2d with pad_mode {pool.pad_mode!r} ({path})")
    conv = nn.Conv2d(pool.channels, pool.channels, pool.filt_size, stride=pool.stride, padding=pool.padding[0],
                     padding_mode=mode, groups=pool.channels, bias=False, device=pool.filt.device,
                     dtype=pool.filt.dtype)
    conv.weight = nn.Parameter(pool.filt.detach().clone(), requires_grad=False)
    return [(path, conv.eval())]


def _part(m, path: str) -> list:
    """One part of a block, the stem or a shortcut: convolutions, BatchNorms, activations, pools, anti-aliasing,
    nested Sequentials; the eval-mode identities left out."""
    from timm.layers import BlurPool2d

    if _absent(m):
        return []
    if isinstance(m, nn.Sequential):
        out = []
        for name, child in m.named_children():
            out += _part(child, join(path, name))
        return out
    if isinstance(m, BlurPool2d):
        return _blur(m, path)
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and type(m) not in _NORMS:
        # BatchNormAct2d too: a BatchNorm2d subclass that applies an activation of its own
        raise _unsupported(f"the norm layer {type(m).__name__} ({path})")
    return [(path, copy_layer(m))]


def _se(se, path: str, channels: int) -> list:
    """The attention module as ``Multiply(Chain([]), gate branch)``."""
    from timm.layers import EcaModule, SEModule

    if _absent(se):
        return []
    if type(se) is SEModule:
        if se.add_maxpool:
            raise _unsupported(f"SEModule with add_maxpool ({path})")
        gate = ([(join(path, "pool"), nn.AdaptiveAvgPool2d(1))] + _part(se.fc1, join(path, "fc1"))
                + _part(se.bn, join(path, "bn")) + _part(se.act, join(path, "act")) + _part(se.fc2, join(path, "fc2"))
                + _part(se.gate, join(path, "gate")))
    elif type(se) is EcaModule:
        convs = _part(se.conv, join(path, "conv"))
        if se.conv2 is not None:
            convs += _part(se.act, join(path, "act")) + _part(se.conv2, join(path, "conv2"))
        gate = ([(join(path, "pool"), nn.AdaptiveAvgPool2d(1)), (join(path, "view"), nn.Flatten(1)),
                 (join(path, "view"), nn.Unflatten(1, (1, channels)))] + convs + _part(se.gate, join(path, "gate"))
                + [(join(path, "view"), nn.Flatten(1)), (join(path, "view"), nn.Unflatten(1, (channels, 1, 1)))])
    else:
        raise _unsupported(f"the attention module {type(se).__name__} ({path})")
    return [(path, Multiply(Chain([]), make_chain(gate)))]


def _block(block, path: str) -> list:
    """``act(se(f(x)) + shortcut(x))`` as ``SkipConnection(f)`` or ``Sum(f, downsample)``, then the activation."""
    from timm.models.resnet import BasicBlock, Bottleneck

    _check_forward(block, Bottleneck if isinstance(block, Bottleneck) else BasicBlock, f"the block {path}")
    if isinstance(block, Bottleneck):
        order = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3")
        last, out_act = block.conv3, "act3"
    else:
        order = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2")
        last, out_act = block.conv2, "act2"
    inner = []
    for name in order:
        inner += _part(getattr(block, name), join(path, name))
    inner += _se(block.se, join(path, "se"), last.out_channels)
    if block.downsample is None:
        merged = SkipConnection(make_chain(inner))
    else:
        merged = Sum(make_chain(inner), make_chain(_part(block.downsample, join(path, "downsample"))))
    return [(path, merged)] + _part(getattr(block, out_act), join(path, out_act))


def _head(model, path: str) -> list:
    from timm.layers import SelectAdaptivePool2d

    pool = model.global_pool
    if not isinstance(pool, SelectAdaptivePool2d) or type(pool).forward is not SelectAdaptivePool2d.forward:
        raise _unsupported(f"the global pool {type(pool).__name__}")
    if pool.pool_type not in ("avg", "max") or getattr(pool.pool, "input_fmt", "NCHW") != "NCHW":
        raise _unsupported(f"global_pool={pool.pool_type!r}")
    if not isinstance(pool.flatten, nn.Flatten):
        raise _unsupported("a global pool without flatten")
    layer = nn.AdaptiveAvgPool2d(1) if pool.pool_type == "avg" else nn.AdaptiveMaxPool2d(1)
    entries = [(join(path, "global_pool"), layer), (join(path, "global_pool.flatten"), nn.Flatten(1))]
    if not _absent(model.fc):
        if not isinstance(model.fc, nn.Linear) or type(model.fc).forward not in (nn.Linear.forward, _timm_linear()):
            raise _unsupported(f"the classifier {type(model.fc).__name__}")
        entries += _part(model.fc, join(path, "fc"))
    return entries


def _timm_linear():
    from timm.layers import Linear

    return Linear.forward


def canonize_resnet(model, path: str = "") -> list:
    """The flat chain of a timm ResNet (see the module docstring)."""
    from timm.models.resnet import ResNet

    _check_forward(model, ResNet, "the model")
    entries = []
    for name in ("conv1", "bn1", "act1", "maxpool"):
        entries += _part(getattr(model, name), join(path, name))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for name, block in getattr(model, stage).named_children():
            entries += _block(block, join(path, f"{stage}.{name}"))
    entries += _head(model, path)
    for _, layer in entries:
        layer.eval()
    return entries


try:
    from timm.models.resnet import ResNet
except ImportError:  # pragma: no cover
    pass
else:
    register_family(Family("timm-resnet", (ResNet,), {ResNet: canonize_resnet},
                           composite=preset_composite("EpsilonPlusFlat"),
                           geometry=lambda model, chain=None: Geometry(), methods=GENERIC.methods))
