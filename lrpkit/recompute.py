"""Tensors kept as recipes: memory work behind one seam, for rules whose recording pass keeps an autograd graph
(Chefer et al. 2021's rules, :mod:`lrpkit.rules.chefer`).

A tensor of the recording pass that a rule can recompute bitwise from what its record keeps anyway (a Linear
layer's output ``zn + b`` from ``zn``; the per-head copies that the attention products work on) is marked with a
:class:`Recipe` (:func:`recomputable`). Records keep the recipe instead of the tensor (:func:`to_keep`), and within
:func:`saving_recipes` the autograd graph saves the recipe instead of the tensor, so that neither holds a second
copy of what the record already holds. :func:`value_of` gives the tensor back (the recipe evaluated, without a
graph: the same operations on the same values, so the same numbers).
"""

from __future__ import annotations

import torch

__all__ = ["Recipe", "recomputable", "to_keep", "value_of", "saving_recipes"]

_RECIPE = "_lrpkit_recipe"  # the attribute of a marked tensor that holds its recipe


class Recipe:
    """``fn(*args)`` without a graph, bitwise equal to the tensor it stands for (the same operations on the same
    values). Callable, so that a :class:`~lrpkit.propagate.Record` evaluates it when its input is first read."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(*self.args)


def recomputable(t: torch.Tensor, fn, *args) -> torch.Tensor:
    """Mark ``t`` as ``fn(*args)`` (see :class:`Recipe`); returns ``t``."""
    setattr(t, _RECIPE, Recipe(fn, *args))
    return t


def to_keep(t: torch.Tensor):
    """What a record keeps of ``t``: its recipe if it has one, else ``t`` detached."""
    recipe = getattr(t, _RECIPE, None)
    return recipe if recipe is not None else t.detach()


def value_of(kept) -> torch.Tensor:
    """The tensor that :func:`to_keep` (or a tape's :meth:`~lrpkit.tape.Tape.output_to_keep`) stands for: a
    tensor as it is, a recipe (any callable) evaluated."""
    return kept() if callable(kept) else kept


def _pack(t: torch.Tensor):
    recipe = getattr(t, _RECIPE, None)
    return t if recipe is None else recipe


def saving_recipes():
    """Within: the autograd graph saves a marked tensor as its recipe, recomputed in the backward pass."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, value_of)
