"""The layer a module path names, for the reference-sample scan: a module path (as in ``model.named_modules()``)
or a rule-table index, resolved to the step whose *output* is that module's output.

Canonization renames nothing: every layer of the chain keeps the path of the module it came from
(:attr:`lrpkit.walk.Visit.name`), and the layers a module became carry its path or paths below it. The output of
module ``P`` is therefore the output of the *last* layer, in the order in which the forward pass produces outputs
(:func:`lrpkit.walk.walk` with ``post_order=True``), whose name is ``P`` or starts with ``P.``, with one exception:
a container that carries the name ``P`` but also holds layers *not* under ``P`` wraps more than module ``P`` (timm's
ViT block ``blocks.0.mlp`` becomes ``SkipConnection([norm2, fc1, act, fc2])``, named ``blocks.0.mlp``: its output
is the residual stream, not the MLP's), so it does not count.

Examples, on the chains of the families:

- ``"blocks.5.mlp.fc1"`` (timm ViT): the hidden neurons of the MLP; ``"blocks.5.mlp"``: the MLP's output (fc2),
  ``"blocks.5.attn"``: the attention's output (after ``proj``); ``"blocks.5"``: the residual stream after the block;
- ``"layer1.0"`` (ResNet): the block's output after its last ReLU;
- ``"features.28"`` (VGG): the convolution (with a BatchNorm fused in, if there was one).

A module that canonization removed (a BatchNorm fused into the layer before it, Dropout, Identity) is an error
that names the layers that can be chosen.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from ..layers import Chain
from ..walk import Visit, walk

__all__ = ["LayerRef", "resolve_layer", "layer_names"]


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: ``index`` (the step's depth-first index, the rule table's ``index``), ``name`` (the
    module path of the chain layer, as the rule table shows it), ``path`` (its position in the chain, e.g.
    ``"5.inner.2"``), ``layer`` (the canonized module) and ``asked`` (what the caller wrote)."""

    index: int
    name: str
    path: str
    layer: nn.Module
    asked: object = None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _wraps_more(visit: Visit, prefix: str) -> bool:
    """A container named exactly ``prefix`` that also holds layers not under ``prefix``."""
    if not visit.is_container or visit.name != prefix:
        return False
    return any(not _under(v.name, prefix) for branch in visit.branches for v in walk(branch))


def layer_names(chain: Chain) -> list[str]:
    """The module paths of the chain's layers (each once, in rule-table order): what ``layer=`` accepts, besides any
    module that contains them (``"blocks.5"``) and the rule-table indices."""
    seen: dict[str, None] = {}
    for v in walk(chain):
        if v.name:
            seen.setdefault(v.name, None)
    return list(seen)


def _unknown(chain: Chain, layer: str) -> ValueError:
    names = layer_names(chain)
    like = difflib.get_close_matches(layer, names, n=3)
    hint = f" (did you mean {', '.join(map(repr, like))}?)" if like else ""
    shown = ", ".join(names[:60]) + (f", ... ({len(names) - 60} more)" if len(names) > 60 else "")
    return ValueError(
        f"no layer {layer!r} in the canonized model{hint}: canonization fuses each BatchNorm into the layer before "
        f"it and drops Dropout and Identity, so those cannot be chosen. Layers that can be chosen: {shown}; or any "
        f"module that contains them, or a rule-table index (print lrp.table())")


def resolve_layer(chain: Chain, layer) -> LayerRef:
    """The step whose output is the output of ``layer``: a module path of the original model (see the module
    docstring) or an int, the rule table's ``index``. Raises ``ValueError`` for an unknown name or index (naming
    the layers that can be chosen) and ``TypeError`` for anything else."""
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be a module path (str) or a rule-table index (int), got {type(layer).__name__}")
    if isinstance(layer, int):
        visits = list(walk(chain))
        if not 0 <= layer < len(visits):
            raise ValueError(f"layer index {layer} is out of range: the rule table has indices 0..{len(visits) - 1} "
                             f"(print lrp.table())")
        v = visits[layer]
        return LayerRef(v.index, v.name, v.path, v.layer, layer)
    found = [v for v in walk(chain, post_order=True) if _under(v.name, layer) and not _wraps_more(v, layer)]
    if not layer or not found:
        raise _unknown(chain, layer)
    v = found[-1]
    return LayerRef(v.index, v.name, v.path, v.layer, layer)
