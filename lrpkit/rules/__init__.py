"""LRP rules. Every rule documents its formula and reference; :mod:`lrpkit.rules.base` the protocol.

Default rules per layer type are registered here (see :mod:`lrpkit.registry`).
"""

from torch import nn

from .. import layers as L
from ..registry import register_rule
from .base import (ACTIVATION_TYPES, LINEAR_TYPES, MAXPOOL_TYPES, NORM_TYPES, POOL_TYPES, RESHAPE_TYPES,
                   IncompatibleRuleError, Rule, stabilize)
from .basic import (AlphaBetaRule, EpsilonRule, FlatRule, GammaRule, GeneralizedGammaRule, MaxPoolRule, PassRule,
                    WSquareRule, ZBoxRule, ZeroRule, ZPlusRule)
from .convnext import GlobalResponseNormRule, PermuteRule
from .pooling import AttentionPoolRule
from .structural import ProductRule, SkipConnectionRule, SumRule
from .swin import SpaceToDepthRule
from .terms import Group, Term, TermRule
from .transformer import (ClassTokenRule, LayerNormRule, PatchFlattenRule, PositionalEmbeddingRule,
                          SelectClassTokenRule, SelfAttentionRule, TokenMeanRule)

for _t in LINEAR_TYPES + POOL_TYPES + NORM_TYPES:
    register_rule(_t, ZeroRule())
for _t in ACTIVATION_TYPES + RESHAPE_TYPES + (nn.Identity, nn.Dropout):
    register_rule(_t, PassRule())
register_rule(L.SkipConnection, SkipConnectionRule())
register_rule(L.Sum, SumRule())
register_rule(L.Multiply, ProductRule())
register_rule(L.PatchFlatten, PatchFlattenRule())
register_rule(L.PositionalEmbedding, PositionalEmbeddingRule())
register_rule(L.ClassToken, ClassTokenRule())
register_rule(L.SelectClassToken, SelectClassTokenRule())
register_rule(L.TokenMean, TokenMeanRule())
register_rule(L.LayerNormalize, LayerNormRule())
register_rule(L.Scale, EpsilonRule())
register_rule(L.SelfAttention, SelfAttentionRule())
register_rule(L.Permute, PermuteRule())
register_rule(L.GlobalResponseNormalize, GlobalResponseNormRule())
register_rule(L.AttentionPool, AttentionPoolRule())
register_rule(L.SpaceToDepth, SpaceToDepthRule())

__all__ = [
    "Rule", "IncompatibleRuleError", "stabilize", "Term", "Group", "TermRule",
    "ZeroRule", "EpsilonRule", "GammaRule", "WSquareRule", "FlatRule", "ZBoxRule", "AlphaBetaRule", "ZPlusRule",
    "PassRule", "MaxPoolRule", "GeneralizedGammaRule", "SkipConnectionRule", "SumRule", "ProductRule",
    "SelfAttentionRule", "PositionalEmbeddingRule", "LayerNormRule", "PatchFlattenRule", "ClassTokenRule",
    "SelectClassTokenRule", "TokenMeanRule",
    "PermuteRule", "GlobalResponseNormRule",
    "AttentionPoolRule",
    "SpaceToDepthRule",
]
