"""``lrpkit demo``: every explainer on the bundled ViT and generated images with a known ground truth.

Each method explains the model's predicted class; the metrics (:mod:`lrpkit.evaluate`) compare the heatmaps with
the model (perturbation: ABPC by patch, RISE deletion / insertion) and with the ground-truth mask of the
class-deciding object (pointing game, relevance mass and rank accuracy). The figure shows the first images, their
masks and one heatmap per method.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import evaluate, methods, presets
from ..analyzer import LRP
from ..evaluate import report
from ..rules import ZBoxRule
from . import data, viz

#: The demo's metrics: those of ``lrpkit evaluate`` (name: (column title, larger is better)) without the MoRF and
#: LeRF areas, whose difference ABPC is shown.
METRICS = {k: v for k, v in report.METRICS.items() if k not in ("morf", "lerf")}


class _LRPMethod:
    def __init__(self, model, composite):
        self.lrp = LRP(model, composite)

    def __call__(self, x, target=None):
        return self.lrp(x, target)


def demo_methods(model, vitcx: bool = True, seed: int = 0) -> dict:
    """The explainers the demo compares: LRP presets and :mod:`lrpkit.methods`, by display name."""
    low = (0.0 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    high = (1.0 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    low, high = low.view(1, 3, 1, 1), high.view(1, 3, 1, 1)
    table = {
        "LRP CP-ε": _LRPMethod(model, presets.CPLRP()),
        "LRP CP-γ": _LRPMethod(model, presets.CPLRP(gamma=0.25)),
        "LRP CP-ε z^B": _LRPMethod(model, presets.CPLRP(first_layer=ZBoxRule(low, high))),
        "LRP AttnLRP": _LRPMethod(model, presets.AttnLRP()),
        "LRP EpsilonPlusFlat": _LRPMethod(model, presets.EpsilonPlusFlat()),
        "LRP EpsilonGammaBox": _LRPMethod(model, presets.EpsilonGammaBox(low, high)),
        "TransformerAttribution": methods.TransformerAttribution(model),
        "PartialLRP": methods.PartialLRP(model),
        "AttentionRollout": methods.AttentionRollout(model),
        "GradientRollout": methods.GradientRollout(model),
        "RawAttention": methods.RawAttention(model),
        "AttentionGradCAM": methods.AttentionGradCAM(model),
        "GenericAttention": methods.GenericAttention(model),
        "Gradient": methods.Gradient(model),
        "InputXGradient": methods.InputXGradient(model),
        "SmoothGrad": methods.SmoothGrad(model, n=16, seed=seed),
        "IntegratedGradients": methods.IntegratedGradients(model, steps=16),
    }
    if vitcx:
        table["ViT-CX"] = methods.ViTCX(model, seed=seed, progress=False)
    return table


def score_method(model, x01: torch.Tensor, masks: torch.Tensor, heatmap: torch.Tensor, target: torch.Tensor,
                 patch_size: int, batch_size: int = 256) -> dict:
    """Per-image metrics (each (B,)) of one method's heatmaps; perturbations in [0, 1] pixel space."""
    curves = evaluate.perturbation_curves(model, x01, heatmap, target, patch_size=patch_size, steps=16,
                                          preprocess=data.normalize, batch_size=batch_size)
    rise = evaluate.deletion_insertion(model, x01, heatmap, target, steps=32, preprocess=data.normalize,
                                       batch_size=batch_size)
    return {"abpc": curves.abpc, "deletion": rise.auc_deletion, "insertion": rise.auc_insertion,
            "pointing": evaluate.pointing_game(heatmap, masks),
            "mass": evaluate.relevance_mass_accuracy(heatmap, masks),
            "rank": evaluate.relevance_rank_accuracy(heatmap, masks)}


def run(n: int = 16, seed: int = 1000, size: int = 64, batch: int = 16, vitcx: bool = True, figure_rows: int = 4,
        out: str | Path = "lrpkit-out", log=print) -> tuple[dict, Path]:
    """Explain ``n`` generated images with every method; return ({method: {metric: (n,)}}, figure path)."""
    from .models import load_demo_vit

    torch.manual_seed(0)
    model = load_demo_vit()
    patch = model.patch_embed.patch_size[0]
    x01, labels, masks = data.make_dataset(n, seed=seed, size=size)
    with torch.no_grad():
        predicted = model(data.normalize(x01)).argmax(1)
    log(f"{n} generated images ({size}x{size} px), bundled ViT accuracy on them: "
        f"{(predicted == labels).float().mean().item():.1%}")
    results, heatmaps = {}, {}
    for name, method in demo_methods(model, vitcx=vitcx).items():
        start = time.perf_counter()
        maps = []
        for i in range(0, n, batch):
            maps.append(method(data.normalize(x01[i:i + batch]), predicted[i:i + batch]).heatmap.detach())
        heatmap = torch.cat(maps)
        results[name] = score_method(model, x01, masks, heatmap, predicted, patch)
        heatmaps[name] = heatmap[:figure_rows]
        log(f"  {name:<24} {time.perf_counter() - start:6.1f} s")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = viz.plot_grid(x01[:figure_rows], {"mask": masks[:figure_rows].float(), **heatmaps},
                           out / "demo.png", row_titles=[data.CLASS_NAMES[int(c)] for c in predicted[:figure_rows]])
    return results, figure


def _summary(values: torch.Tensor) -> str:
    """``mean ± std`` over the images where the metric is defined (relevance mass is undefined for a heatmap
    without positive relevance); the number of undefined images is appended."""
    values = values.float()
    defined = values[~values.isnan()]
    text = f"{defined.mean():.3f} ± {defined.std():.3f}" if defined.numel() > 1 else "n/a"
    missing = values.numel() - defined.numel()
    return text + (f" ({missing} n/a)" if missing else "")


def format_table(results: dict, markdown: bool = False) -> str:
    """Mean ± standard deviation over the images, one row per method."""
    header = ["method"] + [METRICS[m][0] for m in METRICS]
    rows = [[name] + [_summary(v[m]) for m in METRICS] for name, v in results.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)
