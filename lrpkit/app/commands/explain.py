"""``lrpkit explain``: heatmaps for the user's images with a named model and one or more methods.

For each image and method it writes an overlay of the heatmap on the preprocessed image (a PNG), optionally the raw
relevance (``.npy`` or ``.safetensors``), and a summary of every (image, method) pair as CSV and JSON. See
``docs/cli-explain.md`` for the layout of the output folder.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
from pathlib import Path

#: File suffixes taken from a folder given as IMAGE (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Columns of ``summary.csv`` (``summary.json`` has the same keys per row).
SUMMARY_COLUMNS = ("image", "name", "method", "target", "target_name", "target_logit", "target_prob", "predicted",
                   "predicted_name", "predicted_logit", "predicted_prob", "heatmap_sum", "png", "raw")

_EXAMPLES = """examples:
  lrpkit explain cat.png dog.jpg --model demo_vit --method lrp rollout
  lrpkit explain photos/ --model vit_base_patch16_224.augreg_in21k_ft_in1k --weights vit_b16.safetensors \\
      --method cplrp attnlrp --target 281 --save-relevance npy --out runs/vit
  lrpkit explain x.png --model resnet50 --weights resnet50.pth --method epsilon-gamma-box --device cuda
"""


def _method_help() -> str:
    from ..method_registry import METHODS

    lines = ["methods (--method):"] + [f"  {name:<24} {desc}" for name, (desc, _) in METHODS.items()]
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Add the ``explain`` subcommand to the subparsers ``sub``; its ``func`` is :func:`run`."""
    parser = sub.add_parser(
        "explain", help="write heatmaps of a model's decision for your images, one PNG per image and method",
        description="Explain a model's prediction for each IMAGE with each method: writes an overlay of the\n"
                    "heatmap on the preprocessed image per image and method, prints one line per image and\n"
                    "writes summary.csv / summary.json under --out.",
        epilog=_EXAMPLES + "\n" + _method_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (anything Pillow reads) or folders (their image files, sorted)")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="demo_vit, demo_cnn, a torchvision CNN (vgg*, resnet*) or any timm model name")
    parser.add_argument("--weights", metavar="FILE", help="local weights: .safetensors or a state-dict file "
                        "(read with torch.load(weights_only=True): no pickled code runs); without it timm and "
                        "torchvision models have random weights")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="classifier size (default: from the weights file, else the model's default)")
    parser.add_argument("--method", "-m", dest="methods", action="extend", nargs="+", metavar="M",
                        help="one or more methods (repeatable, or comma-separated; default lrp); see below")
    parser.add_argument("--target", default=None, metavar="T",
                        help="class to explain for every image: an index (0..classes-1) or a class name "
                             "(default: the predicted class of each image)")
    parser.add_argument("--labels", metavar="FILE", default=None,
                        help="text file with one class name per line (default: the demo classes, or ImageNet's "
                             "for a 1000-class model)")
    parser.add_argument("--out", default="lrpkit-out", metavar="DIR", help="output folder (default lrpkit-out)")
    parser.add_argument("--save-relevance", choices=("npy", "safetensors"), default=None,
                        help="also save the raw heatmap (and the input relevance, or the token map) per image "
                             "and method")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="images per forward/backward pass (default 8)")
    parser.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda, cuda:N, mps, or auto")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of random weights and of the stochastic methods (smoothgrad, vitcx; default 0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    parser.add_argument("--alpha", type=float, default=0.8, metavar="A",
                        help="opacity of the heatmap over the image at the largest |relevance| (default 0.8)")
    parser.add_argument("--percentile", type=float, default=99.5, metavar="P",
                        help="percentile of |relevance| that gets the full colour (default 99.5)")
    parser.add_argument("--cmap", default="bwr", metavar="NAME", help="matplotlib colour map, diverging (default bwr)")
    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------- checks

def _usage_error(message: str):
    from ..cli import UsageError

    return UsageError(message)


