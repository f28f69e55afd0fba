"""The result of :class:`lrpkit.CRP`: :class:`ConceptExplanation`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ConceptExplanation:
    """The conditional relevance of K concepts per sample, for ``output[b, target[b]]``.

    ``relevance``: (B, K, *input.shape[1:]), the input relevance of each concept (what flows through that channel of
    the layer); ``concepts``: (B, K) long, the channel of each concept; ``concept_relevance``: (B, K), each concept's
    relevance at the layer summed over positions; ``channel_relevance``: (B, C), that of every channel of the layer
    (``concept_relevance`` is ``channel_relevance.gather(1, concepts)``;
    ``channel_relevance / channel_relevance.sum(1)`` is the share of the layer's relevance each channel carries);
    ``output``: the model's output; ``target``: (B,) explained class per sample (None for an explicit output
    relevance); ``layer``: the layer's name.
    ``heatmap`` is (B, K, H, W) for image inputs.
    """

    relevance: torch.Tensor
    concepts: torch.Tensor
    concept_relevance: torch.Tensor
    channel_relevance: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor | None
    layer: str
    method: str = "CRP"
    patch_size: tuple | None = None

    @property
    def heatmap(self) -> torch.Tensor:
        """(B, K, H, W): each concept's input relevance summed over the input channels (image inputs)."""
        if self.relevance.ndim != 5:
            raise AttributeError(f"heatmap needs image inputs (B, C, H, W); the relevance is "
                                 f"{tuple(self.relevance.shape)} (B, K, ...)")
        return self.relevance.sum(2)
