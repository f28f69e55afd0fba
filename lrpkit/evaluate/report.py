"""The outputs of :func:`~lrpkit.evaluate.runner.run_evaluation` made from its rows: :data:`METRICS` (the
per-image metrics), :func:`summarize` (mean, sample std and count per method and metric), :func:`format_summary`
(the printable table), :func:`plot_curves` (``curves.png``) and the CSV table (``results.csv``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

__all__ = ["METRICS", "summarize", "format_summary", "plot_curves"]

#: Per-image metrics: name -> (column title, larger is better).
METRICS: dict[str, tuple[str, bool]] = {
    "abpc": ("ABPC ↑", True),
    "morf": ("MoRF ↓", False),
    "lerf": ("LeRF ↑", True),
    "deletion": ("deletion ↓", False),
    "insertion": ("insertion ↑", True),
    "pointing": ("pointing ↑", True),
    "mass": ("mass ↑", True),
    "rank": ("rank ↑", True),
}
CSV_COLUMNS = ("image", "method", "label", "target", "has_mask") + tuple(METRICS)


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per method and metric: ``{"mean", "std", "n"}`` over the rows where the metric is defined (not None/NaN);
    std is the sample standard deviation sqrt(Σ(v − mean)² / (n − 1)), None for n < 2; mean None for n = 0.
    Also ``"images"`` (rows of the method) and the mean MoRF / LeRF curves (``"morf_curve"``, ``"lerf_curve"``).

    Example: values 1, 2, 3 give mean 2, std sqrt((1 + 0 + 1) / 2) = 1, n 3.
    """
    out: dict = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        stats = {"images": len(mine)}
        for metric in METRICS:
            vals = [float(r[metric]) for r in mine if r.get(metric) is not None and not math.isnan(r[metric])]
            n = len(vals)
            mean = sum(vals) / n if n else None
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
            stats[metric] = {"mean": mean, "std": std, "n": n}
        for curve in ("morf_curve", "lerf_curve"):
            curves = [r[curve] for r in mine if r.get(curve)]
            stats[curve] = ([sum(c[k] for c in curves) / len(curves) for k in range(len(curves[0]))]
                            if curves else None)
        out[m] = stats
    return out


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['mean']:.3f}" if s["std"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def format_summary(summary: dict, markdown: bool = False) -> str:
    """The summary as a table: one row per method, ``mean ± std`` per metric (3 decimals) and the image count.
    A metric defined on fewer images than the method has (no mask, no positive relevance) shows ``(n=k)``."""
    header = ["method", "images"] + [METRICS[m][0] for m in METRICS]
    rows = []
    for name, s in summary.items():
        cells = [name, str(s["images"])]
        for m in METRICS:
            text = _cell(s[m])
            if 0 < s[m]["n"] < s["images"]:
                text += f" (n={s[m]['n']})"
            cells.append(text)
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def plot_curves(summary: dict, fractions: list[float], path: str | Path, ylabel: str = "target logit") -> Path:
    """A PNG with two panels, the mean MoRF and the mean LeRF curve (tracked score vs fraction of regions
    removed), one line per method in the same colour on both panels. Uses matplotlib's Agg canvas directly
    (no pyplot, the user's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    titles = {"morf_curve": "MoRF (most relevant removed first; lower is better)",
              "lerf_curve": "LeRF (least relevant removed first; higher is better)"}
    for ax, key in zip(axes, titles):
        for k, (name, s) in enumerate(summary.items()):
            if s.get(key):
                ax.plot(fractions, s[key], label=name, color=f"C{k % 10}", linestyle="-" if k < 10 else "--")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("fraction of regions removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean {ylabel}")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            cells = []
            for c in CSV_COLUMNS:
                v = r.get(c)
                cells.append("" if v is None else (repr(float(v)) if isinstance(v, float) else str(v)))
            w.writerow(cells)
