"""``CRP``: Concept Relevance Propagation on an :class:`lrpkit.LRP` analyzer.

Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept Relevance
Propagation", Nature Machine Intelligence 5, 1006-1019; RelevancePropagation.jl's ``CRP``; zennit-crp's
``CondAttribution`` with a ``ChannelConcept``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._inference import outside_inference_mode
from ..analyzer import LRP, output_relevance
from ..tape import Tape
from .concepts import Concepts
from .explanation import ConceptExplanation
from .locate import channel_axis, locate


class CRP:
    """Concept Relevance Propagation (Achtibat et al. 2023): the input relevance of single channels of a layer.

    With ``R^ℓ`` the relevance at the output of layer ℓ that LRP computes from the output relevance (one-hot of the
    target by default, as :class:`lrpkit.LRP`), the conditional relevance of concept (channel) ``c`` is the reverse
    loop below ℓ started from that relevance with every other channel zeroed::

        R^ℓ(c)_{c',p} = R^ℓ_{c',p} · [c' = c]            (p: the positions, pixels or tokens)
        R(c)          = LRP_{ℓ→input}(R^ℓ(c))             (B, *x.shape[1:]) per concept

    and the concept's relevance at the layer is ``R^ℓ_c = Σ_p R^ℓ_{c,p}``. Only what flows through the layer counts:
    where ℓ lies in a branch of a container (the inside of a residual connection), the container's identity path and
    other branches get none of ``R(c)`` (zennit-crp's ``exclude_parallel=True``;
    :meth:`lrpkit.tape.Tape.backward_from`).
    The reverse loop is linear in the relevance, so ``Σ_c R(c)`` is the relevance through the layer: LRP's relevance
    where ℓ is on the main path, LRP's relevance less what flows around ℓ where it is not.

    ``lrp``: the analyzer (its canonized model, rules and plan). ``layer``: a module path of the original model, as
    in ``model.named_modules()`` (``"features.28"``, ``"blocks.5.mlp.fc1"``, ``"blocks.5"`` for the residual stream
    after block 5), ``"<attention>.values"`` for the attention heads' value outputs ``A_h v_h`` (an inner site of
    :class:`~lrpkit.rules.SelfAttentionRule`), or a layer index of ``lrp.table()``; a layer that canonization removed
    (a BatchNorm fused into the convolution before it, a Dropout) is an error that lists the layers that can be chosen.
    ``concepts``: :class:`~lrpkit.crp.TopConcepts` or :class:`~lrpkit.crp.IndexedConcepts`. The channel is dim 1 of a
    (B, C, ...) feature map and the last dim of (B, N, C) tokens (zennit-crp's ``ChannelConcept`` takes dim 1 always,
    which on tokens would be a token). ``batch_size``: the most (sample, concept) maps one reverse pass below the layer
    carries.

    Speed: the forward pass and the reverse loop above the layer run once per sample; below the layer, the K
    concepts of all samples go through one reverse pass (per ``batch_size`` maps), vectorised over the concepts with
    :func:`torch.func.vmap`:
    what the rules compute from the recorded activations alone (modified forward passes, denominators) is computed
    once per sample, only what involves the relevance once per concept. Call it on batches:
    ``crp(x, target=None, *, R=None, normalize_output=True) -> ConceptExplanation``.
    """

    def __init__(self, lrp: LRP, layer, concepts: Concepts, *, batch_size: int = 32):
        if not isinstance(lrp, LRP):
            raise TypeError(f"CRP runs on an LRP analyzer, got {type(lrp).__name__}; "
                            f"use lrpkit.CRP(lrpkit.LRP(model, composite), layer=..., concepts=...)")
        if not isinstance(concepts, Concepts):
            raise TypeError(f"concepts must be lrpkit.crp.TopConcepts(k) or lrpkit.crp.IndexedConcepts(*channels), "
                            f"got {concepts!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.lrp, self.concepts, self.batch_size = lrp, concepts, batch_size
        ref = locate(lrp, layer)
        self.step, self.site = ref.step, ref.site
        self.layer = self.step.name if isinstance(layer, int) else layer
        self.channel_axis = channel_axis(lrp.steps, self.step.index, self.site)

    @outside_inference_mode
    def __call__(self, x: torch.Tensor, target=None, *, R: torch.Tensor | None = None,
                 normalize_output: bool = True) -> ConceptExplanation:
        """Explain ``output[b, target[b]]`` by the concepts of each sample.

        ``target``: None (argmax per sample), an int, or one index per sample. ``R``: explicit output relevance of
        the output's shape (then ``target`` must be None). ``normalize_output``: start from 1 at the target (True)
        or from the target logit's value (False, where zennit-crp starts).
        """
        self.lrp._check_input(x)
        if R is not None and target is not None:
            raise ValueError("pass either target or R, not both")
        targets = _per_sample(target, x.shape[0])
        R = torch.as_tensor(R) if R is not None else None
        per_pass = max(1, self.batch_size // self.concepts.count)
        parts = [self._explain(x[i: i + per_pass], targets(i, i + per_pass),
                               None if R is None else R[i: i + per_pass], normalize_output)
                 for i in range(0, x.shape[0], per_pass)]
        fields = {name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None
                  for name in ("relevance", "concepts", "concept_relevance", "channel_relevance", "output", "target")}
        return ConceptExplanation(**fields, layer=self.layer, patch_size=self.lrp.patch_size)

    def _explain(self, x: torch.Tensor, target, R, normalize_output: bool) -> ConceptExplanation:
        tape, output, t, R_layer = self._above(x, target, R, normalize_output)
        channels = R_layer.movedim(self.channel_axis, 1).flatten(2).sum(2) if R_layer.ndim > 2 else R_layer
        concepts = self.concepts.select(channels, self.layer)
        return ConceptExplanation(relevance=self._below(tape, x, R_layer, concepts), concepts=concepts,
                                  concept_relevance=channels.gather(1, concepts), channel_relevance=channels,
                                  output=output, target=t, layer=self.layer)

    def _above(self, x: torch.Tensor, target, R, normalize_output: bool) -> tuple:
        """The forward pass and the reverse loop down to the layer: ``(tape, output, target, R at the layer)``; the
        records of the layer and of those below it stay on the tape."""
        index = self.step.index
        tape = Tape(self.lrp.plan, stop_at=index if self.site is None else (index, self.site))
        with torch.enable_grad():
            output = tape.forward(self.lrp.steps, x.detach()).detach()
        R_out, t = output_relevance(output, target, R, normalize_output)
        R_layer = tape.backward(self.lrp.steps, R_out).detach()
        if not tape.reached_stop:
            raise ValueError(f"no relevance reaches layer {self.layer!r}: the rules route none through it (e.g. the "
                             f"gate branch of a Multiply under ProductRule(mode='gate'), which holds the gate "
                             f"constant); choose a layer on the path of the relevance, or give that Multiply "
                             f"ProductRule(mode='uniform')")
        return tape, output, t, R_layer

    def _below(self, tape: Tape, x: torch.Tensor, R_layer: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """(B, K, *x.shape[1:]): each concept's relevance from the layer down, all concepts of a chunk in one reverse
        pass vectorised over them (torch.func.vmap: what the rules compute from the records alone, once)."""
        steps, index, site = self.lrp.steps, self.step.index, self.site
        per_pass, parts = max(1, self.batch_size // x.shape[0]), []
        for k in range(0, concepts.shape[1], per_pass):
            if k > 0:  # the records below the layer went with the pass before: record them again
                tape = Tape(self.lrp.plan)
                with torch.enable_grad():
                    tape.forward(steps, x.detach())
            R_c = keep_channels(R_layer, concepts[:, k: k + per_pass], self.channel_axis)  # (K, B, ...)
            parts.append(torch.func.vmap(lambda r: tape.backward_from(steps, index, r, site))(R_c).detach())
        return torch.cat(parts).movedim(0, 1)

    def __repr__(self) -> str:
        return f"CRP(layer={self.layer!r} (index {self.step.index}), concepts={self.concepts!r})"


def keep_channels(R: torch.Tensor, channels: torch.Tensor, axis: int) -> torch.Tensor:
    """(K, B, ...): ``R`` (B, ...) with every channel but ``channels[b, k]`` zeroed, along ``axis``."""
    b, k = channels.shape
    n = R.shape[axis]
    keep = F.one_hot(channels.t(), n).to(R.dtype)  # (K, B, C)
    axis = axis % R.ndim
    shape = [k, b] + [n if d == axis else 1 for d in range(1, R.ndim)]
    return R.unsqueeze(0) * keep.view(shape)


def _per_sample(target, batch: int):
    """``(start, stop) -> the target of those samples``: None and an int for all, a sequence sliced (its length
    checked against the batch here, once)."""
    if target is None or (not isinstance(target, torch.Tensor) and isinstance(target, int)) or \
            (isinstance(target, torch.Tensor) and target.ndim == 0):
        return lambda start, stop: target
    t = torch.as_tensor(target).flatten()
    if t.numel() != batch:
        raise ValueError(f"target has {t.numel()} entries for a batch of {batch}; give one per sample or one int")
    return lambda start, stop: t[start:stop]
