"""Which concepts CRP explains: :class:`TopConcepts` (the most relevant channels of each sample) and
:class:`IndexedConcepts` (given channels).

A concept is one channel of the layer's output (dim 1 of a (B, C, ...) feature map, the last dim of (B, N, C)
tokens). Both selectors see the channels' relevance at the layer, ``R_c = Σ_p R_{c,p}`` summed over the positions
``p``, one row per sample, and return the selected channels, (B, K) long.
"""

from __future__ import annotations

import torch


class Concepts:
    """Base class: ``select(channel_relevance (B, C), layer) -> (B, K)`` channel indices (long); ``count``: K."""

    count: int

    def select(self, channel_relevance: torch.Tensor, layer: str) -> torch.Tensor:
        raise NotImplementedError


class TopConcepts(Concepts):
    """The ``k`` channels with the largest relevance at the layer, per sample, in decreasing order of
    ``R_c = Σ_p R_{c,p}`` (relevance, not its magnitude: a channel that speaks against the class comes last).
    Achtibat et al. 2023 call this the concepts' relevance; RelevancePropagation.jl's ``TopNFeatures``."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopConcepts needs a number of concepts k >= 1, got {k!r}")
        self.k = self.count = k

    def select(self, channel_relevance: torch.Tensor, layer: str) -> torch.Tensor:
        channels = channel_relevance.shape[1]
        if self.k > channels:
            raise ValueError(f"TopConcepts({self.k}) asks for more concepts than layer {layer!r} has channels "
                             f"({channels}); use k <= {channels}")
        return channel_relevance.topk(self.k, dim=1, sorted=True).indices

    def __repr__(self) -> str:
        return f"TopConcepts({self.k})"


class IndexedConcepts(Concepts):
    """The given channels, in the given order, for every sample: ``IndexedConcepts(5, 17)``. RelevancePropagation.jl's
    ``IndexedFeatures``."""

    def __init__(self, *channels: int):
        if not channels:
            raise ValueError("IndexedConcepts needs at least one channel index, e.g. IndexedConcepts(5, 17)")
        bad = [c for c in channels if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad:
            raise ValueError(f"IndexedConcepts takes channel indices >= 0 (ints), got {bad}")
        self.channels = tuple(channels)
        self.count = len(self.channels)

    def select(self, channel_relevance: torch.Tensor, layer: str) -> torch.Tensor:
        count = channel_relevance.shape[1]
        out = [c for c in self.channels if c >= count]
        if out:
            raise ValueError(f"channel {out[0] if len(out) == 1 else out} out of range: layer {layer!r} has {count} "
                             f"channels (0..{count - 1})")
        index = torch.tensor(self.channels, dtype=torch.long, device=channel_relevance.device)
        return index.expand(channel_relevance.shape[0], -1)

    def __repr__(self) -> str:
        return f"IndexedConcepts({', '.join(map(str, self.channels))})"
