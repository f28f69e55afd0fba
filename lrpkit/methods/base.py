"""What every explainer in :mod:`lrpkit.methods` shares: canonization once, input checks, the model family's
geometry (patch grid, prefix tokens, global attention)."""

from __future__ import annotations


import torch
from torch import nn

from .._inference import outside_inference_mode
from ..canonize import canonize
from ..layers import Chain, SelfAttention
from ..analyzer import check_tensor, dtype_device, warn_if_training
from ..families import family_of


class NotApplicableError(TypeError):
    """A method does not apply to this model (e.g. an attention method on a CNN, or a model that pools the
    tokens for a method that explains through the class token)."""


class Explainer:
    """Base class: ``Explainer(model)`` canonizes ``model`` once into ``self.chain`` (a frozen eval-mode copy; the
    user's model is never modified); ``explainer(x, target=None) -> Explanation``. Subclasses' ``__init__`` and
    ``__call__`` also work inside ``torch.inference_mode()`` (see :mod:`lrpkit._inference`)."""

    name = "Explainer"
    needs_attention = False

    def __init_subclass__(cls, **kwargs):
        # every explainer's construction and call run outside the caller's torch.inference_mode() (lrpkit._inference)
        super().__init_subclass__(**kwargs)
        for name in ("__init__", "__call__"):
            if name in vars(cls):
                setattr(cls, name, outside_inference_mode(vars(cls)[name]))

    @outside_inference_mode
    def __init__(self, model: nn.Module):
        warn_if_training(model, self.name)
        self.chain: Chain = canonize(model)
        self.family = family_of(model)
        self.geometry = self.family.geometry(model, self.chain)
        self.patch_size = self.geometry.patch_size
        if self.needs_attention and not self.geometry.global_attention:
            raise NotApplicableError(_no_global_attention(self.name, model, self.chain))
        self.dtype, self.device = dtype_device(self.chain)

    def check_input(self, x) -> None:
        """Clear errors for an input that is not a floating-point tensor of the model's dtype and device, or (for a
        patch-based model) not a batch of images (B, C, H, W)."""
        check_tensor(x, self.dtype, self.device)
        if self.patch_size is not None and x.ndim != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")

    def num_prefix(self) -> int:
        """Number of prefix tokens (class, distillation, register) before the patch tokens (the family's
        geometry)."""
        return self.geometry.num_prefix

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(grid_h, grid_w): the patch grid of input ``x`` (the family's geometry)."""
        return self.geometry.grid(x)

    def __call__(self, x: torch.Tensor, target=None):
        raise NotImplementedError


def windowed_attention(chain: Chain) -> list[nn.Module]:
    """The attention layers of ``chain`` that attend within groups of tokens (a :class:`SelfAttention` that
    overrides :meth:`~lrpkit.layers.SelfAttention.group`, as Swin's windows do)."""
    return [m for m in chain.modules()
            if isinstance(m, SelfAttention) and type(m).group is not SelfAttention.group]


def _no_global_attention(name: str, model: nn.Module, chain: Chain) -> str:
    """Why an attention method does not apply: windowed attention, or no attention at all."""
    windowed = windowed_attention(chain)
    if windowed:
        return (f"{name} needs global (token-to-token) attention, but {type(model).__name__} attends within windows "
                f"({type(windowed[0]).__name__}): windowed attention has no token-to-token path across windows, so "
                f"its attention maps do not combine into one map over the image. Use LRP (CPLRP, AttnLRP), a gradient "
                f"method or ViT-CX on this model")
    return f"{name} needs a vision transformer (a model with self-attention layers); got {type(model).__name__}"
