"""The engine behind ``lrpkit evaluate``: every chosen explainer over a set of images, scored per image, with
results written incrementally so that an interrupted run resumes where it stopped, on one process or sharded
over several with ``torchrun``.

For every image i and method m the runner computes one *row*: the target t_i = argmax f(x_i) (the predicted
class of the unperturbed image), the heatmap H = m(x_i, t_i), and the per-image metrics of :mod:`lrpkit.evaluate`:

- ``abpc``, ``morf``, ``lerf``: :func:`~lrpkit.evaluate.perturbation_curves` with regions of the model's patch
  size, ``steps`` steps, baseline 0 in [0, 1] pixel space, tracking the target logit: ABPC = AUC_LeRF − AUC_MoRF
  (larger is better), ``morf`` = AUC_MoRF (smaller is better), ``lerf`` = AUC_LeRF (larger is better).
  The row also keeps both curves (``morf_curve``, ``lerf_curve``) for the plot.
- ``deletion``, ``insertion``: :func:`~lrpkit.evaluate.deletion_insertion` (pixels, ``deletion_steps`` steps,
  target probability; deletion smaller is better, insertion larger is better).
- ``pointing``, ``mass``, ``rank``: :func:`~lrpkit.evaluate.pointing_game`,
  :func:`~lrpkit.evaluate.relevance_mass_accuracy`, :func:`~lrpkit.evaluate.relevance_rank_accuracy` against the
  image's ground-truth mask; ``None`` for an image without a mask.

A row depends on its image and method only, never on the batch it was computed in or on the process that
computed it (the seeded explainers, SmoothGrad and ViT-CX, draw their noise from a generator reseeded for every
sample; batching changes results by float rounding only). This is what lets a resumed or sharded run give the
table of a single uninterrupted run.

The summary of a method is, per metric, the mean, the sample standard deviation (n − 1 in the denominator) and
the number n of images where the metric is defined.

Files in the output folder: ``config.json`` (what the rows depend on; a rerun with other values is refused),
``results.jsonl`` (one JSON row per (image, method), appended and flushed after every batch; while sharded, rank
r appends to ``results.rank{r}.jsonl`` and rank 0 merges them at the end), ``results.csv``, ``summary.json`` and
``curves.png`` (the mean MoRF and LeRF curves of every method).

Reference for the metrics: see :mod:`lrpkit.evaluate` (Samek et al. 2017; Petsiuk et al. 2018; Arras et al. 2022).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "METRICS",
    "DEFAULT_METHODS_VIT",
    "DEFAULT_METHODS_CNN",
    "EvaluationResult",
    "GeneratedImages",
    "ImageFolder",
    "run_evaluation",
    "score_batch",
    "resolve_device",
    "parameter_digest",
    "summarize",
    "format_summary",
    "plot_curves",
    "shard",
]

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
LOCALIZATION = ("pointing", "mass", "rank")

#: Methods evaluated by default on a vision transformer (a model with ``patch_embed``).
DEFAULT_METHODS_VIT = ("lrp", "attnlrp", "transformer-attribution", "rollout", "gradient-rollout",
                       "attention-gradcam", "gradient", "input-x-gradient", "integrated-gradients", "smoothgrad")
#: Methods evaluated by default on other models (CNNs).
DEFAULT_METHODS_CNN = ("lrp", "epsilon-plus", "epsilon-gamma-box", "epsilon-alpha2-beta1", "gradient",
                       "input-x-gradient", "integrated-gradients", "smoothgrad")

CONFIG, RESULTS, CSV_FILE, SUMMARY, PLOT = "config.json", "results.jsonl", "results.csv", "summary.json", "curves.png"
CSV_COLUMNS = ("image", "method", "label", "target", "has_mask") + tuple(METRICS)
# config key -> the command-line option that sets it (for the "different configuration" error)
OPTION_OF = {"version": "(the file format)", "model": "--model", "parameters": "--model/--weights (the model's parameters)",
             "source": "--data (generated images or a folder)", "data": "--data", "seed": "--seed",
             "size": "(the model's input size)", "patch_size": "--patch-size", "steps": "--steps",
             "deletion_steps": "--deletion-steps", "method_seed": "--method-seed"}
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device named ``device``, checked to exist on this machine.

    ``"auto"`` (or None) is ``cuda`` when CUDA is available, else ``cpu``. Under ``torchrun`` (``WORLD_SIZE`` > 1)
    a CUDA device without an index becomes ``cuda:LOCAL_RANK``. Raises ``ValueError`` naming the problem and the
    fix for a name torch does not know, a device type that is not available, or an index beyond the device count.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"device {str(dev)!r} is not available on this machine (torch.{dev.type}.is_available() "
                         f"is False); use --device cpu (or auto)")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return dev


# ------------------------------------------------------------------------------------------- distribution
class _Dist:
    """The default process group when one exists or ``WORLD_SIZE`` > 1 (``torchrun``), else a single process
    (rank 0 of 1). Initialises gloo (CPU) or nccl (CUDA) unless a group already exists; destroys only a group it
    created."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world, self.owned = 0, 1, False
        joined = dist.is_available() and dist.is_initialized()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not joined:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = joined = True
        if joined:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


