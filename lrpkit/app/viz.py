"""Heatmaps of relevance: diverging colour maps centred at zero, overlays, token maps and figure grids.

LRP convention: red is positive relevance, blue negative, white zero. Scaling is symmetric per sample:
r̂ = clip(R / v, -1, 1) with v the maximum (or a percentile) of |R|, and r̂ ∈ [-1, 1] is mapped to the colour
map at (r̂ + 1) / 2, so R = 0 always lands on the map's centre (white for the default ``"bwr"``).
matplotlib provides the colour maps and the figures (the object API with the Agg canvas: no screen needed, and
no global pyplot state is touched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_heatmap", "scale_relevance", "relevance_to_rgb", "overlay", "upsample_tokens", "save_png",
           "plot_grid", "concept_panels", "concept_grid"]

# An odd number of colour-map entries puts the exact centre colour at r̂ = 0.
_LUT = 255


def _batched(x: torch.Tensor, dims: int, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == dims - 1:
        return x[None], True
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims - 1} or {dims} dims, got shape {tuple(x.shape)}")
    return x, False


def to_heatmap(relevance: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Input relevance (B, C, H, W) -> heatmap (B, H, W): h = Σ_c R_c (``"sum"``, conserves relevance),
    the mean over channels (``"mean"``) or Σ_c |R_c| (``"abs"``). A (B, H, W) input is returned as is.

    Reference: Montavon et al. 2019, "Layer-wise relevance propagation: an overview" (pixel relevance as the
    sum over colour channels)."""
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"relevance must be a torch.Tensor, got {type(relevance).__name__}")
    if relevance.dim() == 3:
        return relevance
    if relevance.dim() != 4:
        raise ValueError(f"relevance must be (B, C, H, W) or (B, H, W), got {tuple(relevance.shape)}")
    if reduce == "sum":
        return relevance.sum(1)
    if reduce == "mean":
        return relevance.mean(1)
    if reduce == "abs":
        return relevance.abs().sum(1)
    raise ValueError(f"reduce must be 'sum', 'mean' or 'abs', got {reduce!r}")


def scale_relevance(relevance: torch.Tensor, percentile: float = 100.0) -> torch.Tensor:
    """Symmetric per-sample scaling to [-1, 1]: r̂ = clip(R / v, -1, 1), v = percentile of |R| (100: max |R|).

    Zero stays zero; a sample with v = 0 maps to all zeros. Input (B, H, W) or (H, W), same shape out."""
    r, single = _batched(relevance, 3, "relevance")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    r = r.float() if not r.is_floating_point() else r
    a = r.abs().flatten(1)
    v = a.amax(1) if percentile == 100 else torch.quantile(a.double(), percentile / 100, dim=1).to(r.dtype)
    out = torch.where(v[:, None, None] > 0, r / v.clamp(min=torch.finfo(r.dtype).tiny)[:, None, None],
                      torch.zeros_like(r)).clamp(-1, 1)
    return out[0] if single else out


def relevance_to_rgb(relevance: torch.Tensor, cmap: str = "bwr", percentile: float = 100.0) -> torch.Tensor:
    """Relevance (B, H, W) or (H, W) -> RGB image (B, 3, H, W) or (3, H, W) in [0, 1], on the input's device.

        rgb = cmap((r̂ + 1) / 2),  r̂ = :func:`scale_relevance`(R, percentile)

    With the default ``"bwr"``: R = 0 -> white (1, 1, 1), R = +v -> red (1, 0, 0), R = -v -> blue (0, 0, 1).
    Any matplotlib colour-map name works; use a diverging one so that zero stays neutral.

    Reference: Montavon, Samek, Müller 2018, "Methods for interpreting and understanding deep neural networks"
    (the red/blue heatmap convention of LRP)."""
    import matplotlib

    r, single = _batched(relevance, 3, "relevance")
    scaled = scale_relevance(r, percentile)
    cm = matplotlib.colormaps[cmap].resampled(_LUT)
    rgba = cm(((scaled.detach().double().cpu().numpy() + 1.0) / 2.0))
    rgb = torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).float().permute(0, 3, 1, 2).to(r.device)
    return rgb[0] if single else rgb