def _check_options(args) -> None:
    if args.batch_size < 1:
        raise _usage_error(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise _usage_error(f"--threads must be a positive int, got {args.threads}")
    if not 0 <= args.alpha <= 1:
        raise _usage_error(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0 < args.percentile <= 100:
        raise _usage_error(f"--percentile must be in (0, 100], got {args.percentile}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        like = difflib.get_close_matches(args.cmap, list(matplotlib.colormaps), n=3)
        hint = f" (did you mean {', '.join(like)}?)" if like else ""
        raise _usage_error(f"unknown colour map {args.cmap!r}{hint}; any matplotlib colour map name works, "
                           f"e.g. bwr, seismic, coolwarm")


def method_names(given: list[str] | None) -> list[str]:
    """The methods asked for, in order and without repeats: ``--method a b``, ``--method a --method b`` and
    ``--method a,b`` all give ``[a, b]``; none gives ``["lrp"]``. Unknown names are an error with suggestions."""
    from ..method_registry import METHODS

    names: list[str] = []
    for item in given or ["lrp"]:
        for name in item.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise _usage_error("--method needs at least one method name")
    for name in names:
        if name not in METHODS:
            like = difflib.get_close_matches(name, list(METHODS), n=3)
            hint = f" (did you mean {', '.join(like)}?)" if like else ""
            hint += " (a file name after --method? put the images before --method)" if Path(name).suffix else ""
            raise _usage_error(f"unknown method {name!r}{hint}; choose from {', '.join(METHODS)}")
    return names


def image_paths(given: list[str]) -> list[Path]:
    """The image files: each argument is a file, or a folder whose files with an image suffix
    (:data:`IMAGE_SUFFIXES`) are taken in sorted order. Every file must exist and Pillow must decode it whole
    (checked here, before any model is built, so that a truncated file stops the run before anything is written)."""
    from PIL import Image, UnidentifiedImageError

    paths: list[Path] = []
    for item in given:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise _usage_error(f"folder {path} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        else:
            paths.append(path)
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} as an image ({err}); give a PNG, JPEG or other file that "
                             f"Pillow can open") from err
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One file-name stem per image: the image's own stem; a repeated stem gets ``-2``, ``-3``, ... in order
    (``a/x.png, b/x.png -> x, x-2``)."""
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        stem, k = path.stem, 1
        name = stem
        while name in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        names.append(name)
    return names


def resolve_device(name: str):
    """``torch.device`` for ``--device``; ``auto`` is cuda when available, else mps, else cpu. Every other name is
    checked by :func:`lrpkit.evaluate.distributed.resolve_device` (the check ``lrpkit evaluate`` uses), which
    names a device that is not available here and the fix."""
    import torch

    from ...evaluate.distributed import resolve_device as checked_device

    if name == "auto" and not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
    return checked_device(name)


def read_labels(path: str, num_classes: int) -> list[str]:
    """Class names from a text file, one per line (blank lines at the end ignored); their count must equal the
    model's number of classes."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"labels file not found: {file}")
    labels = file.read_text(encoding="utf-8").rstrip("\n").split("\n")
    labels = [label.strip() for label in labels]
    if len(labels) != num_classes:
        raise _usage_error(f"labels file {file} has {len(labels)} names but the model has {num_classes} classes; "
                           f"give one name per line, in class order")
    return labels


def _short(label: str | None) -> str | None:
    """The first name of a description like ``"tench, Tinca tinca"``."""
    return None if label is None else label.split(",")[0].strip()


def resolve_target(target: str | None, num_classes: int, labels: list[str] | None, model: str) -> int | None:
    """``--target``: None (explain each image's predicted class), an index in 0..num_classes-1, or a class name
    (matched case-insensitively against the labels and, for descriptions like ``"tench, Tinca tinca"``, each of
    their comma-separated names)."""
    if target is None:
        return None
    text = target.strip()
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None:
        if not 0 <= index < num_classes:
            raise _usage_error(f"--target {index} is out of range: {model} has {num_classes} classes, so the "
                               f"target must be in 0..{num_classes - 1}")
        return index
    if labels is None:
        raise _usage_error(f"--target {text!r} is not a class index, and {model} has no class names; give an index "
                           f"in 0..{num_classes - 1}, or the names with --labels FILE")
    key = text.lower()
    hits = [i for i, label in enumerate(labels)
            if label.lower() == key or key in (part.strip().lower() for part in label.split(","))]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise _usage_error(f"--target {text!r} names several classes ({', '.join(map(str, hits))}); give the index")
    like = difflib.get_close_matches(text, labels, n=3)
    hint = f" (did you mean {', '.join(repr(x) for x in like)}?)" if like else ""
    raise _usage_error(f"--target {text!r} is not a class name of {model}{hint}; give a name or an index in "
                       f"0..{num_classes - 1}")


# --------------------------------------------------------------------------------------------------------- run

def _to_numpy(t):
    return t.detach().float().cpu().contiguous().numpy()


def _save_raw(kind: str, folder: Path, name: str, expl, b: int) -> list[Path]:
    """Write the heatmap (H, W), the input relevance (C, H, W) when the method has one, and the token map
    (grid_h, grid_w) of token-level methods; returns the files written."""
    import numpy as np

    arrays = {"heatmap": expl.heatmap[b]}
    if expl.relevance is not None and expl.relevance.ndim == 4:
        arrays["relevance"] = expl.relevance[b]
    if expl.token_relevance is not None:
        arrays["tokens"] = expl.token_relevance[b]
    if kind == "npy":
        files = []
        for key, value in arrays.items():
            path = folder / f"{name}.{key}.npy"
            np.save(path, _to_numpy(value))
            files.append(path)
        return files
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    save_file({key: value.detach().float().cpu().contiguous() for key, value in arrays.items()}, str(path))
    return [path]


def _write_summary(out: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    csv_path, json_path = out / "summary.csv", out / "summary.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (";".join(row[k]) if k == "raw" else row[k]) for k in SUMMARY_COLUMNS})
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return csv_path, json_path


def run(args) -> int:
    """Run ``lrpkit explain`` for parsed ``args``; returns the exit status (0)."""
    import torch

    from .. import method_registry, viz, zoo
    from ._common import load_model, torch_threads

    _check_options(args)
    torch_threads(args.threads)
    methods = method_names(args.methods)
    paths = image_paths(args.images)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--out {out} is a file; give a folder (it is created when missing)")
    if args.labels is not None and not Path(args.labels).is_file():
        raise FileNotFoundError(f"labels file not found: {args.labels}")

    model, prep = load_model(args, device, args.num_classes)
    explainers = {name: method_registry.make_method(name, model, prep, args.seed) for name in methods}

    names = output_names(paths)
    labels = None
    rows: list[dict] = []
    target_index: int | None = None  # resolved after the first forward pass, once the number of classes is known
    for start in range(0, len(paths), args.batch_size):
        batch_paths, batch_names = paths[start:start + args.batch_size], names[start:start + args.batch_size]
        x01 = torch.stack([prep.load(p) for p in batch_paths]).to(device)
        x = prep.normalize(x01)
        with torch.no_grad():
            logits = model(x)
        if logits.ndim != 2:
            raise _usage_error(f"{args.model} gives an output of shape {tuple(logits.shape)}; lrpkit explain needs "
                               f"class scores (batch, classes)")
        if start == 0:
            num_classes = logits.shape[1]
            labels = (read_labels(args.labels, num_classes) if args.labels
                      else zoo.class_names(args.model, model))
            if labels is not None and len(labels) != num_classes:
                labels = None
            target_index = resolve_target(args.target, num_classes, labels, args.model)
            (out / "input").mkdir(parents=True, exist_ok=True)  # the checks passed: start writing
        probs = logits.float().softmax(1)
        predicted = logits.argmax(1)
        target = predicted if target_index is None else torch.full_like(predicted, target_index)
        files: list[list[Path]] = [[] for _ in batch_paths]
        batch_rows: list[list[dict]] = [[] for _ in batch_paths]  # per image, then per method
        for b, name in enumerate(batch_names):
            files[b].append(viz.save_png(x01[b], out / "input" / f"{name}.png"))
        for method, explain in explainers.items():
            expl = explain(x, target)
            heat = expl.heatmap.detach()
            images = viz.overlay(x01, heat.to(x01.dtype), alpha=args.alpha, cmap=args.cmap,
                                 percentile=args.percentile)
            folder = out / method
            folder.mkdir(parents=True, exist_ok=True)
            for b, name in enumerate(batch_names):
                png = viz.save_png(images[b], folder / f"{name}.png")
                raw = _save_raw(args.save_relevance, folder, name, expl, b) if args.save_relevance else []
                files[b] += [png, *raw]
                t, p = int(target[b]), int(predicted[b])
                batch_rows[b].append({
                    "image": str(batch_paths[b]), "name": name, "method": method, "target": t,
                    "target_name": _short(labels[t]) if labels else None,
                    "target_logit": float(logits[b, t]), "target_prob": float(probs[b, t]),
                    "predicted": p, "predicted_name": _short(labels[p]) if labels else None,
                    "predicted_logit": float(logits[b, p]), "predicted_prob": float(probs[b, p]),
                    "heatmap_sum": float(heat[b].double().sum()), "png": str(png), "raw": [str(f) for f in raw],
                })
        for b, path in enumerate(batch_paths):
            rows += batch_rows[b]
            p, t = int(predicted[b]), int(target[b])
            pname = f" {_short(labels[p])!r}" if labels else ""
            line = f"{path}: predicted {p}{pname} (logit {float(logits[b, p]):.3f}, p {float(probs[b, p]):.3f})"
            if t != p:
                tname = f" {_short(labels[t])!r}" if labels else ""
                line += f"; target {t}{tname} (logit {float(logits[b, t]):.3f}, p {float(probs[b, t]):.3f})"
            print(line + " -> " + ", ".join(str(f) for f in files[b]), flush=True)

    meta = {"model": args.model, "weights": args.weights, "device": str(device), "seed": args.seed,
            "methods": methods, "target": target_index, "columns": list(SUMMARY_COLUMNS)}
    csv_path, json_path = _write_summary(out, rows, meta)
    print(f"{len(paths)} image(s) x {len(methods)} method(s) written under {out}; summary in {csv_path} and "
          f"{json_path}")
    return 0
