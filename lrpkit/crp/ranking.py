"""The running top-k of a reference-sample scan: per concept the k samples with the largest scores, kept as a few
(K, k) tensors that merge exactly and in any order.

The order is total: a larger score first, on equal scores the smaller sample index first. The top-k of a union is
the top-k of the union of the parts' top-k, so batches, shards of processes and resumed runs merge to the very
result of one uninterrupted pass. A sample that appears in both parts (a part merged twice after a crash) is kept
once, so merging is also idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TopK"]

_FIELDS = ("scores", "indices", "positions", "labels")


@dataclass
class TopK:
    """Per concept (row) the best samples so far, best first: ``scores`` (K, m) float64, ``indices`` (K, m) the
    samples' indices in the data set, ``positions`` (K, m) where in the layer the maximum was, ``labels`` (K, m)
    the samples' labels (-1: unknown). ``m`` ≤ k grows as samples come in."""

    scores: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def empty(cls, concepts: int) -> "TopK":
        long = torch.zeros(concepts, 0, dtype=torch.long)
        return cls(torch.zeros(concepts, 0, dtype=torch.float64), long, long.clone(), long.clone())

    @classmethod
    def from_batch(cls, scores: torch.Tensor, positions: torch.Tensor, indices: torch.Tensor,
                   labels: torch.Tensor | None) -> "TopK":
        """Candidates of one batch: ``scores`` and ``positions`` (B, K), ``indices`` and ``labels`` (B,)."""
        b, k = scores.shape
        labels = torch.full((b,), -1, dtype=torch.long) if labels is None else labels
        return cls(scores.detach().double().cpu().T.contiguous(), indices.long().cpu().expand(k, b).contiguous(),
                   positions.long().cpu().T.contiguous(), labels.long().cpu().expand(k, b).contiguous())

    @property
    def count(self) -> int:
        return self.scores.shape[1]

    def merged(self, other: "TopK", k: int) -> "TopK":
        """The best ``k`` per concept of both, in the total order of the module docstring, duplicates once."""
        cat = {f: torch.cat([getattr(self, f), getattr(other, f)], 1) for f in _FIELDS}
        if cat["scores"].isnan().any():
            raise ValueError("a score is NaN: the relevance or activation at the layer is not finite for a sample")
        order = cat["indices"].argsort(dim=1, stable=True)  # by index, then (stably) by score: ties by index
        cat = {f: v.gather(1, order) for f, v in cat.items()}
        order = cat["scores"].argsort(dim=1, descending=True, stable=True)
        cat = {f: v.gather(1, order) for f, v in cat.items()}
        idx = cat["indices"]
        # a repeated sample: the same index seen earlier in its row (equal scores, so the entries are equal)
        same = (idx[:, :, None] == idx[:, None, :]).tril(-1).any(2)
        order = same.to(torch.uint8).argsort(dim=1, stable=True)  # the first occurrences, in order, then the repeats
        cat = {f: v.gather(1, order) for f, v in cat.items()}
        keep = min(k, int((~same).sum(1).min()) if idx.shape[1] else 0)
        return TopK(**{f: v[:, :keep].contiguous() for f, v in cat.items()})

    def state(self) -> dict:
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_state(cls, state: dict) -> "TopK":
        return cls(**{f: state[f] for f in _FIELDS})
