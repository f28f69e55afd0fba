"""The data of a reference-sample scan, in numbered batches: a torch ``Dataset`` (map-style: loaded by index, so a
rank or a resumed run loads only the batches it computes) or an iterable of batches (a ``DataLoader``, a list of
tensors, a generator: read in order, every pass; it must give the same batches in the same order each time, so no
shuffling).

A sample (of a ``Dataset``) or a batch (of an iterable) is a tensor ``x``, or a tuple or list whose first item is
``x`` and whose second item, if any, is the label (an integer, or (B,) integers for a batch). Sample ``i`` is the
``i``-th sample in order: ``dataset[i]``, or the ``i``-th row counted over the batches of the iterable.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

__all__ = ["ScanData", "load_samples"]


def _split(item) -> tuple[torch.Tensor, object]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0], (item[1] if len(item) > 1 else None)
    raise TypeError(f"a batch must be a tensor or a tuple/list (x, label, ...) with x a tensor, got "
                    f"{type(item).__name__}; wrap the data in a torch Dataset or a generator that gives (x, y)")


def _labels(y, b: int) -> torch.Tensor | None:
    """(B,) long labels, or None when ``y`` is not one integer per sample."""
    if y is None:
        return None
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.is_floating_point() or t.is_complex() or t.ndim != 1 or t.shape[0] != b:
        return None
    return t.long().cpu()


def _digest(x: torch.Tensor) -> str:
    t = x.detach().cpu().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode() + t.reshape(-1).view(torch.uint8).numpy()
                          .tobytes()).hexdigest()[:16]


class ScanData:
    """``dataset`` cut into numbered batches of ``batch_size`` (map-style) or taken as its own batches."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0):
        if isinstance(dataset, torch.Tensor):
            dataset = TensorDataset(dataset)
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.indexed = isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and \
            hasattr(dataset, "__len__")
        if not self.indexed and not hasattr(dataset, "__iter__"):
            raise TypeError(f"dataset must be a torch Dataset, a tensor or an iterable of batches, got "
                            f"{type(dataset).__name__}")
        self.size = len(dataset) if self.indexed else None  # samples; counted while reading for an iterable
        self._first, self._rest = None, None

    @property
    def batches(self) -> int | None:
        """The number of batches, when known before reading (map-style)."""
        return None if self.size is None else -(-self.size // self.batch_size)

    def first(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first batch's ``(x, labels)`` (of a map-style dataset: its first sample), read once."""
        if self._first is None:
            if self.indexed:
                if self.size == 0:
                    raise ValueError("the dataset is empty")
                x, y = self._collate([0])
            else:
                iterator = iter(self.dataset)
                try:
                    item = next(iterator)
                except StopIteration:
                    raise ValueError("the dataset is empty (the iterable gave no batch)") from None
                self._rest = itertools.chain([item], iterator)  # a generator is read once: keep what was taken
                x, y = _split(item)
                y = _labels(y, x.shape[0])
            self._first = (x, y)
        return self._first

    def identity(self) -> dict:
        """What a cached scan's results depend on: the kind, the size and a digest of the first batch."""
        x, _ = self.first()
        return {"kind": "dataset" if self.indexed else "batches", "samples": self.size,
                "batch_size": self.batch_size if self.indexed else None, "first": _digest(x)}

    def _collate(self, indices: list[int]):
        x, y = _split(default_collate([self.dataset[i] for i in indices]))
        return x, _labels(y, x.shape[0])

    def read(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """``(batch id, index of its first sample, x, labels)`` for every batch with ``wanted(batch id)``, in
        order. An iterable is read whole (the samples of the batches not wanted are counted, not returned);
        ``self.size`` is its number of samples afterwards."""
        if self.indexed:
            ids = [b for b in range(self.batches) if wanted(b)]
            spans = [list(range(b * self.batch_size, min(self.size, (b + 1) * self.batch_size))) for b in ids]
            if not ids:
                return
            loader = DataLoader(self.dataset, batch_sampler=spans, num_workers=self.num_workers)
            for b, span, item in zip(ids, spans, loader):
                x, y = _split(item)
                yield b, span[0], x, _labels(y, x.shape[0])
            return
        self.first()
        source, self._rest = self._rest, None
        if source is None:
            source = iter(self.dataset)
        count = 0
        for b, item in enumerate(source):
            x, y = _split(item)
            if wanted(b):
                yield b, count, x, _labels(y, x.shape[0])
            count += x.shape[0]
        self.size = count


def load_samples(dataset, indices) -> torch.Tensor:
    """The inputs of samples ``indices`` (any shape of ints) of ``dataset``, stacked to ``(*indices.shape, *x)``:
    by index from a map-style dataset (or a tensor), in one pass over an iterable of batches (see the module
    docstring for what sample ``i`` is)."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    flat = idx.reshape(-1).tolist()
    if isinstance(dataset, torch.Tensor):
        return dataset[idx]
    data = ScanData(dataset, 1)
    found: dict[int, torch.Tensor] = {}
    if data.indexed:
        for i in set(flat):
            found[i] = _split(dataset[i])[0]
    else:
        wanted, count = set(flat), 0
        for item in dataset:
            x = _split(item)[0]
            for i in wanted & set(range(count, count + x.shape[0])):
                found[i] = x[i - count]
            count += x.shape[0]
        missing = sorted(wanted - set(found))
        if missing:
            raise IndexError(f"sample {missing[0]} is beyond the {count} samples of the data")
    return torch.stack([found[i] for i in flat]).reshape(*idx.shape, *found[flat[0]].shape)
