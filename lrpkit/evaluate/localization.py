"""Localisation of relevance against a ground-truth mask: pointing game, relevance mass and rank accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validate import check_heatmap, check_mask


def _inputs(heatmap, mask):
    if not isinstance(heatmap, torch.Tensor):
        raise TypeError(f"heatmap must be a torch.Tensor, got {type(heatmap).__name__}")
    heatmap = check_heatmap(heatmap, heatmap.shape[0] if heatmap.dim() else 0)
    return heatmap, check_mask(mask, heatmap)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within Euclidean distance ``radius`` of the mask (disc structuring element)."""
    t = torch.arange(-radius, radius + 1, device=mask.device)
    disc = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius * radius).float()
    hit = F.conv2d(mask[:, None].float(), disc[None, None], padding=radius)
    return hit[:, 0] > 0


def pointing_game(heatmap: torch.Tensor, mask: torch.Tensor, *, tolerance: int = 0,
                  ties: str = "mean") -> torch.Tensor:
    """Pointing game: does the relevance maximum fall inside the ground-truth mask?  Returns (B,) floats.

        hit_b = [argmax_p R_b(p) ∈ M_b]

    ``tolerance`` (pixels) counts a maximum within that Euclidean distance of the mask as a hit (Zhang et al.
    use 15 px on 224-pixel images; default 0). When several pixels share the maximum value, ``ties`` decides:
    ``"mean"`` (default) gives the share of maximal pixels inside the mask, the expected hit when the tie is
    broken uniformly at random (so a constant heatmap scores the mask's area fraction); ``"any"`` counts a hit
    if one of them is inside, ``"all"`` only if all are. With a unique maximum all three give 0 or 1.

    References: Zhang et al. 2016/2018, "Top-down neural attention by excitation backprop";
    Arras, Osman, Samek 2022, "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of neural network
    explanations".
    """
    heatmap, mask = _inputs(heatmap, mask)
    if ties not in ("mean", "any", "all"):
        raise ValueError(f"ties must be 'mean', 'any' or 'all', got {ties!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int, got {tolerance!r}")
    if tolerance > 0:
        mask = _dilate(mask, tolerance)
    flat, m = heatmap.flatten(1), mask.flatten(1)
    is_max = flat == flat.max(1, keepdim=True).values
    inside = (is_max & m).sum(1)
    if ties == "mean":
        return inside.to(heatmap.dtype) / is_max.sum(1).to(heatmap.dtype)
    if ties == "any":
        return (inside > 0).to(heatmap.dtype)
    return (inside == is_max.sum(1)).to(heatmap.dtype)


def relevance_mass_accuracy(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relevance mass accuracy: the share of positive relevance that lies inside the mask. Returns (B,).

        mass_b = Σ_{p ∈ M_b} max(R_b(p), 0) / Σ_p max(R_b(p), 0)

    In [0, 1], higher is better; NaN for a sample without positive relevance.

    Reference: Arras, Osman, Samek 2022, "CLEVR-XAI", §4.2.
    """
    heatmap, mask = _inputs(heatmap, mask)
    pos = heatmap.clamp(min=0).flatten(1)
    total = pos.sum(1)
    inside = (pos * mask.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(pos.dtype).tiny),
                       torch.full_like(total, math.nan))


def relevance_rank_accuracy(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relevance rank accuracy: of the K most relevant pixels, K = |M|, the share inside the mask. Returns (B,).

        rank_b = |top_K(R_b) ∩ M_b| / K,   K = |M_b|

    Pixels tied with the K-th largest value fill the remaining places of the top K in proportion, the
    expectation under random tie-breaking: with t the K-th largest value, G = {R > t}, E = {R = t},
        rank_b = (|G ∩ M| + (K - |G|)·|E ∩ M| / |E|) / K.
    In [0, 1], higher is better; NaN for an empty mask.

    Reference: Arras, Osman, Samek 2022, "CLEVR-XAI", §4.2.
    """
    heatmap, mask = _inputs(heatmap, mask)
    flat, m = heatmap.flatten(1), mask.flatten(1)
    k = m.sum(1)
    dtype = heatmap.dtype
    if flat.shape[1] == 0:
        return torch.full((flat.shape[0],), math.nan, dtype=dtype, device=flat.device)
    sorted_desc = flat.sort(1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).clamp(min=0)[:, None])  # K-th largest value
    greater, equal = flat > kth, flat == kth
    n_greater = greater.sum(1).to(dtype)
    share_equal = (equal & m).sum(1).to(dtype) / equal.sum(1).clamp(min=1).to(dtype)
    hits = (greater & m).sum(1).to(dtype) + (k.to(dtype) - n_greater) * share_equal
    kf = k.to(dtype)
    return torch.where(k > 0, hits / kf.clamp(min=1), torch.full_like(kf, math.nan))
