"""The basic LRP rules for Linear, Conv1d/2d/3d, pooling, element-wise and reshaping layers.

Notation: layer ``z_j = Σ_i a_i w_ij + b_j``; ``R_j`` the relevance of output ``j``; ``stab(z) = z + ε·sign(z)``
with ``sign(0) := 1``; ``t⁺ = max(t, 0)``, ``t⁻ = min(t, 0)``. Formulas and defaults follow zennit and
RelevancePropagation.jl; references per rule.
"""

from __future__ import annotations

import torch

from ..layers import LayerNormalize, PatchFlatten, Scale
from ..propagate import Record, Step
from ..traits import Traits
from .base import (ACTIVATION_TYPES, LINEAR_TYPES, MAXPOOL_TYPES, NORM_TYPES, RESHAPE_TYPES, Rule, divide,
                   stabilize)
from .terms import Group, Term, TermRule, neg, no_bias, pos, same
from .vjp import has_input_vjp, input_vjp, vjp


class ZeroRule(Rule):
    """LRP-0: ``R_i = Σ_j a_i w_ij / z_j · R_j`` (Bach et al. 2015), stabilised with ε = 1e-9."""

    def __init__(self, epsilon: float = 1e-9):
        self.epsilon = epsilon


class EpsilonRule(Rule):
    """LRP-ε: ``R_i = Σ_j a_i w_ij / (z_j + ε·sign(z_j)) · R_j`` (Bach et al. 2015; Montavon et al. 2019)."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon


class GammaRule(Rule):
    """LRP-γ: ``R_i = Σ_j a_i (w_ij + γ w_ij⁺) / stab(Σ_i a_i (w_ij + γ w_ij⁺) + b_j + γ b_j⁺) · R_j``
    (Montavon et al. 2019). Meant for non-negative inputs; see :class:`GeneralizedGammaRule` otherwise."""

    targets = LINEAR_TYPES
    accepted = LINEAR_TYPES

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6):
        self.gamma, self.epsilon = gamma, epsilon

    def modify_param(self, p, name):
        return p + self.gamma * p.clamp(min=0)


class _UnitInputRule(Rule):
    """A rule for Linear/Conv layers that replaces the input by ones (the relevance depends on weights only)."""

    targets = LINEAR_TYPES
    accepted = LINEAR_TYPES

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def modify_input(self, a):
        return torch.ones_like(a)


class WSquareRule(_UnitInputRule):
    """LRP-w²: ``R_i = Σ_j w_ij² / (Σ_i' w_i'j² + b_j²) · R_j`` (Montavon et al. 2017, deep Taylor decomposition).
    Input replaced by ones, parameters (weight and bias, as in zennit) squared."""

    def modify_param(self, p, name):
        return p ** 2


class FlatRule(_UnitInputRule):
    """LRP-flat: ``R_i = Σ_j 1 / Σ_i' 1 · R_j``, i.e. ``R_j`` spread uniformly over the inputs in ``j``'s
    receptive field (Lapuschkin et al. 2019). Input and weights replaced by ones, bias by zero.

    Closed form (Linear, and ConvNd with one group and zero padding): every output channel sees the same ``n_p``
    inputs at position ``p`` and every input channel gets the same share, so with ``S_p = Σ_o R_{o,p} / stab(n_p)``
    the relevance is ``R_{i,q} = Σ_{p ∋ q} S_p`` for every input channel ``i``: one single-channel transposed
    convolution with a ones kernel instead of a full-size forward and transposed convolution.
    """

    def modify_param(self, p, name):
        return torch.zeros_like(p) if name == "bias" else torch.ones_like(p)

    def prepare(self, layer):
        if isinstance(layer, torch.nn.Linear) or (has_input_vjp(layer) and layer.groups == 1):
            return _SingleChannel(layer)
        return super().prepare(layer)

    def lrp(self, step, rec, R, tape):
        if not isinstance(step.state, _SingleChannel):
            return super().lrp(step, rec, R, tape)
        return step.state.flat(rec.input.shape, R, self.epsilon)


class _SingleChannel:
    """A Linear/ConvNd layer's LRP-flat on one channel: its input count per output (Linear) or a ones-kernel
    single-channel copy of its geometry (ConvNd)."""

    def __init__(self, layer):
        self.unit = None
        if isinstance(layer, torch.nn.Linear):
            self.inputs = layer.in_features
        else:
            self.inputs = layer.in_channels
            self.unit = type(layer)(1, 1, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False)
            self.unit.weight = torch.nn.Parameter(torch.ones_like(self.unit.weight, dtype=layer.weight.dtype,
                                                                 device=layer.weight.device), requires_grad=False)

    def flat(self, input_shape, R, epsilon):
        if self.unit is None:  # Linear: n = in_features for every output
            S = R.sum(-1, keepdim=True) / stabilize(R.new_full((), self.inputs), epsilon)
            return S.expand(input_shape).contiguous()
        with torch.no_grad():  # n_p: the number of (non-padding) inputs in p's receptive field, all channels
            n = self.unit(R.new_ones((1, 1) + tuple(input_shape[2:]))).mul_(self.inputs)
        S = divide(R.sum(1, keepdim=True), n.expand(R.shape[:1] + n.shape[1:]), epsilon)
        c = input_vjp(self.unit, S, (input_shape[0], 1) + tuple(input_shape[2:]))
        return c.expand(input_shape).contiguous()


class PassRule(Rule):
    """Pass the relevance through unchanged: ``R_in = R`` (reshaped to the input's shape).

    For element-wise activations (the rule of the LRP literature for ReLU/GELU in a relevance pass), identity,
    dropout and reshaping layers. Conserves exactly.
    """

    targets = ()
    accepted = ACTIVATION_TYPES + RESHAPE_TYPES + NORM_TYPES + (torch.nn.Identity, torch.nn.Dropout, LayerNormalize,
                                                                Scale, PatchFlatten)  # element-count preserving

    def __init__(self):
        pass

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        with torch.no_grad():
            return Record(x.detach(), step.layer(x.detach()))

    def lrp(self, step, rec, R, tape):
        if R.numel() != rec.input.numel():
            raise ValueError(f"{type(self).__name__} needs a layer that keeps the number of elements; "
                             f"{type(step.layer).__name__} maps {tuple(rec.input.shape)} to {tuple(R.shape)}")
        return R.reshape(rec.input.shape)

    def traits(self, layer) -> Traits:
        # R_in is R reshaped: reads neither output nor input values; an activation's output is cheap to recompute
        return Traits(output=False, lazy_input=True, output_recomputable=isinstance(layer, ACTIVATION_TYPES),
                      moves_only=True)


class MaxPoolRule(Rule):
    """Max pooling passes each output's relevance to its argmax, unchanged and without a stabiliser:
    ``R_in = (∂y/∂a)ᵀ R``, the pool's own vector-Jacobian product (torch's: a tie goes to one element, and
    overlapping windows add up at an input that is the maximum of several). What zennit does for a max pool (it
    has no rule there: the gradient carries the relevance), and the ε → 0 limit of LRP-ε on it. Conserves
    exactly. The presets give it to every max-pool layer.
    """

    targets = MAXPOOL_TYPES
    accepted = MAXPOOL_TYPES

    def __init__(self):
        pass

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        a = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return Record(a, step.layer(a))

    def lrp(self, step, rec, R, tape):
        return vjp(step.layer, rec.input, R, rec.output)

    def traits(self, layer) -> Traits:
        # R_in = (∂y/∂a)ᵀ R through the recorded graph; a zero input can be a window's maximum and receive
        # relevance, so R_in does not vanish with the input
        return Traits(graph=True)


class ZPlusRule(TermRule):
    """LRP-z⁺: ``R_i = Σ_j (a_i⁺ w_ij⁺ + a_i⁻ w_ij⁻) / stab(Σ_i' a_i'⁺ w_i'j⁺ + a_i'⁻ w_i'j⁻ + b_j⁺) · R_j``
    (Montavon et al. 2017), equivalent to α=1, β=0; negative inputs allowed as in zennit."""

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def groups(self):
        return (Group((Term(pos, pos), Term(neg, no_bias(neg)))),)


class AlphaBetaRule(TermRule):
    """LRP-αβ: ``R_i = Σ_j (α (a_i w_ij)⁺ / z_j⁺ − β (a_i w_ij)⁻ / z_j⁻) R_j`` with α − β = 1 (Bach et al. 2015).
    ``(a w)⁺ = a⁺w⁺ + a⁻w⁻`` and ``(a w)⁻ = a⁺w⁻ + a⁻w⁺``; the positive bias enters z⁺, the negative z⁻."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise ValueError(f"AlphaBetaRule needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
        if abs(alpha - beta - 1) > 1e-12:
            raise ValueError(f"AlphaBetaRule needs alpha - beta = 1 to conserve relevance, got {alpha} - {beta}")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def groups(self):
        return (Group((Term(pos, pos), Term(neg, no_bias(neg))), weight=self.alpha),
                Group((Term(pos, neg), Term(neg, no_bias(pos))), weight=-self.beta))


class ZBoxRule(TermRule):
    """LRP-z^B for inputs bounded by ``low <= a <= high`` (Montavon et al. 2017):
    ``R_i = Σ_j (a_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) / stab(z_j − Σ_i l_i w_ij⁺ − h_i w_ij⁻ − b_j⁺ − b_j⁻) · R_j``.
    ``low``/``high``: floats or tensors broadcastable to one sample (e.g. (1, 3, 1, 1) per channel)."""

    def __init__(self, low, high, stabilizer: float = 1e-6):
        self.low, self.high, self.stabilizer = low, high, stabilizer

    def _bound(self, value):
        def fn(a, name=""):
            return torch.as_tensor(value, dtype=a.dtype, device=a.device).expand_as(a)
        return fn

    def groups(self):
        return (Group((Term(same, same), Term(self._bound(self.low), pos, -1.0),
                       Term(self._bound(self.high), neg, -1.0))),)


class GeneralizedGammaRule(TermRule):
    """Generalised LRP-γ for inputs of any sign (Andéol et al. 2021; zennit's ``Gamma``). For ``z_j > 0``:
    ``R_i = Σ_j (a_i⁺ (w_ij + γw_ij⁺) + a_i⁻ (w_ij + γw_ij⁻)) / stab(z_j^↑) · R_j``, with ``z^↑`` the sum of those
    products plus ``b + γb⁺``; for ``z_j < 0`` the same with the roles of ⁺ and ⁻ in the weights swapped. Outputs
    with ``z_j = 0`` pass no relevance (they are in neither group)."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        self.gamma, self.stabilizer = gamma, stabilizer

    def groups(self):
        g = self.gamma
        up_p = lambda p, name: p + g * p.clamp(min=0)  # noqa: E731
        up_n = lambda p, name: p + g * p.clamp(max=0)  # noqa: E731
        return (Group((Term(pos, up_p), Term(neg, no_bias(up_n))), mask=lambda z: (z > 0).to(z.dtype)),
                Group((Term(pos, up_n), Term(neg, no_bias(up_p))), mask=lambda z: (z < 0).to(z.dtype)))
