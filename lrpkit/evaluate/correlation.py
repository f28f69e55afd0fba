"""Rank correlation of heatmaps."""

from __future__ import annotations

import torch


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last dim, tied values getting the mean of their ranks (as scipy's 'average')."""
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    values, order = flat.sort(dim=1, stable=True)
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(values).contiguous()
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.cumsum(1) - 1  # group id of each sorted entry, per row
    total = torch.zeros_like(pos).scatter_add_(1, group, pos)
    count = torch.zeros_like(pos).scatter_add_(1, group, torch.ones_like(pos))
    mean_rank = (total / count.clamp(min=1)).gather(1, group)
    ranks = torch.empty_like(mean_rank).scatter_(1, order, mean_rank)
    return ranks.reshape(x.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample of two batches of maps (B, ...) -> (B,).

        ρ = Pearson(rank(a), rank(b)) = cov(r_a, r_b) / (σ(r_a) σ(r_b)),  average ranks for ties

    NaN where a map is constant (its ranks have no variance).

    Reference: Spearman 1904, "The proof and measurement of association between two things".
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("spearman expects two tensors")
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"spearman expects two batches (B, ...) of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    ra = rankdata(a.detach().flatten(1))
    rb = rankdata(b.detach().flatten(1).to(a.device))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    out = (ra * rb).sum(1) / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).to(
        a.dtype if a.is_floating_point() else torch.float32)
