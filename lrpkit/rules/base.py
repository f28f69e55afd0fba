"""The rule protocol and the generic LRP rule.

A rule is defined, as in RelevancePropagation.jl, by what it changes in the layer's forward computation::

    modify_input(a)          -> ã            (default: a)
    modify_param(p, name)    -> p'           (default: p; applied to the weight and the bias)
    modify_denominator(z)    -> z'           (default: z + ε·sign(z), sign(0) := 1)

    generic rule:  z = layer'(ã);  s = R / z';  c = (∂z/∂ã)ᵀ s;  R_in = ã ⊙ c

Rules that change neither the input nor the parameters reuse the forward pass's values (one autograd
vector-Jacobian product per layer, no second forward). Rules with a closed form override :meth:`Rule.prepare`
(built once per analyzer) and :meth:`Rule.lrp`. What the execution plan may assume about a rule is declared in one
place, :meth:`Rule.traits`, whose defaults are safe.

References: Bach et al. 2015, "On pixel-wise explanations for non-linear classifier decisions by layer-wise
relevance propagation"; Montavon et al. 2019, "Layer-wise relevance propagation: an overview";
RelevancePropagation.jl (Julia-XAI).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..layers import Scale
from ..propagate import Record, Step, per_sample
from ..registry import default_rule
from ..traits import Traits
from .vjp import has_input_vjp, vjp

try:  # torch's own test for a tensor batched by torch.func.vmap (it has no public name)
    from torch._C._functorch import is_batchedtensor as _is_batched
except ImportError:  # pragma: no cover - a torch without functorch vmaps nothing
    def _is_batched(t) -> bool:
        return False

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ReLU6,
                    nn.Hardswish, nn.Hardtanh, nn.Mish, nn.PReLU, nn.SELU, nn.CELU)
RESHAPE_TYPES = (nn.Flatten, nn.Unflatten)
try:  # timm's own element-wise activations (act_layer='gelu', 'gelu_tanh', 'quick_gelu')
    from timm.layers.activations import GELU as _TimmGELU, GELUTanh as _TimmGELUTanh, QuickGELU as _TimmQuickGELU
except ImportError:  # pragma: no cover
    pass
else:
    ACTIVATION_TYPES = ACTIVATION_TYPES + (_TimmGELU, _TimmGELUTanh, _TimmQuickGELU)
# the gate of MobileNetV3's squeeze-excitation, and timm's own element-wise activations of the EfficientNet /
# MobileNetV3 family (act_layer='swish', 'hard_swish', gate_layer='sigmoid', 'hard_sigmoid', ...)
ACTIVATION_TYPES = ACTIVATION_TYPES + (nn.Hardsigmoid,)
try:  # timm's own element-wise gates and activations (SE / ECA gates, EfficientNet's swish, ...)
    from timm.layers import activations as _timm_act, activations_me as _timm_act_me
except ImportError:  # pragma: no cover
    pass
else:
    ACTIVATION_TYPES = ACTIVATION_TYPES + tuple(
        getattr(module, name) for module, names in (
            (_timm_act, ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish")),
            (_timm_act_me, ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")))
        for name in names if hasattr(module, name))


class IncompatibleRuleError(TypeError):
    """A rule was mapped onto a layer it cannot handle."""


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + ε·sign(z)`` with ``sign(0) := 1``: keeps the sign, moves away from zero.

    (``copysign`` takes the sign bit, so a negative zero ``-0.0`` moves to ``-ε``; both keep the division finite.)
    """
    eps = epsilon.to(z) if isinstance(epsilon, torch.Tensor) else z.new_full((), epsilon)  # a tensor ε broadcasts
    return torch.copysign(eps, z).add_(z)


