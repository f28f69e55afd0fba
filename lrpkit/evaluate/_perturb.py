"""The engine behind the perturbation metrics: rank regions by relevance, then run batched sweeps.

A sweep moves each image from a ``start`` image towards an ``end`` image region by region, in a per-sample order;
at step k the first ``counts[k]`` regions of the order show ``end``, the others ``start``. Deletion / MoRF /
LeRF / Chefer's protocol use start = x and end = baseline; insertion uses start = blurred x and end = x.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ._validate import check_heatmap, check_images, check_positive_int, check_target

SCORES = ("logit", "probability", "correct")


def grid_shape(h: int, w: int, region: int) -> tuple[int, int]:
    """Number of square regions of side ``region`` along each axis (the last ones may be cut by the border)."""
    return math.ceil(h / region), math.ceil(w / region)


def region_relevance(heatmap: torch.Tensor, region: int, h: int, w: int) -> torch.Tensor:
    """Sum of the heatmap over each region: (B, H, W) -> (B, gh·gw); a (B, gh, gw) map is taken as it is."""
    gh, gw = grid_shape(h, w, region)
    if heatmap.shape[1:] == (gh, gw):
        return heatmap.reshape(heatmap.shape[0], -1)
    padded = F.pad(heatmap, (0, gw * region - w, 0, gh * region - h))
    return padded.reshape(-1, gh, region, gw, region).sum((2, 4)).reshape(heatmap.shape[0], -1)


def removal_rank(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """rank[b, n] = position of region n in sample b's removal order (ties: lower index first)."""
    order = torch.argsort(scores, dim=1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def prepare(model, x, heatmap, target, region, baseline, preprocess, batch_size, score):
    """Validate the common arguments; return (heatmap on x's device, baseline image, target (B,))."""
    region = check_positive_int(region, "patch_size")
    check_positive_int(batch_size, "batch_size")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    b, _, h, w = check_images(x).shape
    heatmap = check_heatmap(heatmap, b, [(h, w), grid_shape(h, w, region)], device=x.device)
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        base = base.expand_as(x)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(base.shape)} does not broadcast to x {tuple(x.shape)}") from None
    t = check_target(target, b, x.device)
    if t is None:
        t = torch.cat([forward(model, x[i:i + batch_size], preprocess).argmax(1)
                       for i in range(0, b, batch_size)])
    return heatmap, base, t


def forward(model, x: torch.Tensor, preprocess: Callable | None) -> torch.Tensor:
    with torch.no_grad():
        out = model(preprocess(x) if preprocess is not None else x)
    if out.dim() != 2:
        raise ValueError(f"the model must return logits (B, classes), got shape {tuple(out.shape)}")
    return out


def pick(logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """The tracked quantity: target logit, target softmax probability, or 1.0 where the top-1 class is target."""
    if score == "logit":
        return logits.gather(1, target[:, None])[:, 0]
    if score == "probability":
        return logits.softmax(1).gather(1, target[:, None])[:, 0]
    return (logits.argmax(1) == target).to(logits.dtype)


def sweep(model, start: torch.Tensor, end: torch.Tensor, rank: torch.Tensor, region: int, counts: torch.Tensor,
          target: torch.Tensor, score: str, batch_size: int, preprocess: Callable | None) -> torch.Tensor:
    """Scores (B, K) of the images at every step; all B·K images go through the model in chunks of batch_size."""
    b, _, h, w = start.shape
    gh, gw = grid_shape(h, w, region)
    rank = rank.view(b, gh, gw)
    k = counts.numel()
    out = torch.empty(b * k, dtype=start.dtype, device=start.device)
    for lo in range(0, b * k, batch_size):
        j = torch.arange(lo, min(lo + batch_size, b * k), device=start.device)
        bi, ki = j // k, j % k
        shown = rank[bi] < counts[ki].view(-1, 1, 1)  # (n, gh, gw): regions showing `end`
        shown = shown.repeat_interleave(region, 1).repeat_interleave(region, 2)[:, None, :h, :w]
        images = torch.where(shown, end[bi], start[bi])
        out[lo:lo + len(j)] = pick(forward(model, images, preprocess), target[bi], score)
    return out.view(b, k)


def step_counts(n: int, steps: int, device) -> torch.Tensor:
    """counts[k] = round(k·n / steps), k = 0..steps (0 and n included)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an int in [1, {n}] (the number of regions), got {steps!r}")
    return torch.round(torch.arange(steps + 1, device=device, dtype=torch.float64) * n / steps).long()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, standard deviation ``sigma`` pixels, kernel cut at 3σ,
    replicated borders. sigma = 0 returns x unchanged."""
    if sigma < 0:
        raise ValueError(f"blur_sigma must be non-negative, got {sigma}")
    if sigma == 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def auc(y: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid rule along the last dim: Σ_k (f_{k+1} - f_k)·(y_k + y_{k+1}) / 2."""
    return torch.trapezoid(y, fractions.to(y.dtype), dim=-1)
