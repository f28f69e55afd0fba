"""Pieces of the tests' references that are built from a timm model by patching its instances, independently of
lrpkit's layers (importable as ``reference_patches``: pytest puts tests/ on sys.path). The family tests
(tests/test_family_timm_*.py, tests/test_vit_lrp.py) compose them into gradient × input of a patched model, the
limit that LRP with every stabiliser → 0 must reach:

- :func:`half_grad`: a factor of a product whose gradient is halved (AttnLRP's uniform rule for products);
- :func:`ratio` / :func:`ratio_forward`: an element-wise activation that passes ``f(x)/x`` backward, as LRP passes
  its relevance unchanged;
- :func:`layer_norm_detached`: a LayerNorm with σ held constant;
- :func:`gradient_times_input`: the reference relevance of a patched copy, checked to compute the model's output.

(:mod:`reference_cnn` is the CNN counterpart; there an activation's ratio at ``x = 0`` is torch's ``f'(0)``.)
"""

from __future__ import annotations

import torch


def half_grad(t: torch.Tensor) -> torch.Tensor:
    """Identity forward, half the gradient backward (the uniform rule's share for one factor of a product)."""
    return 0.5 * t + 0.5 * t.detach()


def ratio(fn, x: torch.Tensor) -> torch.Tensor:
    """``x · (f(x)/x).detach()``: the activation passes f(x)/x backward (0 at x = 0, where LRP passes R = 0)."""
    y = fn(x)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return x * torch.where(x == 0, torch.zeros_like(x), y / safe).detach()


def ratio_forward(self, x: torch.Tensor) -> torch.Tensor:
    """:func:`ratio` of an activation instance's own class ``forward``: patched in as the instance's forward."""
    return ratio(lambda z: type(self).forward(self, z), x)


def layer_norm_detached(self, x: torch.Tensor) -> torch.Tensor:
    """The forward of a LayerNorm instance with σ detached (μ keeps its gradient), affine part included; a timm
    ``LayerNorm2d`` normalises the channels of a (B, C, H, W) map, moved last and back."""
    from timm.layers import LayerNorm2d

    channels_first = isinstance(self, LayerNorm2d)
    if channels_first:
        x = x.permute(0, 2, 3, 1)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps).detach()
    y = (x - x.mean(-1, keepdim=True)) / sigma
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y.permute(0, 3, 1, 2) if channels_first else y


def gradient_times_input(ref, model, x: torch.Tensor, leaves=()):
    """``(x ⊙ ∂y_t/∂x, t, [∂y_t/∂leaf for each of leaves])`` of ``ref``, a patched copy of ``model``, with ``t`` its
    argmax per sample; ``ref``'s output must be ``model``'s. ``leaves``: tensors the patched forward of ``ref`` appends
    to a list (read after the forward pass); a leaf the output does not depend on has gradient None."""
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    with torch.no_grad():
        assert torch.allclose(out, model(x), rtol=1e-10, atol=1e-12)  # the patched model is the model
    target = out.argmax(1)
    grad, *rest = torch.autograd.grad(out.gather(1, target[:, None]).sum(), [xr, *leaves], allow_unused=True)
    return x * grad, target, rest
