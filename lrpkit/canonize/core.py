"""The generic part of canonization: dispatch, flattening, BatchNorm fusion and the checks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..layers import Chain
from ..registry import Canonizer, canonizer_for as _canonizer_for, is_registered, register_canonizer  # noqa: F401

DROPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SOFTMAXES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)


class CanonizationError(TypeError):
    """The model contains something canonization cannot turn into explicit layers."""


def copy_layer(layer: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``layer`` without hooks."""
    new = copy.deepcopy(layer)
    for m in new.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
        if hasattr(m, "_backward_pre_hooks"):
            m._backward_pre_hooks.clear()
        m.training = False
        if getattr(m, "inplace", False) is True:
            m.inplace = False  # an in-place activation would overwrite the recorded output of the layer before
    for p in new.parameters():
        p.requires_grad_(False)
    return new


def overridden(module: nn.Module, base: type, methods=("forward",)) -> str | None:
    """The first of ``methods`` that ``module``'s class defines otherwise than ``base`` (a subclass that computes
    something else than the class a canonizer knows), or None. Canonizers refuse such a module."""
    return next((name for name in methods if getattr(type(module), name, None) is not getattr(base, name, None)),
                None)


def join(path: str, name: str) -> str:
    """The dotted module path of child ``name`` under ``path`` (``join("", "fc")`` is ``"fc"``,
    ``join("blocks.0", "fc")`` is ``"blocks.0.fc"``): the names the chain and ``NameMap`` use."""
    return f"{path}.{name}" if path else name


def flatten(module: nn.Module, path: str = "") -> list:
    """The flat list of ``(name, layer)`` that computes ``module``: nested Sequentials are flattened, registered
    model types go through their canonizer, leaf modules are copied."""
    fn = _canonizer_for(module)
    if fn is not None:
        return fn(module, path)
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += flatten(child, join(path, name))
        return out
    return [(path, copy_layer(module))]


def _fusable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` normalises ``layer``'s output features: a Linear/Conv with as many outputs as ``bn`` has
    features (a BatchNorm1d after a Linear on (B, L, C) tokens normalises dim 1, L, and stays its own layer)."""
    if not isinstance(layer, FUSABLE):
        return False
    return bn.num_features == (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _check_features_last(module: nn.Module, args) -> None:
    """Forward pre-hook of a Linear with a BatchNorm1d fused in: the fusion is exact on (B, C) input only."""
    x = args[0]
    if x.ndim != 2:
        raise CanonizationError(
            f"a BatchNorm1d was fused into the Linear before it ({module._lrpkit_fused_bn}), which is exact for "
            f"(B, C) input only; this input has shape {tuple(x.shape)}, on which BatchNorm1d normalises dim 1, "
            f"not the Linear's {module.out_features} output features. lrpkit cannot canonize this block; "
            f"register a canonizer for it (lrpkit.register_canonizer)")


def fuse_batchnorm(layer: nn.Module, bn: nn.Module, bn_name: str = "") -> nn.Module:
    """``BN(layer(x)) = layer'(x)`` with ``W' = W·γ/√(var+eps)``, ``b' = (b − μ)·γ/√(var+eps) + β``
    (the BatchNorm's running statistics and its own eps). A Linear with a BatchNorm1d fused in refuses input
    that is not (B, C): there the BatchNorm normalised dim 1, not the Linear's features."""
    if bn.running_mean is None:
        raise CanonizationError(f"cannot fuse {type(bn).__name__} without running statistics "
                                f"(track_running_stats=False) into the preceding layer")
    scale = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    shift = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
    factor = scale / torch.sqrt(bn.running_var + bn.eps)
    fused = copy_layer(layer)
    w = fused.weight.detach()
    fused.weight = nn.Parameter(w * factor.view(-1, *([1] * (w.ndim - 1))), requires_grad=False)
    b = fused.bias.detach() if fused.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((b - bn.running_mean) * factor + shift, requires_grad=False)
    if isinstance(layer, nn.Linear):
        fused._lrpkit_fused_bn = f"{type(bn).__name__} '{bn_name}'" if bn_name else type(bn).__name__
        fused.register_forward_pre_hook(_check_features_last)
    return fused


def simplify(entries: list) -> list:
    """Drop Dropout/Identity and fuse each BatchNorm into a directly preceding Linear/Conv."""
    out = []
    for name, layer in entries:
        if isinstance(layer, DROPPED):
            continue
        if isinstance(layer, BATCHNORMS) and out and _fusable(out[-1][1], layer):
            prev_name, prev = out.pop()
            out.append((prev_name, fuse_batchnorm(prev, layer, name)))
            continue
        out.append((name, layer))
    return out


def make_chain(entries: list) -> Chain:
    """A :class:`~lrpkit.layers.Chain` of the ``(name, layer)`` entries after :func:`simplify` (Dropout/Identity
    dropped, BatchNorm fused); canonizers use it for the inside of a ``SkipConnection`` or ``Sum``."""
    entries = simplify(entries)
    return Chain([layer for _, layer in entries], [name for name, _ in entries])


def _unsupported(chain: Chain) -> list[str]:
    from ..walk import walk

    return [f"  {v.name or '<model>'}: {type(v.layer).__module__}.{type(v.layer).__qualname__}"
            for v in walk(chain) if not v.is_container and not is_registered(v.layer)]


def canonize(model: nn.Module, strip_softmax: bool = False) -> Chain:
    """Canonize ``model`` into a flat :class:`~lrpkit.layers.Chain` of explicit layers in eval mode.

    The result is a new module with frozen copies of the parameters; ``model`` (its weights, hooks, training
    flag and ``requires_grad``) is left untouched. ``strip_softmax=True`` drops a final Softmax/LogSoftmax, which
    LRP must not explain through. Raises :class:`CanonizationError` listing every layer no rule is registered
    for.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"canonize needs a torch.nn.Module, got {type(model).__name__}")
    chain = copy_layer(model) if isinstance(model, Chain) else make_chain(flatten(model))
    if len(chain) and isinstance(chain[len(chain) - 1], SOFTMAXES):
        if not strip_softmax:
            raise CanonizationError(
                f"the model ends in {type(chain[len(chain) - 1]).__name__}: LRP explains the logits, not the "
                f"probabilities. Pass strip_softmax=True (to canonize / LRP / analyze) to drop it.")
        chain = Chain(list(chain.layers)[:-1], chain.names[:-1])
    bad = _unsupported(chain)
    if bad:
        raise CanonizationError(
            "no LRP rule is known for these layers:\n" + "\n".join(bad) +
            "\nIf a layer is a container whose forward is a sequence, make it an nn.Sequential or teach lrpkit "
            "its structure with lrpkit.canonize.register_canonizer(Type, fn). For a custom leaf layer, register "
            "a rule for it: lrpkit.register_rule(Type, rule), e.g. lrpkit.register_rule(MyLayer, "
            "lrpkit.rules.EpsilonRule()).")
    return chain.eval()  # the containers built above (Chain, SkipConnection, Sum) too, not only the copied leaves