def shard(items: list, rank: int, world: int) -> list:
    """The share of ``rank`` among ``world`` processes: items at positions p with p mod world == rank.

    Example: ``shard([a, b, c, d, e], 1, 2) == [b, d]``.
    """
    return list(items[rank::world])


# ------------------------------------------------------------------------------------------------- images
@dataclass
class Batch:
    """Images ready for scoring: ``x01`` (B, 3, H, W) in [0, 1]; ``masks`` (B, H, W) bool (all False where
    ``has_mask`` is False); ``labels`` (int or None per image)."""

    x01: torch.Tensor
    masks: torch.Tensor
    has_mask: list[bool]
    labels: list[int | None]


class GeneratedImages:
    """``n`` images of :func:`lrpkit.data.make_sample` (stream ``seed``, ``size`` pixels) with their masks.

    Image ``i`` (id ``str(i)``) is the same for every n, so a rerun with a larger n reuses the rows of the first
    images.
    """

    def __init__(self, n: int, seed: int, size: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of generated images) must be a positive int, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n, self.seed, self.size = n, seed, size
        self.ids = [str(i) for i in range(n)]

    @property
    def identity(self) -> dict:
        return {"source": "generated", "seed": self.seed, "size": self.size}

    def load(self, indices: list[int]) -> Batch:
        from .. import data

        samples = [data.make_sample(i, seed=self.seed, size=self.size) for i in indices]
        return Batch(torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples]),
                     [True] * len(samples), [s.label for s in samples])


