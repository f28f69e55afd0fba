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

The parts live beside this module: :mod:`~lrpkit.evaluate.sources` (the images), :mod:`~lrpkit.evaluate.distributed`
(devices, ``torchrun``), :mod:`~lrpkit.evaluate.store` (the output folder) and :mod:`~lrpkit.evaluate.report`
(summary, table, CSV and plot); this module scores and orchestrates.

Reference for the metrics: see :mod:`lrpkit.evaluate` (Samek et al. 2017; Petsiuk et al. 2018; Arras et al. 2022).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# CSV_COLUMNS (from .report) is unused here: imported so that the tests' ``runner.CSV_COLUMNS`` keeps working
from ..families import GENERIC, family_of
from ..families.timm_vit import VIT_METHODS
from .distributed import _Dist, resolve_device, shard
from .report import CSV_COLUMNS, METRICS, _write_csv, format_summary, plot_curves, summarize  # noqa: F401
from .sources import Batch, GeneratedImages, ImageFolder
from .store import CONFIG, CSV_FILE, FORMAT_VERSION, PLOT, RESULTS, SUMMARY, _check_config, _Store, parameter_digest

__all__ = [
    "DEFAULT_METHODS_VIT",
    "DEFAULT_METHODS_CNN",
    "EvaluationResult",
    "run_evaluation",
    "score_batch",
]

#: Methods evaluated by default on a vision transformer (the ``timm-vit`` family's ``methods``).
DEFAULT_METHODS_VIT = VIT_METHODS
#: Methods evaluated by default on other models (the ``generic`` family's ``methods``).
DEFAULT_METHODS_CNN = GENERIC.methods


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


def _patch_size(model: nn.Module) -> int | None:
    """The model family's square patch size, or None."""
    size = family_of(model).geometry(model, None).patch_size
    return int(size[0]) if size is not None and size[0] == size[1] else None


def _methods(names, model: nn.Module, prep, method_seed: int, log) -> dict:
    from ..app import method_registry

    if isinstance(names, str):
        names = [names]
    if names is None or list(names) in ([], ["default"]):
        names = list(family_of(model).methods)
        skip_inapplicable = True
    elif list(names) == ["all"]:
        names, skip_inapplicable = list(method_registry.METHODS), True
    else:
        names, skip_inapplicable = list(names), False
        if "all" in names:
            raise ValueError("'all' cannot be combined with other method names; give --method all alone")
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice in {names}")
    unknown = [n for n in names if n not in method_registry.METHODS]
    if unknown:
        method_registry.make_method(unknown[0], model, prep, method_seed)  # the registry's error, with suggestions
    built = {}
    for n in names:
        try:
            built[n] = method_registry.make_method(n, model, prep, method_seed)
        except ValueError as err:
            if not skip_inapplicable:
                raise
            log(f"skipping {n}: {err}")
    if not built:
        raise ValueError("none of the chosen methods applies to this model")
    return built


@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` returns. On rank 0 (and in a single process): ``rows`` (one dict per
    (image, method) in scope, image order then method order), ``summary`` (see
    :func:`~lrpkit.evaluate.report.summarize`), ``table`` (printable), ``files`` (name -> path). ``computed``:
    pairs computed in this run (by all processes); ``reused``: pairs of the scope found in the folder at the
    start; ``images`` and ``total``: the images and (image, method) pairs of the scope; ``complete``: every pair
    of the scope done.
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


def run_evaluation(out: str | Path = "lrpkit-out/evaluate", *, model: str | nn.Module = "demo_vit",
                   weights: str | Path | None = None, preprocess=None, methods=None, n: int = 32, seed: int = 1000,
                   data: str | Path | None = None, batch_size: int = 8, device: str | torch.device | None = "auto",
                   patch_size: int | None = None, steps: int = 16, deletion_steps: int = 32, method_seed: int = 0,
                   overwrite: bool = False, limit: int | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate explainers over images and write the results to ``out`` (see the module docstring).

    - ``model``: a name for :func:`lrpkit.app.zoo.load_model` (with ``weights``; a timm/torchvision model without
      weights is built with ``torch.manual_seed(0)`` so that every process and every rerun gets the same random
      weights), or an ``nn.Module`` with ``preprocess`` (a :class:`~lrpkit.app.preprocess.Preprocess`); a module is
      copied, never modified.
    - ``methods``: names of :data:`lrpkit.app.method_registry.METHODS`; None for the defaults
      (:data:`DEFAULT_METHODS_VIT` or :data:`DEFAULT_METHODS_CNN`), ``"all"`` for every method that applies to the
      model. SmoothGrad and ViT-CX are built with ``method_seed``.
    - images: ``data`` (an :class:`~lrpkit.evaluate.sources.ImageFolder`) or, without it, ``n`` generated images
      of stream ``seed`` at the model's input size.
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
    from ..app import zoo

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
        module, prep = zoo.load_model(model, weights)
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
                    rows.append({"image": ids[j], "method": name, "label": batch.labels[j], "target": int(target[j]),
                                 "has_mask": batch.has_mask[j], **s, "computed_by": dist.rank})
                store.append(store.own, rows)
                new_rows.extend(rows)
                bar.update(len(rows))
    return new_rows
