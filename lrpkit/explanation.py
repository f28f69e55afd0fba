"""The result of every explainer in lrpkit: :class:`Explanation` and the relevance :class:`Accounting`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Accounting:
    """Where the output relevance went, per sample (each entry a tensor of shape (B,)).

    ``output``: the relevance put on the output; ``input``: what reached the input; ``parts``: what stayed behind,
    by sink (``bias``, ``stabilizer``, ``class_token``, ``distillation_token``, ``register_tokens``,
    ``positional_embedding``, ``attention``). ``output = input + Σ parts`` holds by construction (the
    ``stabilizer`` part is the remainder of each layer after its explicit sinks); the parts say which sink took
    how much. ``layers``: the same split per layer, as (index, name, {sink: (B,)}).
    """

    output: torch.Tensor
    input: torch.Tensor
    parts: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)

    @classmethod
    def deferred(cls, compute) -> "Accounting":
        """An accounting whose fields are those of ``compute()``, called when one of them is first read (LRP's
        reverse loop only sums; the arithmetic on the sums waits until someone looks). Until then ``vars()`` shows
        no fields; ``dataclasses.asdict``, ``==``, ``copy`` and ``pickle`` read them and so work it out."""
        acc = cls.__new__(cls)
        acc.__dict__["_compute"] = compute
        return acc

    def __getattr__(self, name):  # only for attributes not set yet: a deferred accounting's fields
        compute = self.__dict__.get("_compute")
        if compute is None or name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        done = compute()
        self.__dict__.update({k: getattr(done, k) for k in self.__dataclass_fields__})
        self.__dict__.pop("_compute", None)
        return self.__dict__[name]

    def __getstate__(self) -> dict:  # a deferred accounting is worked out before it is copied or pickled
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def total(self) -> torch.Tensor:
        """``input + Σ parts`` (B,): equals ``output`` up to float rounding."""
        return self.input + sum(self.parts.values(), torch.zeros_like(self.input))

    def __str__(self) -> str:
        rows = [("output", self.output), ("input", self.input)] + sorted(self.parts.items())
        return "\n".join(f"{name:>20}: " + " ".join(f"{v:+.4g}" for v in value.tolist()) for name, value in rows)


@dataclass
class Explanation:
    """An explanation of ``output[b, target[b]]`` for each sample ``b`` of a batch.

    ``relevance``: same shape as the input (None for token-level methods); ``output``: the model's output;
    ``target``: (B,) explained class per sample; ``method``: the explainer's name; ``layerwise``: relevance at
    every top-level layer's input (LRP, opt-in); ``accounting``: :class:`Accounting` (LRP);
    ``patch_size``: (ph, pw) for patch-based models. ``heatmap`` is (B, H, W) at input resolution for every method,
    ``patch_relevance`` (B, grid_h, grid_w) for models with a patch grid.
    """

    relevance: torch.Tensor | None
    output: torch.Tensor
    target: torch.Tensor | None
    method: str = "LRP"
    layerwise: list | None = None
    accounting: Accounting | None = None
    patch_size: tuple | None = None
    input_size: tuple | None = None
    token_relevance: torch.Tensor | None = None  # (B, gh, gw), for token-level methods
    extras: dict = field(default_factory=dict)

    @property
    def heatmap(self) -> torch.Tensor:
        """(B, H, W): the relevance summed over channels, or the token map upsampled bilinearly."""
        if self.relevance is not None:
            return self.relevance.sum(1) if self.relevance.ndim == 4 else self.relevance
        if self.token_relevance is None or self.input_size is None:
            raise AttributeError("this explanation has neither a relevance nor a token map with an input size")
        return F.interpolate(self.token_relevance.unsqueeze(1), size=tuple(self.input_size), mode="bilinear",
                             align_corners=False).squeeze(1)

    @property
    def patch_relevance(self) -> torch.Tensor:
        """(B, grid_h, grid_w): relevance summed over each patch (or the token map of token-level methods)."""
        if self.token_relevance is not None:
            return self.token_relevance
        if self.patch_size is None or self.relevance is None or self.relevance.ndim != 4:
            raise AttributeError("patch_relevance needs a patch-based model (a ViT) and an image input")
        (ph, pw), r = self.patch_size, self.relevance.sum(1)
        b, h, w = r.shape
        return r[:, : h - h % ph, : w - w % pw].reshape(b, h // ph, ph, w // pw, pw).sum((2, 4))