def _read_mask(path: Path) -> torch.Tensor:
    """A mask file as a bool (H, W) tensor: True where any colour channel is nonzero (alpha is ignored; a palette
    image's index 0 is background)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "L", "P", "I", "I;16", "F"):
            arr = np.asarray(im)
        elif im.mode == "LA":
            arr = np.asarray(im.getchannel("L"))
        else:
            arr = np.asarray(im.convert("RGB"))
    arr = arr != 0
    if arr.ndim == 3:
        arr = arr.any(-1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) of an image file, after checking that Pillow can read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path} as an image ({err}); give a PNG, JPEG or other file Pillow "
                         f"can open, or remove it from the folder") from None
    return size


class ImageFolder:
    """Images with optional ground-truth masks, laid out as::

        DIR/images/NAME.EXT    the images (any format Pillow reads), processed in the order of their file names
        DIR/masks/NAME.EXT     optional: the mask of images/NAME.*, same width and height; nonzero = object

    Each image is read as RGB and brought to the model's input size by ``preprocess`` (``Preprocess.load``:
    resize and crop as timm's eval transform); its mask goes through the same resize (nearest neighbour) and crop.
    Images without a mask get the perturbation metrics only. The folder is checked when this object is made:
    no images, an unreadable file, a mask whose size differs from its image's, two files with one NAME, or a
    mask without an image are errors that name the file.
    """

    def __init__(self, root: str | Path, preprocess):
        root = Path(root)
        layout = "DIR/images/NAME.png (and optionally DIR/masks/NAME.png, nonzero = object)"
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root} (expected the layout {layout})")
        image_dir, mask_dir = root / "images", root / "masks"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no images/ folder in {root}; expected the layout {layout}")
        self.root, self.preprocess = root.resolve(), preprocess
        images = self._files(image_dir, "image")
        if not images:
            raise ValueError(f"no images in {image_dir}; put the images there as NAME.png / NAME.jpg ({layout})")
        masks = self._files(mask_dir, "mask") if mask_dir.is_dir() else {}
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(f"mask {masks[orphans[0]]} has no image {image_dir}/{orphans[0]}.*; rename it to the "
                             f"name of its image or remove it")
        self.paths = [images[stem] for stem in sorted(images, key=lambda s: images[s].name)]
        self.mask_paths = {}
        for path in self.paths:
            size = _image_size(path, "image")
            mask = masks.get(path.stem)
            if mask is not None:
                mask_size = _image_size(mask, "mask")
                if mask_size != size:
                    raise ValueError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} pixels but its image {path} is "
                                     f"{size[0]}x{size[1]}; a mask must have its image's width and height")
                self.mask_paths[path.name] = mask
        self.ids = [p.name for p in self.paths]

    @staticmethod
    def _files(folder: Path, what: str) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.stem in files:
                raise ValueError(f"two {what} files named {p.stem!r} in {folder}: {files[p.stem].name} and {p.name}; "
                                 f"masks are matched to images by name, so rename one")
            files[p.stem] = p
        return files

    @property
    def identity(self) -> dict:
        return {"source": "folder", "data": str(self.root)}

    def load_mask(self, name: str) -> torch.Tensor | None:
        """The mask of image ``name`` at the model's input size (bool (H, W)), or None: the image's resize and crop
        (``Preprocess.resize_crop``) with nearest-neighbour interpolation, padding (if any) as background."""
        path = self.mask_paths.get(name)
        if path is None:
            return None
        m = _read_mask(path)[None].to(torch.uint8)
        if hasattr(self.preprocess, "resize_crop"):
            m = self.preprocess.resize_crop(m, interpolation="nearest", fill=0)
        else:  # a preprocess without resize_crop: shorter side to ``resize``, then center crop
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as F

            m = F.resize(m, self.preprocess.resize, interpolation=InterpolationMode.NEAREST)
            m = F.center_crop(m, list(self.preprocess.size))
        return m[0] > 0

    def load(self, indices: list[int]) -> Batch:
        x = torch.stack([self.preprocess.load(self.paths[i]) for i in indices])
        masks, has = [], []
        for i in indices:
            m = self.load_mask(self.ids[i])
            has.append(m is not None)
            masks.append(m if m is not None else torch.zeros(x.shape[-2:], dtype=torch.bool))
        return Batch(x, torch.stack(masks), has, [None] * len(indices))


# ------------------------------------------------------------------------------------------------ results
def _clean(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def score_batch(model: nn.Module, normalize: Callable, batch: Batch, heatmap: torch.Tensor, target: torch.Tensor,
                *, patch_size: int, steps: int, deletion_steps: int, forward_batch: int = 256) -> list[dict]:
    """The per-image metrics of one method's heatmaps (see the module docstring), one dict per image.

    ``batch.x01`` and ``heatmap`` (B, H, W) on the model's device; ``normalize`` maps [0, 1] images to the model's
    input. Localisation metrics are None for images without a mask.
    """
    from . import deletion_insertion, perturbation_curves, pointing_game, relevance_mass_accuracy, \
        relevance_rank_accuracy

    x01 = batch.x01
    curves = perturbation_curves(model, x01, heatmap, target, patch_size=patch_size, steps=steps,
                                 preprocess=normalize, batch_size=forward_batch)
    rise = deletion_insertion(model, x01, heatmap, target, steps=deletion_steps, preprocess=normalize,
                              batch_size=forward_batch)
    masks = batch.masks.to(heatmap.device)
    local = {"pointing": pointing_game(heatmap, masks), "mass": relevance_mass_accuracy(heatmap, masks),
             "rank": relevance_rank_accuracy(heatmap, masks)}
    rows = []
    for b in range(x01.shape[0]):
        row = {"abpc": _clean(curves.abpc[b]), "morf": _clean(curves.auc_morf[b]), "lerf": _clean(curves.auc_lerf[b]),
               "deletion": _clean(rise.auc_deletion[b]), "insertion": _clean(rise.auc_insertion[b])}
        for name, values in local.items():
            row[name] = _clean(values[b]) if batch.has_mask[b] else None
        row["morf_curve"] = [float(v) for v in curves.morf[b]]
        row["lerf_curve"] = [float(v) for v in curves.lerf[b]]
        rows.append(row)
    return rows


class _Store:
    """The rows of an output folder: ``results.jsonl`` plus the per-rank files of a sharded run.

    Rows are keyed by (image, method); the first row of a key wins. A line that does not parse (a write cut off
    by a crash) is skipped, and the next append starts on a new line.
    """

    def __init__(self, out: Path, rank: int, world: int):
        self.out = out
        self.own = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")

    def rank_files(self) -> list[Path]:
        return sorted(self.out.glob("results.rank*.jsonl"))

    @staticmethod
    def read_file(path: Path) -> dict:
        rows: dict = {}
        if not path.is_file():
            return rows
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    key = (row["image"], row["method"])
                except (ValueError, KeyError, TypeError):
                    continue
                rows.setdefault(key, row)
        return rows

    def read(self) -> tuple[dict, dict]:
        """(rows of results.jsonl, rows of the per-rank files not in results.jsonl)."""
        main = self.read_file(self.out / RESULTS)
        extra: dict = {}
        for path in self.rank_files():
            for key, row in self.read_file(path).items():
                if key not in main:
                    extra.setdefault(key, row)
        return main, extra

    @staticmethod
    def append(path: Path, rows: list[dict]) -> None:
        """Append rows as JSON lines, flushed and synced to disk before returning."""
        if not rows:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(path, "a+b") as f:
            f.seek(0, io.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, io.SEEK_END)
                if f.read(1) != b"\n":  # a line cut off by a crash: close it, it will be skipped
                    f.seek(0, io.SEEK_END)
                    f.write(b"\n")
            f.seek(0, io.SEEK_END)
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ summary
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


# ------------------------------------------------------------------------------------------------- models
def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``model.state_dict()`` (sorted by name): equal
    digests mean equal weights, whatever device or file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _patch_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "patch_size", None)
    if size is None:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return int(size[0]) if size[0] == size[1] else None


def _methods(names, model: nn.Module, prep, method_seed: int, log) -> dict:
    from .. import catalog

    if isinstance(names, str):
        names = [names]
    if names is None or list(names) in ([], ["default"]):
        names = list(DEFAULT_METHODS_VIT if hasattr(model, "patch_embed") else DEFAULT_METHODS_CNN)
        skip_inapplicable = True
    elif list(names) == ["all"]:
        names, skip_inapplicable = list(catalog.METHODS), True
    else:
        names, skip_inapplicable = list(names), False
        if "all" in names:
            raise ValueError("'all' cannot be combined with other method names; give --method all alone")
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice in {names}")
    unknown = [n for n in names if n not in catalog.METHODS]
    if unknown:
        catalog.make_method(unknown[0], model, prep, method_seed)  # raises the catalog's error with suggestions
    built = {}
    for n in names:
        try:
            built[n] = catalog.make_method(n, model, prep, method_seed)
        except ValueError as err:
            if not skip_inapplicable:
                raise
            log(f"skipping {n}: {err}")
    if not built:
        raise ValueError("none of the chosen methods applies to this model")
    return built


# ------------------------------------------------------------------------------------------------- runner
@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` returns. On rank 0 (and in a single process): ``rows`` (one dict per
    (image, method) in scope, image order then method order), ``summary`` (see :func:`summarize`), ``table``
    (printable), ``files`` (name -> path). ``computed``: pairs computed in this run (by all processes);
    ``reused``: pairs of the scope found in the folder at the start; ``images`` and ``total``: the images and
    (image, method) pairs of the scope; ``complete``: every pair of the scope done.
    On other ranks ``rows``/``summary``/``table`` are None and ``files`` is empty."""

    out: Path
    config: dict
    methods: list[str]
    rank: int = 0
    world: int = 1
    computed: int = 0
    reused: int = 0
    images: int = 0
    total: int = 0
    complete: bool = False
    rows: list[dict] | None = None
    summary: dict | None = None
    table: str | None = None
    files: dict = field(default_factory=dict)


