"""Explainers that work inside the caller's ``torch.inference_mode()``.

Under inference mode autograd records nothing, and ``torch.enable_grad()`` does not bring it back, so every
explainer that takes a gradient (or, in LRP, keeps a graph for a layer without a closed form, such as max pooling)
would fail with autograd's "element 0 of tensors does not require grad". An explanation is not a training step:
the explainers leave inference mode for the duration of a call (and of their construction, so that the modified
layers they build are ordinary tensors). A tensor argument made under inference mode cannot enter autograd and is
copied; everything the explainer returns is an ordinary tensor.
"""

from __future__ import annotations

import functools

import torch


def _ordinary(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def outside_inference_mode(fn):
    """Decorate a method so that it runs outside the caller's ``torch.inference_mode()`` (see the module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*map(_ordinary, args), **{k: _ordinary(v) for k, v in kwargs.items()})

    return wrapper