def overlay(image: torch.Tensor, relevance: torch.Tensor, alpha: float = 0.8, cmap: str = "bwr",
            percentile: float = 100.0) -> torch.Tensor:
    """Heatmap over an image: out = (1 - α|r̂|)·image + α|r̂|·rgb(r̂), so zero relevance leaves the image visible.

    image (B, 3, H, W) or (3, H, W) in [0, 1]; relevance (B, H, W) or (H, W) of the same size (token maps:
    :func:`upsample_tokens` first). Returns the image's shape, in [0, 1], on the image's device."""
    img, single = _batched(image, 4, "image")
    r, _ = _batched(relevance, 3, "relevance")
    if img.shape[1] != 3 or r.shape[0] != img.shape[0] or r.shape[1:] != img.shape[2:]:
        raise ValueError(f"image (B, 3, H, W) and relevance (B, H, W) do not match: {tuple(img.shape)} vs "
                         f"{tuple(r.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r = r.to(img.device)
    w = alpha * scale_relevance(r, percentile).abs()[:, None].to(img.dtype)
    out = ((1 - w) * img + w * relevance_to_rgb(r, cmap, percentile).to(img.dtype)).clamp(0, 1)
    return out[0] if single else out


def upsample_tokens(tokens: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Per-token relevance (B, gh, gw), or (B, N) with N a perfect square, -> (B, H, W) by nearest upsampling:
    each token's value fills its patch (H / gh × W / gw pixels), so the token's relevance is not smeared."""
    t = tokens
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        g = int(round(t.shape[1] ** 0.5))
        if g * g != t.shape[1]:
            raise ValueError(f"(B, N) token maps need a square number of tokens, got N={t.shape[1]} (drop the "
                             "class token, or reshape to (B, gh, gw))")
        t = t.reshape(t.shape[0], g, g)
    if t.dim() != 3:
        raise ValueError(f"tokens must be (B, gh, gw) or (B, N), got {tuple(tokens.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return F.interpolate(t[:, None].to(dtype), size=size, mode="nearest")[:, 0]


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one RGB image (3, H, W) in [0, 1] to a PNG file; returns the path."""
    import matplotlib.image

    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a tensor (3, H, W), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, _hwc(image), format="png")
    return path


def plot_grid(images: torch.Tensor, heatmaps: Mapping[str, torch.Tensor], path: str | Path, *,
              cmap: str = "bwr", percentile: float = 99.5, row_titles: list[str] | None = None,
              cell_size: float = 1.6, dpi: int = 100) -> Path:
    """Save a PNG grid: one row per image, first column the image, then one column per method.

    images (B, 3, H, W) in [0, 1]. ``heatmaps`` maps a method name to its relevance for the batch: (B, H, W),
    (B, C, H, W) (summed over channels, :func:`to_heatmap`) or a token map (B, gh, gw) (upsampled nearest,
    :func:`upsample_tokens`). Each cell is :func:`relevance_to_rgb` with symmetric per-sample scaling at
    ``percentile``. Returns the path written."""
    imgs, _ = _batched(images, 4, "images")
    b, _, h, w = imgs.shape
    cols = {}
    for name, rel in heatmaps.items():
        rel = to_heatmap(rel)
        if rel.shape[0] != b:
            raise ValueError(f"heatmap {name!r} has batch size {rel.shape[0]}, the images {b}")
        if rel.shape[1:] != (h, w):
            rel = upsample_tokens(rel, (h, w))
        cols[name] = relevance_to_rgb(rel, cmap, percentile)
    if row_titles is not None and len(row_titles) != b:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {b} images")
    ncol = 1 + len(cols)
    panels = [[imgs[i]] + [c[i] for c in cols.values()] for i in range(b)]
    return _save_grid(panels, path, (cell_size * ncol, cell_size * b + 0.3), dpi, ["input", *cols], row_titles,
                      title_size=9)


def _save_grid(panels: list[list[torch.Tensor]], path: str | Path, figsize: tuple[float, float], dpi: int,
               column_titles: list[str] | None = None, row_titles: list[str] | None = None,
               title_size: int = 8) -> Path:
    """Write rows of image panels (tensors (3, h, w) in [0, 1]) as a PNG grid, no ticks; a row shorter than the
    longest leaves its last cells empty; ``column_titles`` over the first row, ``row_titles`` to the left of each
    row. Returns the path written (its folder created if missing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncol = max(len(row) for row in panels)
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), ncol, squeeze=False)
    for r, row in enumerate(panels):
        for j in range(ncol):
            ax = axes[r, j]
            if j < len(row):
                ax.imshow(_hwc(row[j]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.axis("off")
            if r == 0 and column_titles is not None:
                ax.set_title(column_titles[j], fontsize=title_size)
        if row_titles is not None:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _rows(items, name: str) -> list[list]:
    """K rows of n items from a (K, n, ...) tensor or a sequence of sequences."""
    if isinstance(items, torch.Tensor):
        return [list(row) for row in items]
    try:
        return [list(row) for row in items]
    except TypeError:
        raise TypeError(f"{name} must be a (K, n, ...) tensor or K sequences of tensors, got "
                        f"{type(items).__name__}") from None


def _cell(image: torch.Tensor, relevance: torch.Tensor | None, box, alpha: float, cmap: str,
          percentile: float) -> torch.Tensor:
    """One panel (3, h, w): the image, its crop ``box`` = (y0, x0, y1, x1), the heatmap over it."""
    image = image.detach().float().cpu()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
    if relevance is not None:
        relevance = to_heatmap(relevance.detach().float().cpu()[None])[0] if relevance.dim() == 3 else \
            relevance.detach().float().cpu()
        if relevance.shape != image.shape[1:]:
            raise ValueError(f"a heatmap of shape {tuple(relevance.shape)} does not fit its image "
                             f"{tuple(image.shape)}")
    if box is not None:
        y0, x0, y1, x1 = (int(v) for v in box)
        image = image[:, y0:y1, x0:x1]
        relevance = None if relevance is None else relevance[y0:y1, x0:x1]
    return image if relevance is None else overlay(image, relevance, alpha=alpha, cmap=cmap, percentile=percentile)


def concept_panels(references=None, *, heatmaps=None, boxes=None, image: torch.Tensor | None = None,
                   image_heatmaps: torch.Tensor | None = None, alpha: float = 0.7, cmap: str = "bwr",
                   percentile: float = 99.5) -> list[list[torch.Tensor]]:
    """The panels of :func:`concept_grid`, one row per concept: ``[overlay of the image's heatmap of the concept,
    reference 1, ..., reference n]`` (each (3, h, w) in [0, 1]).

    ``references``: K rows of n reference images (3, H, W) in [0, 1], a (K, n, 3, H, W) tensor, or None;
    ``heatmaps``: their conditional heatmaps, (H, W) or (C, H, W) each (summed over channels), or None;
    ``boxes``: (K, n, 4) crop boxes ``(y0, x0, y1, x1)`` cut out of references and heatmaps (the boxes of
    :class:`lrpkit.crp.ReferenceSamples`), or None for uncropped; ``image`` (3, H, W) and ``image_heatmaps``
    (K, H, W) or (K, C, H, W): the explained image and the conditional heatmap of each concept on it (the
    first column), or None. Each heatmap is scaled on its own (symmetric, at ``percentile``; :func:`overlay`)."""
    rows = _rows(references, "references") if references is not None else None
    lead = None
    if image_heatmaps is not None:
        if image is None:
            raise ValueError("image_heatmaps needs the image they explain (image=...)")
        lead = [_cell(image, h, None, alpha, cmap, percentile) for h in image_heatmaps]
    if rows is None and lead is None:
        raise ValueError("give reference images, or an image and its concept heatmaps, or both")
    count = len(rows) if rows is not None else len(lead)
    if rows is not None and lead is not None and len(rows) != len(lead):
        raise ValueError(f"{len(lead)} concept heatmaps of the image but {len(rows)} rows of references")
    heat = _rows(heatmaps, "heatmaps") if heatmaps is not None else None
    cut = _rows(boxes, "boxes") if boxes is not None else None
    panels = []
    for r in range(count):
        row = [lead[r]] if lead is not None else []
        for j, ref in enumerate(rows[r] if rows is not None else []):
            rel = heat[r][j] if heat is not None else None
            row.append(_cell(ref, rel, cut[r][j] if cut is not None else None, alpha, cmap, percentile))
        panels.append(row)
    return panels


def concept_grid(references=None, path: str | Path = "concepts.png", *, heatmaps=None, boxes=None,
                 image: torch.Tensor | None = None, image_heatmaps: torch.Tensor | None = None,
                 row_titles: list[str] | None = None, column_titles: list[str] | None = None, alpha: float = 0.7,
                 cmap: str = "bwr", percentile: float = 99.5, cell_size: float = 1.4, dpi: int = 100) -> Path:
    """Save a PNG of concepts × reference samples: one row per concept, its reference crops with their conditional
    heatmaps over them (and, first, the concept's conditional heatmap on an explained image). Panels as
    :func:`concept_panels` (same arguments); ``row_titles``: one label per concept (e.g. the channel and its share
    of the relevance); ``column_titles``: one per column. Crops keep their own size and aspect. Returns the path.

    Reference: Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
    Relevance Propagation", Nature Machine Intelligence 5 (the concept × reference-sample figures)."""
    panels = concept_panels(references, heatmaps=heatmaps, boxes=boxes, image=image, image_heatmaps=image_heatmaps,
                            alpha=alpha, cmap=cmap, percentile=percentile)
    k, ncol = len(panels), max(len(row) for row in panels)
    if row_titles is not None and len(row_titles) != k:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {k} concepts")
    if column_titles is not None and len(column_titles) != ncol:
        raise ValueError(f"column_titles has {len(column_titles)} entries for {ncol} columns")
    return _save_grid(panels, path, (cell_size * ncol + 0.6, cell_size * k + 0.3), dpi, column_titles, row_titles)
