"""Deletion and insertion curves (RISE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._perturb import (auc, gaussian_blur, grid_shape, prepare, region_relevance, removal_rank, step_counts,
                       sweep)


@dataclass
class DeletionInsertion:
    """Result of :func:`deletion_insertion`; every field is a tensor.

    fractions (S+1,): fraction of pixels (regions) deleted / inserted at each step, from 0 to 1.
    deletion, insertion (B, S+1): tracked score per step.
    auc_deletion (B,): lower is better. auc_insertion (B,): higher is better.
    target (B,): the tracked class.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    auc_deletion: torch.Tensor
    auc_insertion: torch.Tensor
    target: torch.Tensor


def deletion_insertion(model: Callable, x: torch.Tensor, heatmap: torch.Tensor, target=None, *,
                       patch_size: int = 1, steps: int | None = None, baseline=0.0, blur_sigma: float = 5.0,
                       blurred: torch.Tensor | None = None, score: str = "probability", batch_size: int = 256,
                       preprocess: Callable | None = None) -> DeletionInsertion:
    """Deletion and insertion metrics of RISE (Petsiuk, Das, Saenko 2018).

    Pixels are ranked by decreasing relevance (ties: lower index first); with ``patch_size`` p > 1 square
    regions of p×p pixels ranked by their summed relevance are moved instead (default: single pixels, as RISE).
    With N units and S = ``steps`` (default min(N, 100)), step k moves the first c_k = round(k·N/S) units:

        deletion:  x_del^(k) = x with its c_k most relevant units set to ``baseline`` (default 0)
        insertion: x_ins^(k) = blur(x) with its c_k most relevant units replaced by those of x
        y_k = p_t(x^(k))  (softmax probability of the target; ``score`` may also be "logit" or "correct")
        AUC = Σ_k (φ_{k+1} - φ_k)(y_k + y_{k+1}) / 2,  φ_k = c_k / N

    Deletion AUC: lower is better; insertion AUC: higher is better. blur(x) is a Gaussian blur with standard
    deviation ``blur_sigma`` pixels (kernel cut at 3σ, replicated borders; RISE used an 11-tap kernel with σ = 5
    on 224-pixel images), or the given ``blurred`` tensor (same shape as x). ``target``: None (predicted class
    of the unperturbed image), an int or B ints. The B·(S+1) images of each curve go through the model in
    batches of ``batch_size`` under ``torch.no_grad()``; ``preprocess`` as in :func:`perturbation_curves`.

    Reference: Petsiuk, Das, Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box Models".
    """
    heatmap, base, t = prepare(model, x, heatmap, target, patch_size, baseline, preprocess, batch_size, score)
    h, w = x.shape[2], x.shape[3]
    gh, gw = grid_shape(h, w, patch_size)
    n = gh * gw
    counts = step_counts(n, min(n, 100) if steps is None else steps, x.device)
    fractions = counts.to(x.dtype) / n
    if blurred is None:
        blurred = gaussian_blur(x, float(blur_sigma))
    elif not isinstance(blurred, torch.Tensor) or blurred.shape != x.shape:
        raise ValueError(f"blurred must be a tensor of x's shape {tuple(x.shape)}, got "
                         f"{tuple(blurred.shape) if isinstance(blurred, torch.Tensor) else type(blurred).__name__}")
    blurred = blurred.to(device=x.device, dtype=x.dtype)
    rank = removal_rank(region_relevance(heatmap, patch_size, h, w), descending=True)
    dele = sweep(model, x, base, rank, patch_size, counts, t, score, batch_size, preprocess)
    ins = sweep(model, blurred, x, rank, patch_size, counts, t, score, batch_size, preprocess)
    return DeletionInsertion(fractions, dele, ins, auc(dele, fractions), auc(ins, fractions), t)
