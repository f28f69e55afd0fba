"""Explainers that are not LRP (and Chefer's LRP variant): each ``Method(model, **options)(x, target=None)``
returns an :class:`~lrpkit.Explanation` with ``heatmap`` (B, H, W), ``target`` and ``output``; the token-level
ones also ``patch_relevance`` (B, grid_h, grid_w)."""

from .attention import AttentionGradCAM, GenericAttention, RawAttention
from .base import Explainer, NotApplicableError
from .chefer import PartialLRP, TransformerAttribution, chefer_composite
from .gradient import Gradient, InputXGradient, IntegratedGradients, SmoothGrad
from .rollout import AttentionRollout, GradientRollout
from .vitcx import ViTCX

__all__ = ["Explainer", "NotApplicableError", "AttentionRollout", "GradientRollout", "RawAttention", "AttentionGradCAM",
           "GenericAttention", "TransformerAttribution", "PartialLRP", "chefer_composite", "ViTCX", "Gradient",
           "InputXGradient", "SmoothGrad", "IntegratedGradients"]
