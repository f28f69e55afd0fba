"""Explainers that are not LRP (and Chefer's LRP variant): each ``Method(model, **options)(x, target=None)``
returns an :class:`~lrpkit.Explanation` with ``heatmap`` (B, H, W), ``target`` and ``output``."""

from .base import Explainer

__all__ = ["Explainer"]
