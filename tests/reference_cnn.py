"""The ε → 0 reference of LRP-ε on CNNs, built without lrpkit (importable as ``reference_cnn``: pytest puts tests/ on
sys.path).

:func:`reference_model` returns a deep copy of a model whose module instances are patched, so that the plain
gradient × input of the copy is the limit that LRP-ε with every stabiliser → 0 must reach:

- every element-wise activation ``f`` computes ``x · (f(x)/x).detach()``: the same value, and the relevance passes
  through it unchanged (``f(x)/x`` backward); at ``x = 0`` the ratio is ``f'(0)`` as torch's gradient gives it;
- the gate of a squeeze-excitation / ECA module (its ``gate`` activation) returns its value detached, so that
  ``x ⊙ gate`` is linear in ``x`` and the squeeze branch gets no gradient;
- max pooling is left alone: torch's gradient passes to the argmax;
- BatchNorm in eval mode is affine already (its running statistics are constants).

Only instance attributes are changed (``forward`` of the activation instances, the ``gate`` attribute of the
attention modules); the classes and the user's model are untouched.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.Hardsigmoid, nn.Softplus, nn.SELU, nn.CELU)
try:
    from timm.layers import activations as _timm_act
except ImportError:  # pragma: no cover
    pass
else:
    ELEMENTWISE += tuple(getattr(_timm_act, n) for n in ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish",
                                                         "HardSigmoid", "GELU", "GELUTanh", "QuickGELU")
                         if hasattr(_timm_act, n))


def _ratio_forward(original):
    """``forward`` of an activation instance: ``x · (f(x)/x).detach()``, ratio ``f'(0)`` at ``x = 0``."""

    def forward(self, x):
        y = original(x)
        with torch.enable_grad():
            zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
            (slope,) = torch.autograd.grad(original(zero), zero)
        safe = torch.where(x == 0, torch.ones_like(x), x)
        ratio = torch.where(x == 0, slope.detach().expand_as(x), y / safe)
        return x * ratio.detach()

    return forward


class DetachedGate(nn.Module):
    """``gate(x).detach()``: the gate's value, held constant in the backward pass."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.inner = gate

    def forward(self, x):
        return self.inner(x).detach()


def reference_model(model: nn.Module) -> nn.Module:
    """A patched deep copy of ``model`` in eval mode (see the module docstring)."""
    ref = copy.deepcopy(model).eval()
    for m in list(ref.modules()):
        if isinstance(m, ELEMENTWISE):
            if getattr(m, "inplace", False):
                m.inplace = False
            m.forward = types.MethodType(_ratio_forward(m.forward), m)
        if hasattr(m, "gate") and type(m).__name__ in ("SEModule", "EcaModule", "SqueezeExcite"):
            m.gate = DetachedGate(m.gate)
    return ref


def reference_relevance(model: nn.Module, x: torch.Tensor, check_forward: bool = True):
    """(gradient × input of :func:`reference_model` for each sample's top class, the targets)."""
    ref = reference_model(model)
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    if check_forward:
        with torch.no_grad():
            expected = model(x)
        assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10 * expected.abs().max()), \
            "the patched reference computes another function"
    target = out.argmax(1)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xr)
    return (x * grad).detach(), target


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours − ref| / max |ref|``."""
    return float((ours - ref).abs().max() / ref.abs().max())
