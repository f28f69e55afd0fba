"""Preset composites, as in zennit and RelevancePropagation.jl, extended to vision transformers.

On every preset the transformer layers get their transformer rules (the registered defaults: PositionalEmbedding
-, LayerNorm-, token- and skip-connection rules), and the attention's value and output projections get the rule
the preset gives Linear layers. ``analyze`` and ``LRP`` without a composite use :func:`default_composite`.
"""

from __future__ import annotations

from torch import nn

from .composites import Composite, FirstLayerMap, GlobalTypeMap, LastLayerMap
from .layers import (AttentionPool, GlobalResponseNormalize, LayerNormalize, Multiply, PositionalEmbedding, Scale,
                     SelfAttention, SkipConnection, Sum, TokenMean)
from .rules import (MAXPOOL_TYPES, AlphaBetaRule, AttentionPoolRule, EpsilonRule, FlatRule, GammaRule,
                    GeneralizedGammaRule, GlobalResponseNormRule, LayerNormRule, MaxPoolRule, PositionalEmbeddingRule,
                    ProductRule, SelfAttentionRule, SkipConnectionRule, SumRule, TokenMeanRule, ZBoxRule, ZPlusRule)

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
           nn.AdaptiveAvgPool3d)
MAXPOOL = MAXPOOL_TYPES


def _base(conv_rule, linear_rule, epsilon: float, attention_mode: str = "cp") -> dict:
    """The type map shared by all presets. Every stabiliser it assigns is the preset's ``epsilon`` (average,
    adaptive and global pools, token means, LayerNorm, ConvNeXt V2's global response norm, residual splits); max
    pooling passes the relevance to its argmax unchanged (:class:`~lrpkit.rules.MaxPoolRule`, no stabiliser), as
    zennit does. A product of two branches (:class:`~lrpkit.layers.Multiply`: a gated linear unit, a
    squeeze-excitation gate) holds its gate constant (``ProductRule('gate')``), except in AttnLRP, which splits it
    uniformly (``ProductRule('uniform')``, Achtibat et al. 2024)."""
    mapping = {AVGPOOL: EpsilonRule(epsilon), MAXPOOL: MaxPoolRule(), nn.Linear: linear_rule, CONV: conv_rule,
               SelfAttention: SelfAttentionRule(linear_rule, linear_rule, mode=attention_mode, epsilon=epsilon),
               LayerNormalize: LayerNormRule(epsilon), Scale: EpsilonRule(epsilon),
               GlobalResponseNormalize: GlobalResponseNormRule(epsilon),
               PositionalEmbedding: PositionalEmbeddingRule(epsilon), TokenMean: TokenMeanRule(epsilon),
               SkipConnection: SkipConnectionRule(epsilon), Sum: SumRule(epsilon),
               Multiply: ProductRule("uniform" if attention_mode == "attnlrp" else "gate")}
    # attention pooling (SigLIP's 'map' head): the attention's mode, its value projection the Linear layers' rule
    mapping[AttentionPool] = AttentionPoolRule(linear_rule, mode=attention_mode, epsilon=epsilon)
    return mapping


def EpsilonGammaBox(low, high, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """Conv: generalised LRP-γ (zennit's ``Gamma``; the classic γ-rule for non-negative inputs and outputs),
    Linear: LRP-ε, first layer: LRP-z^B with bounds ``low``/``high`` (Montavon et al. 2019)."""
    return Composite(GlobalTypeMap(_base(GeneralizedGammaRule(gamma), EpsilonRule(epsilon), epsilon)),
                     FirstLayerMap(ZBoxRule(low, high)))


def EpsilonPlus(epsilon: float = 1e-6) -> Composite:
    """Conv: LRP-z⁺, Linear: LRP-ε (Kohlbrenner et al. 2020, "Towards best practice in explaining neural network
    decisions with LRP")."""
    return Composite(GlobalTypeMap(_base(ZPlusRule(), EpsilonRule(epsilon), epsilon)))


def EpsilonAlpha2Beta1(epsilon: float = 1e-6) -> Composite:
    """Conv: LRP-α2β1, Linear: LRP-ε (Kohlbrenner et al. 2020)."""
    return Composite(GlobalTypeMap(_base(AlphaBetaRule(2.0, 1.0), EpsilonRule(epsilon), epsilon)))


def EpsilonPlusFlat(epsilon: float = 1e-6) -> Composite:
    """:func:`EpsilonPlus` with LRP-flat on the first layer (Kohlbrenner et al. 2020)."""
    return Composite(*EpsilonPlus(epsilon).primitives, FirstLayerMap(FlatRule()))


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6) -> Composite:
    """:func:`EpsilonAlpha2Beta1` with LRP-flat on the first layer (Kohlbrenner et al. 2020)."""
    return Composite(*EpsilonAlpha2Beta1(epsilon).primitives, FirstLayerMap(FlatRule()))


def _transformer(mode: str, epsilon: float, gamma: float | None, first_layer) -> Composite:
    linear = EpsilonRule(epsilon) if gamma is None else GammaRule(gamma, epsilon)
    primitives = [GlobalTypeMap(_base(EpsilonRule(epsilon), linear, epsilon, attention_mode=mode)),
                  LastLayerMap(EpsilonRule(epsilon))]
    if first_layer is not None:
        primitives.append(FirstLayerMap(first_layer))
    return Composite(*primitives)


def CPLRP(epsilon: float = 1e-6, gamma: float | None = None, first_layer=None) -> Composite:
    """Conservative propagation for transformers (Ali et al. 2022): attention probabilities and LayerNorm σ held
    constant, skip connections split proportionally, the gate of an element-wise product (a gated linear unit's
    ``act(x W_g)``) held constant, LRP-ε on Linear/Conv layers. ``gamma``: LRP-γ (GammaRule) on
    the Linear layers of the blocks (MLP, attention value and output projections); the head keeps LRP-ε.
    ``first_layer``: the rule for the patch projection (default LRP-ε). With ε → 0 and no γ this equals
    gradient × input of the model with A, σ and gates detached and activations passing relevance unchanged; on a CNN
    (every stabiliser is ``epsilon``, max pooling passes its relevance to the argmax) gradient × input of the model
    with its activations passing relevance unchanged (tests/test_reference_cnn.py)."""
    return _transformer("cp", epsilon, gamma, first_layer)


def AttnLRP(epsilon: float = 1e-6, gamma: float | None = None, first_layer=None) -> Composite:
    """AttnLRP (Achtibat et al. 2024): as :func:`CPLRP`, but relevance also flows through the attention scores:
    uniform split of both matrix products, the softmax's Taylor rule, LayerNorm qk-norms, a rotary embedding
    (LRP-ε on the rotation); and every element-wise product of two branches (a gated linear unit's
    ``act(x W_g) ⊙ x W_u``) splits its relevance half to each factor (``ProductRule('uniform')``)."""
    return _transformer("attnlrp", epsilon, gamma, first_layer)


def default_composite(chain) -> Composite:
    """The ``generic`` model family's composite (:mod:`lrpkit.families`; the built-in families choose the same):
    :func:`CPLRP` for transformers (conservative, costs about one
    gradient, and its ε → 0 limit is a well-defined gradient × input), :func:`EpsilonPlusFlat` otherwise (the
    recommendation of Kohlbrenner et al. 2020 for CNNs)."""
    if any(isinstance(m, SelfAttention) for m in chain.modules()):
        return CPLRP()
    return EpsilonPlusFlat()
