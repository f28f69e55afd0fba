"""lrpkit: Layer-wise Relevance Propagation for PyTorch, with first-class timm vision transformers.

Quick start::

    import lrpkit
    expl = lrpkit.analyze(model, x)          # canonize + default preset + argmax target
    expl.relevance                           # same shape as x
"""

from . import composites, layers, presets, rules
from .analyzer import LRP, analyze
from .canonize import CanonizationError, canonize, register_canonizer
from .composites import (Composite, FirstLayerMap, FirstLayerTypeMap, GlobalMap, GlobalTypeMap, LastLayerMap,
                         LastLayerTypeMap, NameMap, RangeMap, RangeTypeMap)
from .explanation import Accounting, Explanation
from .layers import (Chain, ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Scale, SelectClassToken,
                     SelfAttention, SkipConnection, Sum, TokenMean)
from .registry import Registry, register_rule, registered
from . import evaluate, methods  # noqa: E402  (after the core they build on)

__version__ = "0.1.0"

__all__ = [
    "LRP", "analyze", "canonize", "register_canonizer", "register_rule", "Registry", "registered", "CanonizationError",
    "Explanation", "Accounting", "composites", "presets", "rules", "layers", "methods", "evaluate",
    "Composite", "GlobalMap", "GlobalTypeMap", "FirstLayerMap", "FirstLayerTypeMap", "LastLayerMap",
    "LastLayerTypeMap", "RangeMap", "RangeTypeMap", "NameMap",
    "Chain", "SkipConnection", "Sum", "PatchFlatten", "ClassToken", "PositionalEmbedding", "SelfAttention",
    "SelectClassToken", "TokenMean", "LayerNormalize", "Scale",
]
