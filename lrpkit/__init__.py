"""lrpkit: Layer-wise Relevance Propagation for PyTorch, with first-class timm vision transformers.

Quick start::

    import lrpkit
    expl = lrpkit.analyze(model, x)          # canonize + default preset + argmax target
    expl.relevance                           # same shape as x
"""

from . import composites, layers, presets, rules
from .analyzer import LRP, analyze
from .canonize import CanonizationError, canonize, register_canonizer
from . import families
from .families import Family, register_family
from .composites import (Composite, FirstLayerMap, FirstLayerTypeMap, GlobalMap, GlobalTypeMap, LastLayerMap,
                         LastLayerTypeMap, NameMap, RangeMap, RangeTypeMap)
from .explanation import Accounting, Explanation
from .layers import (Chain, ClassToken, LayerNormalize, Multiply, PatchFlatten, PositionalEmbedding, Scale,
                     SelectClassToken, SelfAttention, SkipConnection, Sum, TokenMean)
from .registry import Registry, register_rule, registered
from . import crp, evaluate, methods  # noqa: E402  (after the core they build on)
from .crp import CRP  # noqa: E402
from . import _aliases

__version__ = "0.1.0"

# The application lives in lrpkit.app; its modules keep their old paths (lrpkit.data, lrpkit.models, lrpkit.viz,
# lrpkit.catalog, lrpkit.demo, lrpkit.cli, lrpkit.commands), imported on first use: see lrpkit/_aliases.py.
_aliases.install()
_LAZY = ("app",) + tuple(name.rpartition(".")[2] for name in _aliases.ALIASES)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LRP", "analyze", "CRP", "crp", "canonize", "register_canonizer", "register_rule", "Registry", "registered",
    "CanonizationError",
    "families", "Family", "register_family",
    "Explanation", "Accounting", "composites", "presets", "rules", "layers", "methods", "evaluate",
    "Composite", "GlobalMap", "GlobalTypeMap", "FirstLayerMap", "FirstLayerTypeMap", "LastLayerMap",
    "LastLayerTypeMap", "RangeMap", "RangeTypeMap", "NameMap",
    "Chain", "SkipConnection", "Sum", "PatchFlatten", "ClassToken", "PositionalEmbedding", "SelfAttention",
    "SelectClassToken", "TokenMean", "LayerNormalize", "Scale", "Multiply",
]
