"""Reference samples: what a concept looks like. :func:`reference_samples` scans a data set and keeps, per concept
(a channel of a layer), the k samples on which the concept is strongest, each with the crop of the input that the
concept's maximal position sees.

Relevance maximisation (``mode="relevance"``, Achtibat et al. 2023): sample x ranks concept c by

$$s_c(x) = \\max_p R_{c,p}(x),$$

the largest relevance of channel c over its positions p at the layer's output, where R is the LRP relevance of
the explained output (the one-hot of the target, as :class:`lrpkit.LRP`; ``target=None``: each sample's predicted
class); ``statistic="sum"`` ranks by ``Σ_p R_{c,p}(x)`` instead (zennit-crp's default). Activation maximisation
(``mode="activation"``) ranks by the largest activation instead, ``s_c(x) = max_p a_{c,p}(x)``. The two differ
where a channel is active but not used for the decision: a large activation whose relevance is small or negative
(it pointed away from the class) ranks high for activation and low for relevance. Relevance maximisation finds the
samples for which the concept mattered.

The k samples of concept c are those with the largest s_c, on equal scores the smaller sample index first. Each
comes with its position p* (the argmax) and its crop box (:mod:`lrpkit.crp.crops`: the receptive field of p* in
a CNN, the patch of the token in a ViT).

Scanning runs in batches with a tqdm bar. With ``cache=DIR`` the progress is saved after every batch and a rerun
resumes where the last one stopped. Under ``torchrun`` (``WORLD_SIZE`` > 1) each process scans every
world-th pending batch and rank 0 merges the shards, with the machinery of ``lrpkit evaluate``
(:mod:`lrpkit.evaluate.distributed`: the process group, the shard; :mod:`lrpkit.evaluate.store`: the weights'
digest and the configuration check of the cache folder). Since the top-k of a union is the top-k of its parts'
top-k (:class:`lrpkit.crp.ranking.TopK`), a resumed or sharded scan gives the result of one uninterrupted pass.

Reference: Achtibat, Dreyer, Eisenbraun, Bosse, Wiegand, Samek, Lapuschkin 2023, "From attribution maps to
human-understandable explanations through Concept Relevance Propagation", Nature Machine Intelligence 5,
1006-1019 (section "Relevance maximization").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analyzer import LRP
from ..evaluate.distributed import _Dist, shard
from ..evaluate.store import CONFIG, _check_config, parameter_digest
from .crops import check_crop_geometry, crop_boxes
from .data import ScanData
from .locate import LayerRef, locate
from .probe import channel_maps, channel_scores, layer_activation, layer_relevance, tokens_layout
from .ranking import TopK

__all__ = ["ReferenceSamples", "reference_samples"]

MODES = ("relevance", "activation")
STATE, RANK_STATES = "state.pt", "state.rank*.pt"
FORMAT = 1


@dataclass
class ReferenceSamples:
    """The result of :func:`reference_samples`. Row r is concept ``concepts[r]``; column j its j-th best sample.

    ``scores`` (K, k) float64: s_c of the sample (see the module docstring); ``indices`` (K, k): the sample's index
    in the data set; ``positions`` (K, k): where in the layer the maximum was (a flat index over the positions of
    a channel: ``h·W + w`` of a feature map, the token index of a ViT); ``labels`` (K, k): the sample's label (-1
    where the data has none); ``boxes`` (K, k, 4): the crop ``(y0, x0, y1, x1)``, half-open, in input pixels (None
    with ``crops=False``). ``layer``: the module path asked for; ``index``: the layer's rule-table index;
    ``input_shape`` / ``layer_shape``: one sample's input and layer output shape; ``samples``: the size of the data
    set.
    """

    layer: object
    index: int
    mode: str
    concepts: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None
    input_shape: tuple
    layer_shape: tuple
    samples: int

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def row(self, channel: int) -> int:
        """The row of concept (channel) ``channel``."""
        hits = (self.concepts == channel).nonzero()
        if not len(hits):
            raise KeyError(f"channel {channel} was not scanned; the concepts are {self.concepts.tolist()}")
        return int(hits[0, 0])

    def crop(self, image: torch.Tensor, row: int, j: int) -> torch.Tensor:
        """The crop of sample ``j`` of concept row ``row`` out of its input ``image`` (C, H, W)."""
        if self.boxes is None:
            raise ValueError("this scan has no crops (crops=False)")
        y0, x0, y1, x1 = self.boxes[row, j].tolist()
        return image[..., y0:y1, x0:x1]


def _unpack(analyzer, layer, concepts):
    """``(lrp, layer, concepts)`` from an :class:`lrpkit.LRP` or a CRP analyzer (its ``lrp``; its ``layer`` and
    channels when not given)."""
    if isinstance(analyzer, LRP):
        return analyzer, layer, concepts
    lrp = getattr(analyzer, "lrp", None)
    if not isinstance(lrp, LRP):
        raise TypeError(f"reference_samples needs an lrpkit.LRP or an lrpkit.CRP, got {type(analyzer).__name__}")
    if layer is None:
        layer = getattr(analyzer, "layer", None)
    if concepts is None:
        chosen = getattr(analyzer, "concepts", None)
        concepts = getattr(chosen, "channels", None)  # IndexedConcepts; TopConcepts: all channels
    return lrp, layer, concepts


def _channels(concepts, count: int) -> torch.Tensor:
    """The scanned channels: all for None; else ints (or an object with ``channels``, as IndexedConcepts)."""
    if concepts is None:
        return torch.arange(count)
    concepts = getattr(concepts, "channels", concepts)
    if isinstance(concepts, int) and not isinstance(concepts, bool):
        concepts = [concepts]
    try:
        values = [int(c) for c in concepts]
        if any(isinstance(c, bool) or float(c) != int(c) for c in concepts):
            raise ValueError
    except (TypeError, ValueError):
        raise TypeError(f"concepts must be None (every channel), channel indices or IndexedConcepts, got "
                        f"{concepts!r}") from None
    if not values:
        raise ValueError("concepts is empty; give at least one channel, or None for every channel")
    bad = [c for c in values if not 0 <= c < count]
    if bad:
        raise ValueError(f"channel {bad[0]} is out of range: the layer has {count} channels (0..{count - 1})")
    if len(set(values)) != len(values):
        raise ValueError(f"a channel is named twice in {values}")
    return torch.tensor(values, dtype=torch.long)


def _check_args(mode, k, batch_size, target) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'relevance' or 'activation', got {mode!r}")
    for name, value in (("k", k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (target is None or target == "label" or (isinstance(target, int) and not isinstance(target, bool))):
        raise ValueError(f"target must be None (each sample's predicted class), a class index or 'label' (each "
                         f"sample's label), got {target!r}")


class _Cache:
    """The cache folder: ``config.json`` (checked by :func:`lrpkit.evaluate.store._check_config`), ``state.pt``
    (merged progress) and ``state.rank{r}.pt`` (one process's progress in the current run)."""

    def __init__(self, folder, rank: int):
        self.folder = None if folder is None else Path(folder)
        self.own = None if folder is None else self.folder / f"state.rank{rank}.pt"

    def prepare(self, identity: dict, overwrite: bool) -> str | None:
        """On rank 0: the configuration check; an error text or None."""
        if self.folder is None:
            return None
        if self.folder.exists() and not self.folder.is_dir():
            return f"cache {self.folder} is a file; give a folder (it is created when missing)"
        states = [self.folder / STATE, *self.folder.glob(RANK_STATES)] if self.folder.is_dir() else []
        if overwrite:
            for f in states:
                f.unlink(missing_ok=True)
        elif any(f.is_file() for f in states) and not (self.folder / CONFIG).is_file():
            return f"cache {self.folder} holds a scan's state but no {CONFIG}; choose another cache or pass " \
                   f"overwrite=True"
        error = _check_config(self.folder, identity, overwrite)
        return None if error is None else error.replace("--out", "cache").replace("--overwrite", "overwrite=True")

    def collect(self, k: int) -> dict | None:
        """On rank 0: every saved state merged into ``state.pt`` (the per-rank files removed)."""
        if self.folder is None:
            return None
        files = [self.folder / STATE, *sorted(self.folder.glob(RANK_STATES))]
        merged = None
        for f in files:
            if f.is_file():
                merged = _merge_states(merged, torch.load(f, weights_only=True), k)
        if merged is not None:
            self.write(self.folder / STATE, merged)
        for f in files[1:]:
            f.unlink(missing_ok=True)
        return merged

    @staticmethod
    def write(path: Path, state: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one


def _state(done: set, top: TopK, meta: dict) -> dict:
    return {"format": FORMAT, "done": sorted(done), "topk": top.state(), "meta": meta}


def _merge_states(a: dict | None, b: dict | None, k: int) -> dict | None:
    if a is None or b is None:
        return a if b is None else b
    top = TopK.from_state(a["topk"]).merged(TopK.from_state(b["topk"]), k)
    return _state(set(a["done"]) | set(b["done"]), top, a["meta"] or b["meta"])


def _identity(lrp: LRP, ref: LayerRef, mode, statistic, channels, k, target, data: ScanData) -> dict:
    rules = hashlib.sha256(lrp.table().encode()).hexdigest()[:16]
    return {"version": FORMAT, "parameters": parameter_digest(lrp.chain), "rules": rules,
            "layer": f"{ref.index} {ref.name}", "mode": mode, "statistic": statistic, "concepts": channels.tolist(),
            "k": k, "target": target if mode == "relevance" else None, "data": data.identity()}


def _scores(lrp, ref, mode, x, labels, target, tokens, channels, statistic):
    if mode == "relevance":
        if target == "label":
            if labels is None:
                raise ValueError("target='label' needs one integer label per sample in the data ((x, y) samples "
                                 "or batches)")
            target = labels.to(lrp.device or "cpu")
        value, _ = layer_relevance(lrp, ref, x, target)
    else:
        value = layer_activation(lrp, ref, x)
    return value, channel_scores(channel_maps(value, tokens), channels.to(value.device), statistic)


def reference_samples(crp_or_lrp, dataset, layer=None, concepts=None, k: int = 16, mode: str = "relevance", *,
                      statistic: str = "max", target=None, batch_size: int = 32, cache: str | Path | None = None,
                      overwrite: bool = False, crops: bool = True, num_workers: int = 0,
                      progress: bool = True) -> ReferenceSamples:
    """Per concept the ``k`` samples of ``dataset`` with the largest maximal relevance (``mode="relevance"``) or
    activation (``mode="activation"``) at ``layer`` (see the module docstring).

    - ``crp_or_lrp``: an :class:`lrpkit.LRP` (its composite gives the relevance), or a CRP analyzer (its LRP, and
      its layer and channels when ``layer`` / ``concepts`` are not given).
    - ``dataset``: a torch ``Dataset`` of samples ``x`` or ``(x, label, ...)``, a tensor of samples, or an iterable
      of batches ``x`` or ``(x, labels, ...)`` that gives the same batches in every pass
      (:mod:`lrpkit.crp.data`). All samples have one shape.
    - ``layer``: a module path of the original model or a rule-table index (:mod:`lrpkit.crp.locate`).
    - ``concepts``: the channels to scan: None (every channel), channel indices, or ``IndexedConcepts``.
    - ``statistic``: ``"max"`` ranks by the maximum over the positions (the definition above), ``"sum"`` by the
      sum (zennit-crp's default ``max_target="sum"``: a concept present all over the sample ranks high); the
      crop is that of the maximum either way.
    - ``target`` (relevance mode): None (each sample's predicted class), a class index, or ``"label"`` (each
      sample's label).
    - ``batch_size``: samples per forward/backward pass for a ``Dataset`` (an iterable's batches are used as
      they come); ``num_workers``: data-loading processes for a ``Dataset``.
    - ``cache``: a folder where progress is saved after every batch; a rerun with the same arguments resumes
      (another model, layer, mode, data, ... is refused; ``overwrite=True`` starts again).
    - ``crops``: compute the crop boxes (an error before scanning when a layer's geometry is unknown).

    Raises ``ValueError`` for an unknown layer, a channel out of range, or ``k`` larger than the data set.
    Under ``torchrun`` every process returns the same result.
    """
    lrp, layer, concepts = _unpack(crp_or_lrp, layer, concepts)
    _check_args(mode, k, batch_size, target)
    if statistic not in ("max", "sum"):
        raise ValueError(f"statistic must be 'max' or 'sum', got {statistic!r}")
    if layer is None:
        raise ValueError("name the layer: layer='features.28' (a module path) or a rule-table index")
    ref = locate(lrp, layer)
    if ref.site is not None:
        raise ValueError(f"the reference-sample scan reads layer outputs; {layer!r} is a rule's inner site (CRP can "
                         f"condition there, the scan cannot): choose a layer, e.g. {ref.name!r}")
    data = ScanData(dataset, batch_size, num_workers)
    if data.size is not None and k > data.size:
        raise ValueError(f"k={k} is larger than the data set ({data.size} samples); choose k <= {data.size}")
    x0, _ = data.first()
    probe = layer_activation(lrp, ref, x0[:1])
    tokens = tokens_layout(lrp, probe)
    count = probe.shape[-1] if tokens else probe.shape[1]
    channels = _channels(concepts, count)
    if crops:
        check_crop_geometry(lrp, ref, tuple(x0.shape[1:]))

    # the process group of a torchrun launch, created on first use and kept for later calls: torch cannot create
    # the default group again in a process once it was destroyed
    dist = _Dist(lrp.device or torch.device("cpu"))
    store = _Cache(cache, dist.rank)
    identity = _identity(lrp, ref, mode, statistic, channels, k, target, data) if cache is not None else None
    error = dist.broadcast(store.prepare(identity, overwrite) if dist.rank == 0 else None)
    if error:
        raise ValueError(error)
    start = dist.broadcast(store.collect(k) if dist.rank == 0 else None)
    done = set(start["done"]) if start else set()
    own, failure = _scan(lrp, ref, mode, statistic, target, tokens, channels, k, data, done, store, dist, progress)
    statuses = dist.all_gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    bad = [(r, s) for r, s in enumerate(statuses) if s]
    if bad:
        raise RuntimeError(f"rank {bad[0][0]} failed ({bad[0][1]}); the finished batches are saved in the "
                           f"cache, rerun to resume")
    result = None
    parts = dist.gather(own)
    if dist.rank == 0:
        for part in parts:
            start = _merge_states(start, part, k)
        if store.folder is not None:
            _Cache.write(store.folder / STATE, start)
            for f in store.folder.glob(RANK_STATES):
                f.unlink(missing_ok=True)
        result = start
    result = dist.broadcast(result)
    dist.barrier()
    samples = data.size
    if samples < k:
        raise ValueError(f"k={k} is larger than the data set ({samples} samples); choose k <= {samples}")
    top, meta = TopK.from_state(result["topk"]), result["meta"]
    boxes = crop_boxes(lrp, ref, top.positions, tuple(meta["input_shape"])) if crops else None
    return ReferenceSamples(layer, ref.index, mode, channels, top.scores, top.indices, top.positions, top.labels,
                            boxes, tuple(meta["input_shape"]), tuple(meta["layer_shape"]), samples)


def _scan(lrp, ref, mode, statistic, target, tokens, channels, k, data, done, store, dist, progress):
    """This process's share of the pending batches: ``(its state, the exception that stopped it or None)``."""
    from tqdm.auto import tqdm

    top, mine, meta = TopK.empty(len(channels)), set(), {}
    pending = [b for b in range(data.batches) if b not in done] if data.batches is not None else None
    share = set(shard(pending, dist.rank, dist.world)) if pending is not None else None
    seen = [0]

    def wanted(b: int) -> bool:  # an iterable: every world-th pending batch, counted as they come
        if b in done:
            return False
        seen[0] += 1
        return b in share if share is not None else (seen[0] - 1) % dist.world == dist.rank

    desc = "reference samples" + (f" (rank 0 of {dist.world})" if dist.active else "")
    failure = None
    with tqdm(total=len(share) if share is not None else None, disable=not (progress and dist.rank == 0),
              desc=desc, unit="batch") as bar:
        try:
            for b, first, x, labels in data.read(wanted):
                if meta and list(x.shape[1:]) != meta["input_shape"]:
                    raise ValueError(f"batch {b} has samples of shape {tuple(x.shape[1:])}, the first batch "
                                     f"{tuple(meta['input_shape'])}; all samples need one shape")
                value, (scores, positions) = _scores(lrp, ref, mode, x, labels, target, tokens, channels, statistic)
                meta = meta or {"input_shape": list(x.shape[1:]), "layer_shape": list(value.shape[1:])}
                indices = torch.arange(first, first + x.shape[0])
                top = top.merged(TopK.from_batch(scores, positions, indices, labels), k)
                mine.add(b)
                if store.own is not None:
                    _Cache.write(store.own, _state(mine, top, meta))
                bar.update(1)
        except Exception as err:  # noqa: BLE001 - reported to the other ranks, then raised
            if not dist.active:
                raise
            failure = err
    if not meta:  # nothing to compute here: the shapes of the first batch
        x0, _ = data.first()
        meta = {"input_shape": list(x0.shape[1:]),
                "layer_shape": list(layer_activation(lrp, ref, x0[:1]).shape[1:])}
    return _state(mine, top, meta), failure
