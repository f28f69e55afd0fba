"""Input checks shared by the metrics: each raises a clear error naming the argument and the problem."""

from __future__ import annotations

import torch


def check_images(x) -> torch.Tensor:
    """x must be a floating tensor (B, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_heatmap(heatmap, batch: int, allowed: list[tuple[int, int]] | None = None, device=None,
                  name: str = "heatmap") -> torch.Tensor:
    """heatmap must be a finite floating tensor (B, h, w) with (h, w) in ``allowed`` (if given)."""
    if not isinstance(heatmap, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(heatmap).__name__}")
    if heatmap.dim() != 3:
        hint = " (sum the relevance over channels first: relevance.sum(1))" if heatmap.dim() == 4 else ""
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(heatmap.shape)}{hint}")
    if not heatmap.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {heatmap.dtype}")
    if heatmap.shape[0] != batch:
        raise ValueError(f"{name} has batch size {heatmap.shape[0]} but the images have {batch}")
    if allowed is not None and tuple(heatmap.shape[1:]) not in [tuple(a) for a in allowed]:
        raise ValueError(f"{name} has spatial shape {tuple(heatmap.shape[1:])}; expected one of "
                         f"{[tuple(a) for a in allowed]}")
    if not torch.isfinite(heatmap).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return heatmap if device is None else heatmap.to(device)


def check_mask(mask, heatmap: torch.Tensor) -> torch.Tensor:
    """mask must be a bool tensor with the heatmap's shape."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != heatmap.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match heatmap shape {tuple(heatmap.shape)}")
    return mask.to(heatmap.device)


def check_target(target, batch: int, device) -> torch.Tensor | None:
    """None, an int, or a sequence / tensor of B ints -> int64 tensor (B,) on ``device`` (or None)."""
    if target is None:
        return None
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    t = torch.as_tensor(target, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"target must be None, an int, or B={batch} integers, got {tuple(t.shape)} of {t.dtype}")
    return t.long()


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
