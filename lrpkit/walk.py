"""The one walker over a canonized chain: every layer depth-first, with its path and its place in the containers.

A container (:class:`~lrpkit.layers.SkipConnection`, :class:`~lrpkit.layers.Sum`) has branches, each a
:class:`~lrpkit.layers.Chain`; everything else is a leaf. :func:`walk` lists the layers (containers before their
contents, or after them with ``post_order=True``: the order in which outputs are produced); :func:`run` evaluates a
chain with a hook on every leaf and every layer's output. The composites, canonization, the analyzer and the
methods all see the chain through these two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .layers import Chain, Container, SkipConnection


@dataclass(frozen=True)
class Visit:
    """One layer as the walk meets it.

    ``index``: depth-first position (containers before their contents; the numbering of rule tables and
    composites); ``path``: position in the chain (``"5.inner.2"``); ``name``: module path in the original model;
    ``parent``: the index of the enclosing container (None at the top) and ``branch`` the branch of it; ``depth``:
    0 at the top; ``branches``: a container's branches, ``()`` for a leaf.
    """

    index: int
    path: str
    name: str
    layer: nn.Module
    depth: int = 0
    parent: int | None = None
    branch: int = 0
    branches: tuple = ()

    @property
    def is_container(self) -> bool:
        return bool(self.branches)


def branches_of(layer: nn.Module) -> tuple[Chain, ...]:
    """A :class:`~lrpkit.layers.Container`'s branches (``(inner,)`` for a SkipConnection), ``()`` for any other
    layer."""
    return layer.chains() if isinstance(layer, Container) else ()


def walk(chain: Chain, post_order: bool = False) -> Iterator[Visit]:
    """Every layer of ``chain``, depth-first; ``index`` always counts containers before their contents."""
    counter = iter(range(1 << 62))

    def visit(ch: Chain, prefix: str, depth: int, parent: int | None, branch: int):
        for i, (name, layer) in enumerate(zip(ch.names, ch)):
            branches = branches_of(layer)
            v = Visit(next(counter), f"{prefix}{i}", name, layer, depth, parent, branch, branches)
            if not post_order:
                yield v
            label = "inner" if isinstance(layer, SkipConnection) else "branch"
            for b, sub in enumerate(branches):
                tag = label if label == "inner" else f"{label}{b}"
                yield from visit(sub, f"{v.path}.{tag}.", depth + 1, v.index, b)
            if post_order:
                yield v

    yield from visit(chain, "", 0, None, 0)


def run(chain: Chain, x: torch.Tensor, call: Callable | None = None, seen: Callable | None = None) -> torch.Tensor:
    """``chain(x)``: a container as ``merge(x, [run(branch, x) ...])``, a leaf as ``call(layer, x)`` (default
    ``layer(x)``); ``seen(layer, input, output)`` after every layer, containers included."""
    for layer in chain:
        branches = branches_of(layer)
        if branches:
            y = layer.merge(x, [run(branch, x, call, seen) for branch in branches])
        else:
            y = call(layer, x) if call is not None else layer(x)
        if seen is not None:
            seen(layer, x, y)
        x = y
    return x
