"""The gradient family: Gradient, Input × Gradient, SmoothGrad, Integrated Gradients (as in ExplainableAI.jl and
Captum). Work for any differentiable model with an output (B, classes), CNN or ViT, on any device.

The model is canonized like every explainer's (a frozen eval-mode copy, the same function); a model that cannot
be canonized (layers without an LRP rule, a final softmax, ...) is explained through a frozen eval-mode copy of
itself instead — gradients need no rules. ``Explanation.relevance`` has the input's shape.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..analyzer import dtype_device, resolve_target, warn_if_training
from ..canonize import CanonizationError
from ..canonize.core import copy_layer
from ..explanation import Explanation
from .base import Explainer

__all__ = ["Gradient", "InputXGradient", "SmoothGrad", "IntegratedGradients", "integration_points"]


class _GradientExplainer(Explainer):
    """Canonize if possible, else fall back to a frozen eval-mode copy of the model (see the module docstring)."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name} needs a torch.nn.Module, got {type(model).__name__}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                super().__init__(model)
        except CanonizationError:
            self.chain = copy_layer(model)
            self.patch_size = None
            self.dtype, self.device = dtype_device(self.chain)
        warn_if_training(model, self.name)

    def check_input(self, x) -> None:
        super().check_input(x)
        if x.ndim < 2:
            raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")

    def input_gradient(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output (M, K), ∂y_target/∂x (shape of x)) for a batch x and one target index per row."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.chain(x)
            if out.ndim != 2:
                raise ValueError(f"{self.name} needs a model output of shape (batch, classes), got "
                                 f"{tuple(out.shape)}")
            picked = out.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, x)
        return out.detach(), grad

    def output_and_target(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = self.chain(x)
        return out, resolve_target(out, target)

    def _explanation(self, x, relevance, out, t, extras=None) -> Explanation:
        return Explanation(relevance=relevance, output=out, target=t, method=self.name, patch_size=self.patch_size,
                           input_size=tuple(x.shape[2:]) if x.ndim >= 3 else None, extras=extras or {})


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class Gradient(_GradientExplainer):
    """The gradient of the target logit with respect to the input, ``R = ∂y_t/∂x`` (Simonyan et al. 2014,
    "Deep Inside Convolutional Networks"). One forward and one backward pass."""

    name = "Gradient"

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t = self.output_and_target(x, target)
        _, grad = self.input_gradient(x, t)
        return self._explanation(x, grad, out, t)


class InputXGradient(_GradientExplainer):
    """Input times gradient, ``R = x ⊙ ∂y_t/∂x`` (Shrikumar et al. 2016; equals LRP-0 for ReLU networks without
    biases)."""

    name = "InputXGradient"

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t = self.output_and_target(x, target)
        _, grad = self.input_gradient(x, t)
        return self._explanation(x, x.detach() * grad, out, t)


class SmoothGrad(_GradientExplainer):
    """SmoothGrad (Smilkov et al. 2017): ``R = (1/n) Σ_k ∂y_t/∂x (x + ε_k)``, ``ε_k ~ N(0, σ²)`` with
    ``σ = noise_level · (max x − min x)`` per sample (the range of that sample's input).

    The target is resolved on the clean input. ``seed``: None uses torch's global generator; an int reseeds a
    generator on x's device for every sample, whose k-th draw is ε_k (a sample's result does not depend on the
    rest of the batch). The B·n noisy copies run in batches of ``batch_size``.
    """

    name = "SmoothGrad"

    def __init__(self, model: nn.Module, n: int = 50, noise_level: float = 0.1, seed: int | None = None,
                 batch_size: int = 32):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(noise_level, (int, float)) or noise_level < 0:
            raise ValueError(f"noise_level must be a number >= 0, got {noise_level!r}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        super().__init__(model)
        self.n, self.noise_level, self.seed = n, float(noise_level), seed
        self.batch_size = _check_batch_size(batch_size)

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t = self.output_and_target(x, target)
        b = x.shape[0]
        flat = x.detach().reshape(b, -1)
        sigma = self.noise_level * (flat.amax(1) - flat.amin(1))
        gens = [None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)
                for _ in range(b)]
        total = torch.zeros_like(x)
        pairs = [(i, k) for i in range(b) for k in range(self.n)]
        for lo in range(0, len(pairs), self.batch_size):
            rows = [i for i, _ in pairs[lo:lo + self.batch_size]]
            noisy = torch.stack([x[i].detach() + sigma[i] * torch.randn(x.shape[1:], generator=gens[i],
                                                                        device=x.device, dtype=x.dtype)
                                 for i in rows])
            index = torch.as_tensor(rows, device=x.device)
            _, grad = self.input_gradient(noisy, t[index])
            total.index_add_(0, index, grad)
        return self._explanation(x, total / self.n, out, t, {"n": self.n, "sigma": sigma})


IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def integration_points(steps: int, method: str = "riemann_trapezoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes α_k in [0, 1] and weights w_k with ``∫_0^1 g(α) dα ≈ Σ_k w_k g(α_k)`` (float64).

    ``riemann_left``: α_k = k/n; ``riemann_right``: (k+1)/n; ``riemann_middle``: (k+½)/n, all w_k = 1/n;
    ``riemann_trapezoid``: α_k = k/(n−1), w = 1/(n−1) with the two end weights halved (n ≥ 2);
    ``gausslegendre``: the n-point Gauss-Legendre rule mapped from [−1, 1] to [0, 1] (α = (t+1)/2, w = w_t/2).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    k = torch.arange(steps, dtype=torch.float64)
    if method == "riemann_left":
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_right":
        return (k + 1) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_middle":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return k / (steps - 1), w
    if method == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(steps)
        return torch.as_tensor((t + 1) / 2), torch.as_tensor(w / 2)
    raise ValueError(f"method must be one of {IG_METHODS}, got {method!r}")


class IntegratedGradients(_GradientExplainer):
    """Integrated Gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"):
    ``R = (x − x₀) ⊙ ∫_0^1 ∂y_t/∂x (x₀ + α(x − x₀)) dα``
    ``  ≈ (x − x₀) ⊙ Σ_k w_k ∂y_t/∂x (x₀ + α_k(x − x₀))``
    with the nodes and weights of :func:`integration_points`.

    Completeness: ``Σ R ≈ y_t(x) − y_t(x₀)`` up to the quadrature error, reported per sample in
    ``extras["delta"] = Σ R − (y_t(x) − y_t(x₀))``. ``baseline`` x₀: a float or a tensor broadcastable to x
    (default 0). The B·steps interpolated inputs run in batches of ``batch_size``.
    """

    name = "IntegratedGradients"

    def __init__(self, model: nn.Module, steps: int = 50, baseline=0.0, method: str = "riemann_trapezoid",
                 batch_size: int = 32):
        integration_points(steps, method)  # validates steps and method
        if not isinstance(baseline, (int, float, torch.Tensor)) or isinstance(baseline, bool):
            raise TypeError(f"baseline must be a number or a tensor, got {type(baseline).__name__}")
        super().__init__(model)
        self.steps, self.baseline, self.method = steps, baseline, method
        self.batch_size = _check_batch_size(batch_size)

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(base, x.shape)
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(base.shape)} does not broadcast to the input's shape "
                             f"{tuple(x.shape)}; give a float, a tensor of x's shape or of x.shape[1:]") from None

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t = self.output_and_target(x, target)
        base = self._baseline(x)
        alphas, weights = integration_points(self.steps, self.method)
        b = x.shape[0]
        diff = x.detach() - base
        total = torch.zeros_like(x)
        pairs = [(i, k) for i in range(b) for k in range(self.steps)]
        for lo in range(0, len(pairs), self.batch_size):
            chunk = pairs[lo:lo + self.batch_size]
            index = torch.as_tensor([i for i, _ in chunk], device=x.device)
            a = torch.as_tensor([float(alphas[k]) for _, k in chunk], dtype=x.dtype, device=x.device)
            wk = torch.as_tensor([float(weights[k]) for _, k in chunk], dtype=x.dtype, device=x.device)
            shape = (-1,) + (1,) * (x.ndim - 1)
            points = base[index] + a.view(shape) * diff[index]
            _, grad = self.input_gradient(points, t[index])
            total.index_add_(0, index, wk.view(shape) * grad)
        relevance = diff * total
        with torch.no_grad():
            out_base = self.chain(base.contiguous())
        gap = out.gather(1, t[:, None])[:, 0] - out_base.gather(1, t[:, None])[:, 0]
        delta = relevance.reshape(b, -1).sum(1) - gap
        return self._explanation(x, relevance, out, t, {"delta": delta, "steps": self.steps, "method": self.method})
