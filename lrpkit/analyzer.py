"""``LRP``: the reusable analyzer, and ``analyze`` for one-off use.

The output relevance is ``R = onehot(target)`` (``normalize_output=True``), ``onehot(target) ⊙ output``
(``normalize_output=False``) or an explicit ``R``; the reverse loop over the canonized chain then computes
``R[k] = rule_k.lrp(layer_k, a[k], R[k+1])`` down to the input (Bach et al. 2015; RelevancePropagation.jl).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._inference import outside_inference_mode
from .canonize import canonize
from .composites import Composite, format_table
from .explanation import Explanation
from .families import family_of
from .registry import Registry, scope
from .layers import Chain
from .accounting import AccountingObserver, LayerwiseObserver
from .plan import Plan
from .propagate import Step
from .tape import Tape


def build_steps(chain: Chain, composite: Composite) -> tuple[list[Step], list[Step]]:
    """The chain's layers with their rules and the rules' prepared state (modified layers), built once:
    ``(top-level steps, every step depth-first)``; a container's branches are its ``children``."""
    top, every, branches = [], [], {}
    for slot in composite.assign(chain):  # depth-first: a container before its contents
        step = Step(slot.layer, slot.rule, slot.index, slot.path, slot.name, slot.rule.prepare(slot.layer))
        step.children = [branches.setdefault((slot.index, b), []) for b in range(len(slot.visit.branches))]
        parent = slot.visit.parent
        (top if parent is None else branches[(parent, slot.visit.branch)]).append(step)
        every.append(step)
    return top, every


def warn_if_training(model, who: str, stacklevel: int = 3) -> None:
    """Warn that a model in training mode is explained in eval mode (on a copy; the model itself is left as is).
    The warning names the user's line, however deep in lrpkit the call (:mod:`lrpkit._warnings`); ``stacklevel`` is
    accepted and ignored."""
    from ._warnings import user_stacklevel

    if isinstance(model, nn.Module) and model.training:
        warnings.warn(f"the model is in training mode; {who} explains its eval-mode behaviour (dropout off, "
                      f"BatchNorm running statistics) on a copy and leaves your model as it is",
                      stacklevel=user_stacklevel())


def dtype_device(module: nn.Module) -> tuple:
    """The dtype and device of the module's parameters (None, None for a module without parameters)."""
    ref = next(iter(module.parameters()), None)
    return (ref.dtype, ref.device) if ref is not None else (None, None)


