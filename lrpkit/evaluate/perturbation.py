"""Region perturbation curves: most-relevant-first (MoRF), least-relevant-first (LeRF) and the area between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._perturb import auc, grid_shape, prepare, region_relevance, removal_rank, step_counts, sweep


@dataclass
class PerturbationCurves:
    """Result of :func:`perturbation_curves`; every field is a tensor.

    fractions (S+1,): removed fraction of the regions at each step, from 0 to 1.
    morf, lerf (B, S+1): tracked score per step, column 0 the unperturbed image.
    auc_morf, auc_lerf (B,): trapezoid areas under the curves over ``fractions``.
    abpc (B,): auc_lerf - auc_morf (larger is better).
    target (B,): the tracked class.
    """

    fractions: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    auc_morf: torch.Tensor
    auc_lerf: torch.Tensor
    abpc: torch.Tensor
    target: torch.Tensor


def perturbation_curves(model: Callable, x: torch.Tensor, heatmap: torch.Tensor, target=None, *,
                        patch_size: int = 16, steps: int | None = None, baseline=0.0, score: str = "logit",
                        batch_size: int = 256, preprocess: Callable | None = None) -> PerturbationCurves:
    """Region perturbation (Samek et al. 2017) in both orders, and the area between the curves (ABPC).

    The image is cut into square regions of side ``patch_size`` (for a ViT its patch, the token's receptive
    field; regions at the border are cut when the size does not divide the image). Region relevance
    r_n = Σ_{p ∈ n} heatmap[p] (a heatmap already of shape (B, gh, gw) is used as the region relevance).
    For MoRF the regions are removed in order of decreasing r_n, for LeRF increasing (ties: lower region index
    first); removing sets the region to ``baseline`` (a scalar or a tensor broadcastable to x, in the space of
    x; default 0). With N regions and S = ``steps`` (default N), step k removes the first round(k·N/S) regions:

        y_k = f_t(x^(k)),  k = 0 … S   (y_0: the unperturbed image)
        AUC = Σ_k (φ_{k+1} - φ_k)(y_k + y_{k+1}) / 2,   φ_k = round(k·N/S) / N ∈ [0, 1]
        ABPC = AUC_LeRF - AUC_MoRF     (larger is better)

    f_t is the target's logit (``score="logit"``), softmax probability (``"probability"``) or top-1 hit
    (``"correct"``). ``target``: None (the predicted class of the unperturbed image), an int or B ints.
    All B·(S+1) perturbed images of an order are evaluated in forwards of ``batch_size`` images, under
    ``torch.no_grad()``, on x's device; the model is called as ``model(preprocess(images))`` when ``preprocess``
    is given (then x and ``baseline`` live in the space before preprocessing, e.g. [0, 1] pixels).

    References: Samek et al. 2017, "Evaluating the visualization of what a deep neural network has learned"
    (MoRF, AOPC); Schulz et al. 2020, "Restricting the flow" (MoRF/LeRF, their difference); Blücher et al. 2024,
    "Decoupling pixel flipping and occlusion strategy" (the name ABPC).
    """
    heatmap, base, t = prepare(model, x, heatmap, target, patch_size, baseline, preprocess, batch_size, score)
    gh, gw = grid_shape(x.shape[2], x.shape[3], patch_size)
    n = gh * gw
    counts = step_counts(n, n if steps is None else steps, x.device)
    fractions = counts.to(x.dtype) / n
    rel = region_relevance(heatmap, patch_size, x.shape[2], x.shape[3])
    curves = {}
    for name, descending in (("morf", True), ("lerf", False)):
        rank = removal_rank(rel, descending)
        curves[name] = sweep(model, x, base, rank, patch_size, counts, t, score, batch_size, preprocess)
    a_morf, a_lerf = auc(curves["morf"], fractions), auc(curves["lerf"], fractions)
    return PerturbationCurves(fractions, curves["morf"], curves["lerf"], a_morf, a_lerf, a_lerf - a_morf, t)