def divide(R: torch.Tensor, z: torch.Tensor, epsilon, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``R / stabilize(z, ε)``, written into the stabilised denominator's buffer (one allocation, not two:
    on CPU every fresh activation-sized tensor costs page faults that the gradient pass does not pay).

    ``gate``: ``relu(z)``, free to overwrite, handed over where ``R`` is known to vanish wherever ``z ≤ 0`` (see
    :mod:`lrpkit.plan`); ``z`` is then not read and may be None. Wherever ``R ≠ 0``,
    ``stab(z) = z + ε = relu(z) + ε``, so the quotient is ``R / (relu(z) + ε)``: one in-place add instead of a
    ``copysign`` and an add, and the same values (a zero quotient may differ in its sign bit).

    Under :func:`torch.func.vmap` over several relevances per record (CRP's concepts) the quotient is a fresh
    tensor (vmap has no ``out=``; the relevance's extra dimension would not fit the denominator's buffer) and the
    gate is left as it is."""
    if gate is not None:
        eps = epsilon.to(gate) if isinstance(epsilon, torch.Tensor) else epsilon
        if vmapped(R) or not writable(gate, R):
            return R / (gate.detach() + eps)
        return torch.div(R, gate.add_(eps), out=gate)
    d = stabilize(z.detach(), epsilon)
    if vmapped(R) or not writable(d, R):
        return R / d
    return torch.div(R, d, out=d)


def dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps, laid out contiguously or channels last (a timm
    ConvNeXt's feature maps are channels last, as the layer norms over the channels leave them)."""
    if t.is_contiguous():
        return True
    if t.ndim == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def writable(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``t``, a fresh result of this pass, can take an in-place update by a tensor like ``like``: same
    shape and dtype, dense, outside autograd, and batched under :func:`torch.func.vmap` if ``like`` is (an update
    by a vmapped tensor would add the vmapped dimension to ``t``)."""
    return t.shape == like.shape and t.dtype == like.dtype and dense(t) and not t.requires_grad and \
        (not vmapped(like) or vmapped(t))


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by :func:`torch.func.vmap` (CRP runs the rules on several relevances per record
    that way)."""
    return _is_batched(t)


def times_input(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a ⊙ c``, in place in ``c`` when ``c`` is a fresh, dense tensor of the same shape (a VJP's result)."""
    if writable(c, a):
        return c.mul_(a.detach())
    return a.detach() * c


def layer_with_params(layer: nn.Module, fn) -> nn.Module:
    """A frozen copy of ``layer`` whose weight and bias are ``fn(param, name)`` (``None`` bias stays ``None``)."""
    new = copy.deepcopy(layer)
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if isinstance(p, torch.Tensor):
            setattr(new, name, nn.Parameter(fn(p.detach(), name), requires_grad=False))
    return new


def bias_relevance(layer: nn.Module, s: torch.Tensor) -> torch.Tensor | None:
    """Relevance absorbed by the bias of a Linear/Conv layer, ``Σ_j b_j s_j`` per sample, or None."""
    b = getattr(layer, "bias", None)
    if not isinstance(b, torch.Tensor) or not isinstance(layer, LINEAR_TYPES + (Scale,)):
        return None
    if isinstance(layer, Scale):  # Σ_c b_c Σ_{positions} s_c: the sums first, no product of s's size
        channel = layer.dim % s.ndim
        if channel == 0:
            return per_sample(s * b.view(layer._shape(s)))
        positions = [d for d in range(1, s.ndim) if d != channel]
        return (s.sum(positions) if positions else s) @ b  # (B, C) @ (C,): sum([]) would sum everything
    if isinstance(layer, nn.Linear):  # Σ_j b_j Σ_{tokens} s_j: the sums first (a pass over s), then (B, C) @ (C,)
        return (s.flatten(1, -2).sum(1) if s.ndim > 2 else s) @ b
    return (s.flatten(2).sum(2) @ b)


PROTOCOL_HOOKS = ("modify_input", "modify_param", "modify_denominator")
FIXED_METHODS = ("forward", "lrp", "prepare", "traits")


class Rule:
    """Base class of all rules; by itself the generic rule with ``ε = self.epsilon`` and no modification.

    Subclasses override ``modify_input``, ``modify_param``, ``modify_denominator`` (generic rules; also honoured
    when set on an instance) or ``prepare`` and ``lrp`` (closed forms). ``targets`` are the layer types that
    :class:`~lrpkit.composites.GlobalMap` assigns the rule to; ``accepts`` says which layers the rule can handle at
    all. ``traits(layer)`` declares what the execution plan may assume (:class:`~lrpkit.traits.Traits`).
    """

    epsilon: float = 1e-9
    targets: tuple = LINEAR_TYPES + POOL_TYPES + NORM_TYPES + (Scale,)
    accepted: tuple = LINEAR_TYPES + POOL_TYPES + NORM_TYPES + ACTIVATION_TYPES + RESHAPE_TYPES + (Scale,)

    # -- the protocol -------------------------------------------------------------------------------------
    def modify_input(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def modify_param(self, p: torch.Tensor, name: str) -> torch.Tensor:
        return p

    def modify_denominator(self, z: torch.Tensor) -> torch.Tensor:
        return stabilize(z, self.epsilon)

    def prepare(self, layer: nn.Module):
        """Built once per analyzer: the layer with modified parameters, or None."""
        return layer_with_params(layer, self.modify_param) if self.modifies_params else None

    def forward(self, step: Step, x: torch.Tensor, tape) -> Record:
        """Run the layer in the recording forward pass; keep a graph only where ``lrp`` needs one."""
        a = x.detach()
        if not self._keeps_graph(step.layer):
            with torch.no_grad():
                return Record(a, step.layer(a))
        a.requires_grad_(True)
        with torch.enable_grad():
            return Record(a, step.layer(a))

    def lrp(self, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        """Generic rule: ``z = layer'(ã); s = R / z'; c = (∂z/∂ã)ᵀ s; R_in = ã ⊙ c``."""
        layer = step.state if step.state is not None else step.layer
        if self.modifies_input or self.modifies_params:
            a = self.modify_input(rec.input)
            with torch.no_grad():
                z = layer(a)
        else:
            a, z = rec.input, rec.output
            if z is None and rec.gate is None:  # not kept (traits.output False): recompute
                with torch.no_grad():
                    z = layer(a)
        if self.modifies_denominator:
            s = R / self.modify_denominator(z.detach())
        else:
            s = divide(R, z, self.epsilon, rec.gate)
        sink = bias_relevance(layer, s)
        if sink is not None:
            rec.absorbed["bias"] = sink
        return times_input(vjp(layer, a, s, z, overwrite=True), a)  # s is this call's own, read no more

    #: inner sites of the rule's reverse pass, ``{name: channel axis}`` (e.g. SelfAttentionRule's ``"values"``): the
    #: rule calls ``tape.stops_at(step, name)`` there (raising :class:`~lrpkit.propagate.ReachedStop` with the
    #: relevance there if so) and :meth:`lrp_from` continues from there; CRP conditions on them
    sites: dict = {}

    def lrp_from(self, site: str, step: Step, rec: Record, R: torch.Tensor, tape) -> torch.Tensor:
        """The rule's reverse pass from its inner site ``site`` (see ``sites``) down to the input."""
        raise NotImplementedError(f"{type(self).__name__} has no inner site {site!r}")

    def traits(self, layer: nn.Module) -> Traits:
        """What the execution plan may assume about this rule on ``layer`` (:class:`~lrpkit.traits.Traits`). The
        generic rule: it reuses the recorded output unless it modifies the input or the parameters (an
        element-wise :class:`~lrpkit.layers.Scale` is cheaper to recompute than to keep); its input may be
        recomputed; ``R_in = a ⊙ c`` vanishes with an unmodified input; with the default denominator on a layer
        whose VJP needs only its weights it can take the gate. A rule that overrides ``lrp`` or ``forward`` gets
        the safe defaults for what those decide."""
        generic_lrp, generic_forward = self._inherits("lrp", Rule), self._inherits("forward", Rule)
        modifies = self.modifies_input or self.modifies_params
        return Traits(
            graph=generic_forward and self._keeps_graph(layer),
            output=not (modifies or isinstance(layer, Scale)),
            lazy_input=generic_lrp and generic_forward and not self._keeps_graph(layer),
            output_recomputable=isinstance(layer, Scale),
            vanishes_with_input=generic_lrp and not self.modifies_input,
            output_in_record_only=generic_forward,
            uses_gate=generic_lrp and not (modifies or self.modifies_denominator) and has_input_vjp(layer))

    # -- what the rule is ------------------------------------------------------------------------------------
    @property
    def modifies_input(self) -> bool:
        return not self._inherits("modify_input", Rule)

    @property
    def modifies_params(self) -> bool:
        return not self._inherits("modify_param", Rule)

    @property
    def modifies_denominator(self) -> bool:
        return not self._inherits("modify_denominator", Rule)

    def _inherits(self, name: str, base: type) -> bool:
        """Whether method ``name`` is ``base``'s own: not overridden by a subclass, nor set on the instance.
        (Asked on every step: the answer is kept until an attribute of the rule is set or deleted.)"""
        known = self.__dict__.setdefault("_inherited", {})
        if (name, base) not in known:
            known[name, base] = name not in vars(self) and getattr(type(self), name) is getattr(base, name)
        return known[name, base]

    def _keeps_graph(self, layer: nn.Module) -> bool:
        # only the generic rule on a layer that is not linear in its input (e.g. pooling), unmodified
        return self._inherits("lrp", Rule) and not (self.modifies_input or self.modifies_params or
                                                    has_input_vjp(layer))

    def __setattr__(self, name, value) -> None:
        if name in FIXED_METHODS and callable(value):
            raise TypeError(f"{type(self).__name__}.{name} cannot be replaced on an instance (the analyzer plans "
                            f"around the class's method); define a subclass that overrides {name}")
        self.__dict__.pop("_inherited", None)
        super().__setattr__(name, value)

    def __delattr__(self, name) -> None:
        self.__dict__.pop("_inherited", None)
        super().__delattr__(name)

    def accepts(self, layer: nn.Module) -> bool:
        """Whether the rule can handle ``layer``: a type in ``accepted``, or a (custom) layer type whose registered
        default rule (:func:`lrpkit.register_rule`) is of this rule's class."""
        return isinstance(layer, self.accepted) or type(default_rule(layer)) is type(self)

    def check(self, layer: nn.Module) -> None:
        """Raise :class:`IncompatibleRuleError` if this rule cannot handle ``layer``."""
        if not self.accepts(layer):
            raise IncompatibleRuleError(
                f"{self!r} cannot handle a {type(layer).__name__} layer "
                f"(it handles {', '.join(sorted({t.__name__ for t in self.accepted}))})")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