def check_tensor(x, dtype: torch.dtype | None, device: torch.device | None) -> None:
    """Clear errors for an input that is not a floating-point tensor of the model's dtype on the model's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}; convert it with x.float()")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {dtype}; "
                        f"use x.to({dtype}) or convert the model")
    if device is not None and x.device != device:
        raise ValueError(f"x is on {x.device} but the model is on {device}; use x.to('{device}')")


def resolve_target(output: torch.Tensor, target) -> torch.Tensor:
    """The explained class per sample (B,): argmax for None, an int for all, or one index per sample;
    clear errors for a wrong count, a non-integer or an index out of range."""
    b = output.shape[0]
    if output.ndim != 2:
        raise ValueError(f"a target needs an output of shape (batch, classes), got {tuple(output.shape)}; "
                         f"pass the output relevance R explicitly")
    if target is None:
        return output.argmax(1)
    t = torch.as_tensor(target, device=output.device)
    if t.is_floating_point():
        raise TypeError(f"target must be an int or integer indices, got {t.dtype}")
    t = t.long().expand(b) if t.ndim == 0 else t.long().flatten()
    if t.numel() != b:
        raise ValueError(f"target has {t.numel()} entries for a batch of {b}; give one per sample or one int")
    bad = (t < 0) | (t >= output.shape[1])
    if bad.any():
        raise ValueError(f"target {t[bad].tolist()} out of range: the model has {output.shape[1]} outputs "
                         f"(0..{output.shape[1] - 1})")
    return t


class LRP:
    """A reusable LRP analyzer: ``LRP(model, composite=None)`` canonizes ``model`` once (a frozen eval-mode copy;
    ``model`` is never modified), maps rules with ``composite`` (default: the model family's,
    :func:`lrpkit.families.family_of`) and builds the modified layers and the execution plan (``lrp.plan``,
    :class:`lrpkit.plan.Plan`). Call it on batches:
    ``lrp(x, target=None, *, R=None, normalize_output=True, layerwise=False) -> Explanation``.
    Thread-safe: a call keeps its state to itself (its :class:`~lrpkit.tape.Tape`).
    """

    @outside_inference_mode
    def __init__(self, model: nn.Module, composite: Composite | None = None, *, strip_softmax: bool = False,
                 registry: Registry | None = None):
        warn_if_training(model, "lrpkit")
        self.registry = registry  # rules, canonizers and families for this analyzer only (lrpkit.Registry)
        with scope(registry):
            self.chain = canonize(model, strip_softmax=strip_softmax)
            self.family = family_of(model)
            self.composite = composite if composite is not None else self.family.composite(self.chain)
            self.steps, self.all_steps = build_steps(self.chain, self.composite)
            self.patch_size = self.family.geometry(model, self.chain).patch_size
        self.plan = Plan(self.steps)
        self.dtype, self.device = dtype_device(self.chain)

    def table(self) -> str:
        """Which rule lands on which layer: index, path in the chain, module name, layer, rule."""
        with scope(self.registry):
            return format_table(self.composite.assign(self.chain))

    # -- input checks -------------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        check_tensor(x, self.dtype, self.device)
        first = next((s.layer for s in self.all_steps if not s.children), None)
        expected, missing_batch = None, False
        if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = next(n for t, n in ((nn.Conv1d, 3), (nn.Conv2d, 4), (nn.Conv3d, 5)) if isinstance(first, t))
            if x.ndim != nd or x.shape[1] != first.in_channels:
                expected = f"(B, {first.in_channels}, " + ", ".join("HWD"[: nd - 2]) + ")"
                missing_batch = x.ndim == nd - 1 and x.shape[0] == first.in_channels
        elif isinstance(first, nn.Linear) and (x.ndim < 2 or x.shape[-1] != first.in_features):
            expected = f"(B, ..., {first.in_features})"
            missing_batch = x.ndim == 1 and x.shape[0] == first.in_features
        if expected:
            hint = " (add the batch dimension with x.unsqueeze(0))" if missing_batch else ""
            raise ValueError(f"x has shape {tuple(x.shape)} but the first layer ({first}) expects {expected}{hint}")

    # -- the analysis ---------------------------------------------------------------------------------------
    @outside_inference_mode
    def __call__(self, x: torch.Tensor, target=None, *, R: torch.Tensor | None = None,
                 normalize_output: bool = True, layerwise: bool = False) -> Explanation:
        """Explain ``output[b, target[b]]`` per sample.

        ``target``: None (argmax per sample), an int, or one index per sample. ``R``: explicit output relevance
        of the output's shape (then ``target`` must be None). ``normalize_output``: start from 1 at the target
        (True) or from the target logit's value (False). ``layerwise``: keep the relevance at every top-level
        layer's input (``Explanation.layerwise[k]`` for layer k, the last entry the output relevance).
        """
        self._check_input(x)
        accounting, trace = AccountingObserver(), LayerwiseObserver() if layerwise else None
        tape = Tape(self.plan, observers=[accounting] + ([trace] if trace else []))
        with torch.enable_grad():
            output = tape.forward(self.steps, x.detach()).detach()
        R_out, target_idx = output_relevance(output, target, R, normalize_output)
        relevance = tape.backward(self.steps, R_out).detach()
        return Explanation(relevance=relevance, output=output, target=target_idx, method="LRP",
                           layerwise=trace.result(R_out) if trace else None,
                           accounting=accounting.result(R_out, relevance), patch_size=self.patch_size,
                           input_size=tuple(x.shape[2:]) if x.ndim >= 3 else None, extras=tape.handed)


def output_relevance(output: torch.Tensor, target, R, normalize_output: bool) -> tuple:
    """``(R_out, target)``: an explicit ``R`` of the output's shape (then no target), or the one-hot of the target
    (``normalize_output=True``) or the target logit (False)."""
    if R is not None:
        if target is not None:
            raise ValueError("pass either target or R, not both")
        R = torch.as_tensor(R)
        if R.shape != output.shape:
            raise ValueError(f"R has shape {tuple(R.shape)} but the output has shape {tuple(output.shape)}")
        return R.to(output), None
    target_idx = resolve_target(output, target)
    mask = torch.zeros_like(output).scatter_(1, target_idx[:, None], 1.0)
    return (mask if normalize_output else mask * output), target_idx


def analyze(model: nn.Module, x: torch.Tensor, composite: Composite | None = None, target=None, *,
            strip_softmax: bool = False, registry: Registry | None = None, **kwargs) -> Explanation:
    """One-off LRP: ``LRP(model, composite, registry=registry)(x, target, **kwargs)``. For many calls build the
    :class:`LRP` once."""
    return LRP(model, composite, strip_softmax=strip_softmax, registry=registry)(x, target, **kwargs)
