"""The ``timm-efficientnet`` family: timm's ``EfficientNet`` (``efficientnet_b0..b3``, ``tf_efficientnet_*``) and
``MobileNetV3`` (``mobilenetv3_small_100``, ``mobilenetv3_large_100``, ...), canonized; default composite
EpsilonPlusFlat; no patch geometry.

The chain::

    Conv2d | SamePadConv2d        conv_stem with bn1's BatchNorm fused in
    act                           bn1's activation (BatchNormAct2d holds it: SiLU, Hardswish, ReLU, ReLU6)
    per block (blocks.i.j), one of
      DepthwiseSeparableConv:     conv_dw, act, [SE], conv_pw [, act]
      InvertedResidual:           conv_pw, act, conv_dw, act, [SE], conv_pwl
      EdgeResidual:               conv_exp, act, [SE], conv_pwl
      ConvBnAct:                  conv, act
    wrapped in SkipConnection(...) where the block adds its input back (``has_skip``; drop path is the identity
    in eval mode); every BatchNorm is fused into the convolution before it, every activation is its own layer
    SE = Multiply(Chain([]), Chain([AdaptiveAvgPool2d(1), conv_reduce, act1, conv_expand, gate]))
    EfficientNet:  conv_head, act (bn2), AdaptiveAvgPool2d(1), Flatten, Linear (classifier)
    MobileNetV3:   AdaptiveAvgPool2d(1), conv_head, act2, Flatten, Linear (global pooling BEFORE conv_head)

The squeeze-excitation block ``x ⊙ gate(conv_expand(act(conv_reduce(mean_hw(x)))))`` is a
:class:`~lrpkit.layers.Multiply` whose signal branch is the identity; its rule, :class:`~lrpkit.rules.ProductRule`,
holds the gate constant in its default ``gate`` mode (``R_x = R``). The gates are ``nn.Sigmoid`` (EfficientNet),
``nn.Hardsigmoid`` (MobileNetV3) or timm's own ``Sigmoid`` / ``HardSigmoid``; all element-wise activations,
nn's and timm's (``Swish``, ``HardSwish``, ...), pass the relevance unchanged (PassRule).

TensorFlow 'SAME' padding (``tf_*`` models: timm's ``Conv2dSame``, which pads by an amount that depends on the
input size, asymmetrically when it is odd) becomes :class:`SamePadConv2d`: a ``Conv2d`` that zero-pads exactly as
timm does, per call, then convolves with padding 0. Like ``nn.Conv2d(padding=p)`` it is one linear layer whose
padded border is a constant, not an input: no rule can give that border relevance (the rules differentiate
through the padding, which crops; the flat and z^B rules count only real inputs, as on any padded convolution), so
nothing is dropped there and conservation is unchanged. Static 'same' padding (stride 1, odd kernel) is already a
symmetric ``nn.Conv2d`` in timm.

Supported exactly: the blocks above with timm's ``SqueezeExcite``, ``BatchNormAct2d`` (its ``drop`` member
Identity / Dropout / DropBlock, identities in eval mode), ``Conv2dSame`` / ``Conv2dSameExport`` / ``nn.Conv2d``
convolutions (grouped and depthwise included), space-to-depth stems (``s2d``), drop path, ``SelectAdaptivePool2d``
'avg' / 'fast' / 'max' / '' (NCHW), MobileNetV3's ``head_norm``, and a ``Linear`` (timm's or nn's) or no
classifier. Anything else (CondConv, MixedConv, anti-aliasing, GroupNorm/EvoNorm norm-acts, other attention
modules, 'avgmax' / 'catavgmax' pooling, a subclass that overrides a forward method, ...) is a
:class:`~lrpkit.canonize.CanonizationError`, never a silently different model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..canonize.core import CanonizationError, copy_layer, flatten, join, make_chain, overridden
from ..layers import Chain, Multiply, SkipConnection
from . import GENERIC, Family, Geometry, preset_composite, register_family


class SamePadConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's 'SAME' zero padding, computed per call from the input size as timm's
    ``pad_same`` does: along each spatial dimension of size ``n``,
    ``pad = max((ceil(n / s) - 1)·s + (k - 1)·d + 1 - n, 0)``, ``pad // 2`` before and the rest after; then the
    convolution with padding 0. The output has ``ceil(n / s)`` positions.

    A linear layer like any ``nn.Conv2d``: every rule for convolutions applies, and none can give the padded border
    relevance, since the border is a constant of the layer, not an input (the rules' vector-Jacobian products go
    through the padding, which crops)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None):
        if padding not in (0, (0, 0)):
            raise ValueError(f"SamePadConv2d computes its padding; got padding={padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)

    def same_padding(self, size) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` for an input of spatial ``size`` (h, w), as for ``F.pad``."""
        pads = []
        for n, k, s, d in zip(size, self.kernel_size, self.stride, self.dilation):
            pad = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((pad // 2, pad - pad // 2))
        (top, bottom), (left, right) = pads
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.same_padding(x.shape[-2:]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _unsupported(module, path: str, what: str) -> CanonizationError:
    where = f" ({path})" if path else ""
    return CanonizationError(
        f"lrpkit cannot canonize this {type(module).__name__}{where}: {what} is not supported. Supported: timm's "
        f"EfficientNet / MobileNetV3 with DepthwiseSeparableConv, InvertedResidual, EdgeResidual and ConvBnAct "
        f"blocks, SqueezeExcite, BatchNormAct2d, same-padding convolutions, 'avg' pooling (see "
        f"lrpkit.families.timm_efficientnet)")


def _is_identity_in_eval(m) -> bool:
    """Identity, Dropout and timm's DropPath / DropBlock2d: all compute the identity in eval mode."""
    from timm.layers import DropBlock2d, DropPath

    return m is None or isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d, DropPath, DropBlock2d))


def _check_forward(module, base, path: str, methods=("forward",)) -> None:
    """Refuse a subclass of ``base`` that overrides a method of its forward pass (e.g. timm's CondConvResidual)."""
    name = overridden(module, base, methods)
    if name is not None:
        raise _unsupported(module, path, f"a subclass of {base.__name__} that overrides {name}()")


# -- layers ------------------------------------------------------------------------------------------------------

def _conv(conv, path):
    """timm's ``create_conv2d`` results: ``nn.Conv2d`` (copied), ``Conv2dSame`` / ``Conv2dSameExport`` (to
    :class:`SamePadConv2d`; the export variant caches the padding of the first input size, lrpkit computes it per
    call)."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    if isinstance(conv, (Conv2dSame, Conv2dSameExport)):
        if type(conv) not in (Conv2dSame, Conv2dSameExport) or conv.padding_mode != "zeros":
            raise _unsupported(conv, path, "a subclass of Conv2dSame or a padding mode other than zeros")
        new = SamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                            conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return [(path, copy_layer(new))]
    return [(path, copy_layer(conv))]


def _norm_act(norm, path):
    """``BatchNormAct2d`` = BatchNorm2d, then ``drop`` (identity in eval mode), then ``act``: a plain BatchNorm2d
    (fused into the convolution before it by make_chain) and the activation as its own layer."""
    from timm.layers import BatchNormAct2d

    _check_forward(norm, BatchNormAct2d, path)
    ref = next((t for t in (norm.weight, norm.running_mean) if t is not None), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    bn = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                        **factory)
    own = {k: v for k, v in norm.state_dict().items() if "." not in k}
    bn.load_state_dict(own)
    entries = [(path, copy_layer(bn))]
    if not _is_identity_in_eval(norm.drop):
        raise _unsupported(norm, path, f"the drop layer {type(norm.drop).__name__}")
    return entries + flatten(norm.act, join(path, "act"))


def _squeeze_excite(se, path):
    """``x * gate(conv_expand(act1(conv_reduce(x.mean((2, 3), keepdim=True)))))`` as
    ``Multiply(Chain([]), Chain([AdaptiveAvgPool2d(1), conv_reduce, act1, conv_expand, gate]))``."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    _check_forward(se, SqueezeExcite, path)
    gate = ([(join(path, "pool"), nn.AdaptiveAvgPool2d(1))] + _conv(se.conv_reduce, join(path, "conv_reduce"))
            + flatten(se.act1, join(path, "act1")) + _conv(se.conv_expand, join(path, "conv_expand"))
            + flatten(se.gate, join(path, "gate")))
    return [(path, Multiply(Chain([], []), make_chain(gate)))]


def _pool(pool, path):
    """timm's ``SelectAdaptivePool2d``: 'avg' / 'fast' (a mean over H, W) -> ``AdaptiveAvgPool2d(1)``, 'max' ->
    ``AdaptiveMaxPool2d(1)``, '' -> nothing; then its Flatten, if any."""
    from timm.layers import SelectAdaptivePool2d
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool

    if not isinstance(pool, SelectAdaptivePool2d):
        return flatten(pool, path)
    _check_forward(pool, SelectAdaptivePool2d, path)
    inner = pool.pool
    if isinstance(inner, nn.Identity):
        entries = []
    elif type(inner) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        entries = [(path, copy_layer(inner))]
    elif type(inner) is FastAdaptiveAvgPool and tuple(inner.dim) == (2, 3):
        entries = [(path, nn.AdaptiveAvgPool2d(1))] + ([(join(path, "flatten"), nn.Flatten(1))] if inner.flatten
                                                         else [])
    else:
        raise _unsupported(pool, path, f"global pooling {pool.pool_type!r} ({type(inner).__name__})")
    return entries + flatten(pool.flatten, join(path, "flatten"))


def _linear(head, path):
    """The classifier: timm's ``Linear`` (an ``nn.Linear`` subclass) becomes an ``nn.Linear``; Identity nothing."""
    if _is_identity_in_eval(head):
        return []
    if type(head) is not nn.Linear and isinstance(head, nn.Linear):
        from timm.layers import Linear

        if type(head) is not Linear:
            raise _unsupported(head, path, f"the classifier type {type(head).__name__}")
        new = nn.Linear(head.in_features, head.out_features, head.bias is not None, device=head.weight.device,
                        dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            if head.bias is not None:
                new.bias.copy_(head.bias)
        return [(path, copy_layer(new))]
    return flatten(head, path)


# -- blocks ------------------------------------------------------------------------------------------------------

def _parts(block, path, names):
    """The block's sub-modules ``names`` in order, canonized; identities (no SE, no anti-aliasing) dropped."""
    entries = []
    for name in names:
        part = getattr(block, name, None)
        if _is_identity_in_eval(part):
            continue
        if name == "aa":
            raise _unsupported(block, path, f"anti-aliasing ({type(part).__name__})")
        entries += flatten(part, join(path, name))
    return entries


def _residual(block, path, entries):
    """``x + f(x)`` where the block has a skip (``has_skip``; drop path is the identity in eval mode)."""
    if block.has_skip:
        return [(path, SkipConnection(make_chain(entries)))]
    return entries


def _block(base_name, names):
    def canonize_block(block, path):
        from timm.models import _efficientnet_blocks as blocks

        _check_forward(block, getattr(blocks, base_name), path)
        return _residual(block, path, _parts(block, path, names))
    canonize_block.__name__ = f"canonize_{base_name}"
    return canonize_block


def _unsupported_block(block, path):
    raise _unsupported(block, path, f"the block type {type(block).__name__}")


# -- models ------------------------------------------------------------------------------------------------------

def canonize_efficientnet(model, path=""):
    """``conv_stem, bn1, blocks, conv_head, bn2, global_pool, classifier`` (timm's EfficientNet.forward)."""
    from timm.models.efficientnet import EfficientNet

    _check_forward(model, EfficientNet, path, ("forward", "forward_features", "forward_head"))
    entries = []
    for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
        entries += flatten(getattr(model, name), join(path, name))
    return entries + _pool(model.global_pool, join(path, "global_pool")) + _linear(model.classifier,
                                                                                   join(path, "classifier"))


def canonize_mobilenetv3(model, path=""):
    """``conv_stem, bn1, blocks, global_pool, conv_head, norm_head, act2, flatten, classifier`` (timm's
    MobileNetV3.forward: the global pooling comes before the head convolution)."""
    from timm.models.mobilenetv3 import MobileNetV3

    _check_forward(model, MobileNetV3, path, ("forward", "forward_features", "forward_head"))
    entries = []
    for name in ("conv_stem", "bn1", "blocks"):
        entries += flatten(getattr(model, name), join(path, name))
    entries += _pool(model.global_pool, join(path, "global_pool"))
    for name in ("conv_head", "norm_head", "act2", "flatten"):
        entries += flatten(getattr(model, name), join(path, name))
    return entries + _linear(model.classifier, join(path, "classifier"))


try:
    from timm.layers import BatchNormAct2d, SelectAdaptivePool2d  # noqa: F401
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.models import _efficientnet_blocks as _blocks
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
except ImportError:  # pragma: no cover  (timm is a core dependency)
    pass
else:
    register_family(Family(
        "timm-efficientnet", (EfficientNet, MobileNetV3),
        {EfficientNet: canonize_efficientnet, MobileNetV3: canonize_mobilenetv3,
         _blocks.DepthwiseSeparableConv: _block("DepthwiseSeparableConv", (
             "conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2")),
         _blocks.InvertedResidual: _block("InvertedResidual", (
             "conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3")),
         _blocks.EdgeResidual: _block("EdgeResidual", ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2")),
         _blocks.ConvBnAct: _block("ConvBnAct", ("conv", "bn1", "aa")),
         _blocks.CondConvResidual: _unsupported_block,
         _blocks.SqueezeExcite: _squeeze_excite,
         BatchNormAct2d: _norm_act,
         Conv2dSame: _conv, Conv2dSameExport: _conv},
        composite=preset_composite("EpsilonPlusFlat"), geometry=lambda model, chain=None: Geometry(),
        methods=GENERIC.methods))
