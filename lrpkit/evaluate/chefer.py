"""The positive / negative perturbation test of Chefer, Gur, Wolf (2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._perturb import auc, prepare, removal_rank, sweep

CHEFER_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class CheferCurve:
    """Result of :func:`chefer_perturbation`; every field is a tensor.

    fractions (K,): removed pixel fractions (0, 0.1, …, 0.9 by default).
    correct (B, K): 1.0 where the perturbed image's top-1 class equals the target.
    accuracy (K,): mean of ``correct`` over the batch.
    auc (): trapezoid area under ``accuracy`` over ``fractions``.
    target (B,): the class checked against.
    """

    fractions: torch.Tensor
    correct: torch.Tensor
    accuracy: torch.Tensor
    auc: torch.Tensor
    target: torch.Tensor


def chefer_perturbation(model: Callable, x: torch.Tensor, heatmap: torch.Tensor, target=None, *,
                        mode: str = "positive", fractions: Sequence[float] = CHEFER_FRACTIONS, baseline=0.0,
                        batch_size: int = 256, preprocess: Callable | None = None) -> CheferCurve:
    """Chefer et al.'s perturbation test: remove 10 %, …, 90 % of the pixels and track top-1 accuracy.

    The pixels are ordered by the heatmap (B, H, W): ``mode="positive"`` removes the most relevant first (a
    good explanation makes accuracy fall fast: lower AUC is better), ``"negative"`` the least relevant first
    (higher AUC is better). At fraction φ the first ⌊φ·H·W⌋ pixels of the order are set to ``baseline`` in
    all channels. The protocol sets them to 0 in [0, 1] pixel space: pass x in [0, 1] and the model's
    normalisation as ``preprocess`` (e.g. ``lrpkit.data.normalize``), or pass ``baseline`` in the model's input
    space. Then

        acc(φ) = (1/B) Σ_b [argmax f(x_b^(φ)) = t_b]
        AUC = Σ_k (φ_{k+1} - φ_k)(acc(φ_k) + acc(φ_{k+1})) / 2   over φ = 0, 0.1, …, 0.9 (0 = unperturbed)

    so AUC ∈ [0, 0.9]; papers quote it in percent (×100). ``target``: the labels (accuracy against ground
    truth) or None (the predicted class of the unperturbed image, so acc(0) = 1). Forwards are batched
    (``batch_size``) under ``torch.no_grad()`` on x's device.

    Reference: Chefer, Gur, Wolf 2021, "Transformer Interpretability Beyond Attention Visualization", §4.
    """
    if mode not in ("positive", "negative"):
        raise ValueError(f"mode must be 'positive' or 'negative', got {mode!r}")
    heatmap, base, t = prepare(model, x, heatmap, target, 1, baseline, preprocess, batch_size, "correct")
    if heatmap.shape[1:] != x.shape[2:]:
        raise ValueError(f"heatmap must be per pixel, shape {tuple(x.shape[:1] + x.shape[2:])}, "
                         f"got {tuple(heatmap.shape)}")
    phi = torch.as_tensor(list(fractions), dtype=torch.float64)
    if phi.dim() != 1 or phi.numel() < 2 or (phi < 0).any() or (phi > 1).any() or (phi.diff() <= 0).any():
        raise ValueError(f"fractions must be an increasing sequence of at least 2 values in [0, 1], got {fractions}")
    n = x.shape[2] * x.shape[3]
    counts = torch.floor(phi * n + 1e-9).long().to(x.device)
    rank = removal_rank(heatmap.reshape(x.shape[0], -1), descending=(mode == "positive"))
    correct = sweep(model, x, base, rank, 1, counts, t, "correct", batch_size, preprocess)
    accuracy = correct.mean(0)
    phi = phi.to(device=x.device, dtype=x.dtype)
    return CheferCurve(phi, correct, accuracy, auc(accuracy, phi), t)
