"""Chefer, Gur & Wolf 2021, "Transformer Interpretability Beyond Attention Visualization" (CVPR): transformer
attribution, and the paper's "partial LRP" baseline, on lrpkit's canonized chain and rule machinery.

Both run one recording forward pass through the chain with the rules of :func:`chefer_composite`
(:mod:`lrpkit.rules.chefer`) and the reverse loop from the one-hot target (``normalize_output=True``), which stops
right after the lowest block whose attention relevance the map needs. :class:`TransformerAttribution` gets the
attention gradients ``∂y_t/∂A_b`` from the graph of that same forward pass (one backward pass, no second forward).

Memory: the records of the recording pass hold each activation once, and its graph saves nothing beyond them but
LayerNorm's statistics (see :mod:`lrpkit.rules.chefer`); the gradients are taken first, which frees the graph, so
that the reverse loop starts from the records and ``∂y_t/∂A_b``. ViT-B: the peak is 1.7-1.8x the input
gradient's (docs/benchmarks.md).

Reference code: hila-chefer/Transformer-Explainability (``baselines/ViT/ViT_LRP.py``, methods ``"transformer_
attribution"`` (= ``"grad"``) and ``"last_layer"``; ``ViT_explanation_generator.py``). lrpkit's version is batched
(the reference handles one image: its residual rescaling and z^B bounds sum over the whole batch), works on every
model with global attention that :func:`lrpkit.canonize` supports (timm ViT, DeiT, BEiT; a score bias and a rotary
embedding as :class:`~lrpkit.rules.chefer.CheferAttentionRule` defines them), and runs on any device.

The read-out row: the reference explains the class token, whose row of the relevance matrix is the map. A model
whose head pools the patch tokens by their mean (``global_pool='avg'``: BEiT, such ViTs) does not read its class
token (if it has one); there the map is the read-out row ``w · C`` with ``w`` the head's weights over the tokens
(``1/M`` on each of the ``M`` patch tokens, :func:`lrpkit.methods.rollout.readout_weights`), the mean of the pooled
tokens' rows, as attention rollout reads it. For a class-token model ``w = e_cls`` and nothing changes.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..analyzer import build_steps, resolve_target
from ..composites import Composite, FirstLayerTypeMap, GlobalTypeMap
from ..explanation import Explanation
from ..layers import (ClassToken, LayerNormalize, PositionalEmbedding, Scale, SelectClassToken, SelfAttention,
                      SkipConnection, Sum, TokenMean)
from ..plan import Plan
from ..tape import Tape
from ..rules.base import ACTIVATION_TYPES
from ..rules.basic import ZBoxRule
from ..rules.chefer import (ATTENTION, ATTENTION_RELEVANCE, CheferAttentionRule, CheferLinearRule, CheferPassRule,
                            CheferPositionalEmbeddingRule, CheferSelectTokenRule, CheferSkipConnectionRule,
                            CheferSumRule, CheferTokenMeanRule, CheferZBoxRule, CheferZPlusRule)
from .base import Explainer, NotApplicableError
from .rollout import readout_weights
from ..layers import AttentionPool
from ..rules.pooling import CheferAttentionPoolRule
from .rollout import pool_readout

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def chefer_composite(low=None, high=None, *, per_sample: bool = True) -> Composite:
    """The rules of Chefer et al. 2021 for a canonized ViT:

    - Linear (blocks and head): :class:`~lrpkit.rules.chefer.CheferLinearRule` (LRP-α1β0, bias ignored);
    - the first layer (patch projection): LRP-z^B with the bounds of each input, min and max per sample
      (:class:`~lrpkit.rules.chefer.CheferZBoxRule`; ``per_sample=False``: over the batch), or fixed bounds if
      ``low`` and ``high`` are given (:class:`~lrpkit.rules.ZBoxRule`, bias ignored as well); other convolutions
      α1β0 without bias;
    - LayerNormalize, Scale (LayerNorm's affine part, LayerScale), GELU and the other activations, dropout:
      relevance passes unchanged;
    - SelfAttention: :class:`~lrpkit.rules.chefer.CheferAttentionRule` (both products split by gradient × input,
      each half; softmax passes); AttentionPool (``global_pool='map'``): the same rule,
      :class:`~lrpkit.rules.pooling.CheferAttentionPoolRule`, whose query is the latent (a constant);
    - SkipConnection / Sum: gradient × input split rescaled to ``|Σa| / (|Σa| + |Σb|) · ΣR``;
    - PositionalEmbedding: the same two-operand rule, the embedding's share dropped;
    - PatchFlatten and ClassToken keep their defaults (inverse reshape; prefix tokens' relevance dropped).

    Use it with :class:`lrpkit.LRP` for Chefer's "full" LRP (input relevance; the attention relevances land in
    ``Explanation.extras[ATTENTION_RELEVANCE]``), or through :class:`TransformerAttribution` / :class:`PartialLRP`.
    """
    if (low is None) != (high is None):
        raise ValueError("give both low and high (fixed z^B bounds) or neither (bounds from each input)")
    if low is not None:
        first = ZBoxRule(low, high, stabilizer=1e-9)
    else:
        first = CheferZBoxRule(per_sample=per_sample)
    linear = CheferLinearRule()
    passing = CheferPassRule()
    mapping = {
        nn.Linear: linear,
        CONV: CheferZPlusRule(),
        SelfAttention: CheferAttentionRule(linear),
        SkipConnection: CheferSkipConnectionRule(),
        Sum: CheferSumRule(),
        (LayerNormalize, Scale, nn.Dropout, nn.Identity) + ACTIVATION_TYPES: passing,
        PositionalEmbedding: CheferPositionalEmbeddingRule(),
        SelectClassToken: CheferSelectTokenRule(),
        TokenMean: CheferTokenMeanRule(),
    }
    mapping[AttentionPool] = CheferAttentionPoolRule(linear)  # the 'map' head (SigLIP): the same rule, query fixed
    return Composite(GlobalTypeMap(mapping), FirstLayerTypeMap({CONV: first}))


class _CheferExplainer(Explainer):
    """Shared part: canonize once, the Chefer rules, the attention steps in block order, the read-out row."""

    needs_attention = True

    def __init__(self, model: nn.Module, composite: Composite | None = None):
        super().__init__(model)
        self.composite = composite if composite is not None else chefer_composite()
        self.steps, every = build_steps(self.chain, self.composite)
        self.plan = Plan(self.steps)
        self.attention_steps = [s for s in every if isinstance(s.layer, SelfAttention)]
        for s in self.attention_steps:
            if not isinstance(s.rule, CheferAttentionRule):
                raise TypeError(f"{self.name} needs CheferAttentionRule on every SelfAttention layer; the composite "
                                f"maps {s.rule!r} onto layer {s.index} ({s.name})")
        #: the attention pool's step ('map'-pooled models, SigLIP), whose latent query is the read-out, or None
        self.pool_step = next((s for s in every if isinstance(s.layer, AttentionPool)), None)
        if self.pool_step is not None and not isinstance(self.pool_step.rule, CheferAttentionPoolRule):
            raise TypeError(f"{self.name} needs CheferAttentionPoolRule on the attention pool; the composite maps "
                            f"{self.pool_step.rule!r} onto layer {self.pool_step.index} ({self.pool_step.name})")
        #: whether the head reads the class token (else the mean of the tokens, or the pool's query)
        self._reads_class_token = self._class_token_read(model) if self.pool_step is None else False

    def _pool_row(self, rel: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        """The read-out row (B, N) of a 'map'-pooled model: the pool query's row of ``E_h[(G ⊙ R_A)⁺]``, or of
        ``E_h[R_A⁺]`` without ``G`` (:func:`~lrpkit.methods.rollout.pool_readout`)."""
        fused = (rel if grad is None else grad * rel).clamp(min=0).mean(1)
        return pool_readout(self.chain, fused)

    def _class_token_read(self, model) -> bool:
        """Whether the head reads the class token (then the map is its row), or pools the tokens (then the map is
        the read-out row, the mean of the pooled tokens' rows; :func:`lrpkit.methods.rollout.readout_weights`)."""
        tokens = [m for m in self.chain.modules() if isinstance(m, ClassToken)]
        pooled = any(isinstance(m, TokenMean) for m in self.chain.modules())
        if not pooled and not (tokens and tokens[0].kinds[0] == "class"):
            raise NotApplicableError(f"{self.name} reads the row of the token that the head reads, but this "
                                     f"{type(model).__name__} has neither a class token nor a mean over the tokens")
        return not pooled

    def _readout(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The read-out weights w (N,) over the tokens: the class token (``e_cls``), or the head's mean."""
        if self._reads_class_token:
            w = torch.zeros(n, dtype=like.dtype, device=like.device)
            w[0] = 1.0
            return w
        return readout_weights(self.chain, n, self.num_prefix(), device=like.device, dtype=like.dtype)

    def table(self) -> str:
        """The rule table of the composite on the canonized chain."""
        return self.composite.table(self.chain)

    def _start(self, x: torch.Tensor, target, stop_at: int, grad_from: int | None = None):
        """The recording forward pass on a tape that stops after the attention step ``stop_at`` (and keeps the
        graph from ``grad_from``); ``(output with graph, target, tape)``."""
        self.check_input(x)
        tape = Tape(self.plan, graph_from=grad_from, stop_after=stop_at)
        with torch.enable_grad():
            output = tape.forward(self.steps, x.detach())
        return output, resolve_target(output.detach(), target), tape

    def _relevances(self, tape: Tape, output: torch.Tensor, t: torch.Tensor) -> dict:
        """Reverse loop from the one-hot target down to the tape's stop; ``{index: R_A}``."""
        R = torch.zeros_like(output.detach()).scatter_(1, t[:, None], 1.0)
        tape.backward(self.steps, R)
        if not tape.stopped:  # pragma: no cover - the stop step is an attention step of this chain
            raise RuntimeError(f"the reverse loop did not reach attention step {tape.stop_after}")
        return dict(tape.handed[ATTENTION_RELEVANCE])

    def _explanation(self, x, output, t, row: torch.Tensor, extras: dict | None = None) -> Explanation:
        """The read-out row over the patch tokens as the token map (B, grid_h, grid_w)."""
        gh, gw = self.grid(x)
        patches = row[:, self.num_prefix():]
        if patches.shape[1] != gh * gw:  # pragma: no cover - canonization guarantees the grid
            raise RuntimeError(f"{patches.shape[1]} patch tokens do not fill a {gh}x{gw} grid")
        return Explanation(relevance=None, output=output.detach(), target=t, method=self.name,
                           patch_size=self.patch_size, input_size=tuple(x.shape[-2:]),
                           token_relevance=rearrange(patches, "b (h w) -> b h w", h=gh).detach(), extras=extras or {})


class TransformerAttribution(_CheferExplainer):
    """Transformer attribution (Chefer, Gur & Wolf 2021):

    1. LRP from the one-hot target with :func:`chefer_composite`; ``R_b`` = relevance of the attention
       probabilities of block b;
    2. ``G_b = ∂y_t/∂A_b`` (from the graph of the same forward pass);
    3. ``Ā_b = E_h[(G_b ⊙ R_b)⁺]`` (clamp before the mean over heads);
    4. ``C = (I + Ā_L) ··· (I + Ā_s)`` without row normalisation, ``s = start_layer``;
    5. the map is C's class-token row over the patch tokens (``token_relevance`` (B, grid_h, grid_w);
       ``heatmap`` upsamples it bilinearly to the image size); for a head that pools the patch tokens by their
       mean, the read-out row ``w · C`` (the mean of the patch tokens' rows; see the module docstring).

    ``start_layer``: first block in the product, 0 ≤ s ≤ depth (the paper's evaluation uses 1, their demo 0;
    ``s = depth`` gives C = I: a zero map for the class token, the constant ``w`` for a mean). Only the read-out
    row is formed (``v ← v (I + Ā_b)`` for b = L..s, from ``v = e_cls`` or ``w``), and the reverse loop stops at
    block s's attention: nothing below it (block s's qkv, the patch embedding) is computed. Batched; per-sample
    results equal those of the samples alone. For distilled models the class token's row is used (the
    distillation token is a prefix token, not a patch). A model with attention pooling (``global_pool='map'``,
    SigLIP) is read through its pool: the product starts from the pool query's row of ``E_h[(G ⊙ R_A)⁺]``
    (the pool is always included; ``start_layer`` counts the blocks below it).

    ``TransformerAttribution(model, start_layer=0)(x, target=None) -> Explanation``.
    """

    name = "TransformerAttribution"

    def __init__(self, model: nn.Module, start_layer: int = 0, composite: Composite | None = None):
        super().__init__(model, composite)
        depth = len(self.attention_steps)
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer <= depth:
            raise ValueError(f"start_layer must be an int in 0..{depth} (the model has {depth} blocks), "
                             f"got {start_layer!r}")
        self.start_layer = start_layer

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        needed = self.attention_steps[self.start_layer:]
        pooled = [self.pool_step] if self.pool_step is not None else []
        grad_from = needed[0].index if needed else pooled[0].index if pooled else None
        output, t, tape = self._start(x, target, grad_from, grad_from)
        gh, gw = self.grid(x)
        n = self.num_prefix() + gh * gw
        if self.pool_step is not None:  # replaced by the pool query's row below
            row = torch.zeros(output.shape[0], n, dtype=x.dtype, device=x.device)
        else:
            row = self._readout(n, x).expand(output.shape[0], -1).clone()  # e_cls, or the head's mean w
        if needed or pooled:
            attns = [a for _, a in sorted(tape.handed.pop(ATTENTION), key=lambda item: item[0])]
            try:
                with torch.enable_grad():
                    grads = torch.autograd.grad(output.gather(1, t[:, None]).sum(), attns)
            except RuntimeError as err:
                raise TypeError(f"{self.name} takes the attention gradients from the graph of the recording forward "
                                f"pass, and a rule of the composite above block {self.start_layer} does not keep "
                                f"that graph; use the rules of lrpkit.rules.chefer (chefer_composite())") from err
            del attns  # the records keep A until the reverse loop has passed each block
            rel = self._relevances(tape, output, t)
            with torch.no_grad():
                if pooled:  # the read-out is the pool's latent query: its row of E_h[(G ⊙ R_A)⁺] starts the product
                    row = self._pool_row(rel[pooled[0].index], grads[-1]).to(row.dtype)
                    grads = grads[:-1]
                for step, grad in zip(reversed(needed), reversed(grads)):
                    a_bar = (grad * rel[step.index]).clamp_(min=0).mean(1)  # (B, N, N)
                    row = row + (row.unsqueeze(1) @ a_bar).squeeze(1)
        return self._explanation(x, output, t, row, {"start_layer": self.start_layer})


class PartialLRP(_CheferExplainer):
    """"Partial LRP", a baseline of Chefer et al. 2021 (after Voita et al. 2019): the relevance ``R_L`` of the last
    block's attention probabilities under :func:`chefer_composite`, negatives clamped, mean over heads, the
    class-token row over the patch tokens: ``map = E_h[R_L⁺][cls, patches]`` (for a head that pools the patch
    tokens by their mean, the read-out row ``Σ_i w_i E_h[R_L⁺][i, patches]``). The reverse loop stops at the last
    block's attention (no gradients, nothing below it). On a 'map'-pooled model the last attention is the pool's
    and the row its query's.

    ``PartialLRP(model)(x, target=None) -> Explanation``.
    """

    name = "PartialLRP"

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        last = self.pool_step if self.pool_step is not None else self.attention_steps[-1]
        output, t, tape = self._start(x, target, last.index)
        rel = self._relevances(tape, output, t)[last.index]
        if self.pool_step is not None:  # the last attention is the pool's; its latent query is the read-out
            return self._explanation(x, output, t, self._pool_row(rel))
        if self._reads_class_token:
            row = rel[:, :, 0].clamp(min=0).mean(1)  # (B, N)
        else:
            row = torch.einsum("n,bhnm->bhm", self._readout(rel.shape[-1], rel), rel.clamp(min=0)).mean(1)
        return self._explanation(x, output, t, row)


__all__ = ["PartialLRP", "TransformerAttribution", "chefer_composite"]