def _check_config(out: Path, identity: dict, overwrite: bool) -> str | None:
    """On rank 0: compare with (or write) ``config.json``; return an error text or None."""
    ours = [out / f for f in (CONFIG, RESULTS, CSV_FILE, SUMMARY, PLOT)] + sorted(out.glob("results.rank*.jsonl"))
    if overwrite:
        for f in ours:
            f.unlink(missing_ok=True)
    cfg = out / CONFIG
    if cfg.is_file():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))["identity"]
        except (ValueError, KeyError, TypeError):
            return f"{cfg} is not a config written by lrpkit evaluate; choose another --out or pass --overwrite"
        keys = sorted(set(old) | set(identity), key=lambda k: list(OPTION_OF).index(k) if k in OPTION_OF else 99)
        def show(k, v):
            return f"{v[:12]}…" if k == "parameters" and isinstance(v, str) else repr(v)

        diffs = [f"{OPTION_OF.get(k, k)}: {show(k, old.get(k))} there, {show(k, identity.get(k))} now"
                 for k in keys if old.get(k) != identity.get(k)]
        if diffs:
            return (f"{out} holds results of a different configuration ({'; '.join(diffs)}); rerun with the "
                    f"same options to resume, choose another --out, or pass --overwrite to start again")
        return None
    if (out / RESULTS).exists() or list(out.glob("results.rank*.jsonl")):
        return f"{out} holds results but no {CONFIG}; choose another --out or pass --overwrite"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"lrpkit_evaluate": FORMAT_VERSION, "identity": identity}, indent=2) + "\n",
                   encoding="utf-8")
    return None


def run_evaluation(out: str | Path = "lrpkit-out/evaluate", *, model: str | nn.Module = "demo_vit",
                   weights: str | Path | None = None, preprocess=None, methods=None, n: int = 32, seed: int = 1000,
                   data: str | Path | None = None, batch_size: int = 8, device: str | torch.device | None = "auto",
                   patch_size: int | None = None, steps: int = 16, deletion_steps: int = 32, method_seed: int = 0,
                   overwrite: bool = False, limit: int | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate explainers over images and write the results to ``out`` (see the module docstring).

    - ``model``: a name for :func:`lrpkit.catalog.load_model` (with ``weights``; a timm/torchvision model without
      weights is built with ``torch.manual_seed(0)`` so that every process and every rerun gets the same random
      weights), or an ``nn.Module`` with ``preprocess`` (a :class:`~lrpkit.catalog.Preprocess`); a module is
      copied, never modified.
    - ``methods``: names of :data:`lrpkit.catalog.METHODS`; None for the defaults (:data:`DEFAULT_METHODS_VIT` or
      :data:`DEFAULT_METHODS_CNN`), ``"all"`` for every method that applies to the model. SmoothGrad and ViT-CX
      are built with ``method_seed``.
    - images: ``data`` (an :class:`ImageFolder`) or, without it, ``n`` generated images of stream ``seed`` at the
      model's input size.
    - ``batch_size`` images per explainer call; ``patch_size``: the perturbation region (default: the ViT's
      patch, else 8 px for inputs up to 64 px and 16 px above); ``steps`` / ``deletion_steps``: curve steps.
    - Resuming: pairs (image, method) already in ``out`` are not recomputed; a folder written with another model,
      other weights, images or metric settings is refused (``overwrite=True`` deletes lrpkit's files there and
      starts again). ``n`` and ``methods`` may change between runs: they choose what the outputs cover.
    - ``limit``: compute at most this many images (with missing pairs) in this run, then write the outputs of
      what is done (a time-boxed chunk; rerun to go on).
    - Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes every world-th pending image and rank 0 merges and
      writes the outputs.
    """
    log = log or (lambda text: None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    dev = resolve_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    dist = _Dist(dev)
    try:
        return _run(dist, dev, out, model, weights, preprocess, methods, n, seed, data, batch_size, patch_size,
                    steps, deletion_steps, method_seed, overwrite, limit, progress,
                    log if dist.rank == 0 else (lambda text: None))
    finally:
        dist.close()


def _load(model, weights, preprocess):
    from .. import catalog

    if isinstance(model, nn.Module):
        if preprocess is None:
            raise ValueError("give preprocess (a lrpkit.catalog.Preprocess) with a model object")
        if weights is not None:
            raise ValueError("weights go with a model name; load them into your model object yourself")
        return type(model).__name__, copy.deepcopy(model).eval(), preprocess
    if not isinstance(model, str):
        raise TypeError(f"model must be a name or an nn.Module, got {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, prep = catalog.load_model(model, weights)
    return model, module, preprocess or prep


def _run(dist, dev, out, model, weights, preprocess, methods, n, seed, data, batch_size, patch_size, steps,
         deletion_steps, method_seed, overwrite, limit, progress, log) -> EvaluationResult:
    name, model, prep = _load(model, weights, preprocess)
    digest = parameter_digest(model)
    model = model.to(dev)
    h, w = prep.size
    if data is not None:
        source = ImageFolder(data, prep)
    else:
        if h != w:
            raise ValueError(f"generated images are square but {name} takes {h}x{w} inputs; use --data with your "
                             f"own images")
        source = GeneratedImages(n, seed, h)
    region = patch_size if patch_size is not None else (_patch_size(model) or (8 if max(h, w) <= 64 else 16))
    if isinstance(region, bool) or not isinstance(region, int) or region < 1:
        raise ValueError(f"patch_size must be a positive int, got {region!r}")
    regions = math.ceil(h / region) * math.ceil(w / region)
    for opt, value, most in (("--steps", steps, regions), ("--deletion-steps", deletion_steps, h * w)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"{opt} must be an int from 1 to {most} (the number of "
                             f"{'regions of ' + str(region) + ' px' if opt == '--steps' else 'pixels'} of a "
                             f"{h}x{w} input), got {value!r}")
    explainers = _methods(methods, model, prep, method_seed, log)
    names = list(explainers)
    identity = {"version": FORMAT_VERSION, "model": name, "parameters": digest, **source.identity,
                "patch_size": region, "steps": steps, "deletion_steps": deletion_steps, "method_seed": method_seed}
    digests = dist.all_gather(digest)
    if len(set(digests)) > 1:
        raise ValueError(f"the ranks built models with different parameters ({digests}); give --weights so that "
                         f"every process loads the same weights")

    error = _check_config(out, identity, overwrite) if dist.rank == 0 else None
    error = dist.broadcast(error)
    if error:
        raise ValueError(error)
    dist.barrier()

    store = _Store(out, dist.rank, dist.world)
    main_rows, extra_rows = store.read()
    done = set(main_rows) | set(extra_rows)
    if dist.active:
        done = set().union(*dist.all_gather(done))
    scope = [(i, m) for i in source.ids for m in names]
    reused = sum(1 for key in scope if key in done)
    pending = [k for k, i in enumerate(source.ids) if any((i, m) not in done for m in names)]
    if limit is not None:
        pending = pending[:limit]
    mine = shard(pending, dist.rank, dist.world)
    todo = sum(1 for k in mine for m in names if (source.ids[k], m) not in done)
    log(f"{len(source.ids)} images x {len(names)} methods: {reused} pairs found in {out}, {len(scope) - reused} to "
        f"compute" + (f" ({len(pending)} images in this run)" if limit is not None else "")
        + (f" on {dist.world} processes" if dist.active else ""))

    new_rows: list[dict] = []
    failure = None
    try:
        new_rows = _compute(model, prep, source, explainers, mine, done, store, batch_size, region, steps,
                            deletion_steps, dev, todo, progress and dist.rank == 0, dist)
    except Exception as err:  # noqa: BLE001 - reported to the other ranks, then raised
        if not dist.active:
            raise
        failure = err
    statuses = dist.all_gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    bad = [(r, s) for r, s in enumerate(statuses) if s]
    if bad:
        raise RuntimeError(f"rank {bad[0][0]} failed ({bad[0][1]}); the finished images are saved, rerun to resume")

    # merge: every rank hands rank 0 what it computed and what it found in per-rank files
    gathered = dist.gather(new_rows + list(extra_rows.values()))
    if dist.rank == 0:
        have = store.read_file(out / RESULTS)
        merge: dict = {}
        for part in gathered:
            for row in part:
                key = (row["image"], row["method"])
                if key not in have:
                    merge.setdefault(key, row)
        if dist.active or store.rank_files():
            _Store.append(out / RESULTS, list(merge.values()))
        have.update(merge)
    dist.barrier()
    for path in store.rank_files():
        path.unlink(missing_ok=True)
    dist.barrier()

    computed = sum(dist.all_gather(len(new_rows)))
    result = EvaluationResult(out=out, config=identity, methods=names, rank=dist.rank, world=dist.world,
                              computed=computed, reused=reused, images=len(source.ids), total=len(scope))
    if dist.rank != 0:
        return result
    rows = [have[key] for key in scope if key in have]
    result.complete = len(rows) == len(scope)
    result.rows = rows
    result.summary = summarize(rows, names)
    result.table = format_summary(result.summary)
    from ._perturb import step_counts

    fractions = (step_counts(regions, steps, "cpu").double() / regions).tolist()
    _write_csv(rows, out / CSV_FILE)
    document = {"config": identity, "methods": names, "images": len(source.ids), "pairs_done": len(rows),
                "pairs_total": len(scope), "complete": result.complete, "fractions": fractions,
                "metrics": {m: {"title": t, "larger_is_better": b} for m, (t, b) in METRICS.items()},
                "summary": result.summary}
    (out / SUMMARY).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_curves(result.summary, fractions, out / PLOT)
    result.files = {"results": out / RESULTS, "csv": out / CSV_FILE, "summary": out / SUMMARY, "plot": out / PLOT,
                    "config": out / CONFIG}
    return result


def _compute(model, prep, source, explainers, mine, done, store, batch_size, region, steps, deletion_steps, dev,
             todo, progress, dist) -> list[dict]:
    from tqdm.auto import tqdm

    new_rows: list[dict] = []
    desc = "evaluate" + (f" (rank 0 of {dist.world})" if dist.active else "")
    with tqdm(total=todo, disable=not progress, desc=desc, unit="expl") as bar:
        for lo in range(0, len(mine), batch_size):
            idx = mine[lo:lo + batch_size]
            ids = [source.ids[k] for k in idx]
            batch = source.load(idx)
            batch.x01 = batch.x01.to(dev)
            x = prep.normalize(batch.x01)
            with torch.no_grad():
                target = model(x).argmax(1)
            for name, explainer in explainers.items():
                sel = [j for j, i in enumerate(ids) if (i, name) not in done]
                if not sel:
                    continue
                sub = Batch(batch.x01[sel], batch.masks[sel], [batch.has_mask[j] for j in sel],
                            [batch.labels[j] for j in sel])
                try:
                    heatmap = explainer(x[sel], target[sel]).heatmap.detach()
                    scores = score_batch(model, prep.normalize, sub, heatmap.to(dev), target[sel],
                                         patch_size=region, steps=steps, deletion_steps=deletion_steps)
                except ValueError as err:
                    raise ValueError(f"method {name} on images {[ids[j] for j in sel]}: {err}") from err
                rows = []
                for j, s in zip(sel, scores):
                    rows.append({"image": ids[j], "method": name, "label": batch.labels[j],
                                 "target": int(target[j]), "has_mask": batch.has_mask[j], **s, "computed_by": dist.rank})
                store.append(store.own, rows)
                new_rows.extend(rows)
                bar.update(len(rows))
    return new_rows
