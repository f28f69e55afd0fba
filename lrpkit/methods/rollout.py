"""Attention Rollout (Abnar & Zuidema 2020) and Gradient Attention Rollout (vit-explain, J. Gildenblat 2020).

Both follow the same recipe over the blocks b = 1..L of a vision transformer:

1. fuse the heads of block b into one (N, N) matrix Ā_b (rollout: mean / max / min of the attention
   probabilities A_b; gradient rollout: ``clamp(mean_h(A_b ⊙ ∂y_t/∂A_b), min=0)``);
2. optionally zero the ``discard_ratio`` fraction of the smallest entries of Ā_b (per sample), never the
   class token's attention to itself;
3. ``Â_b = (Ā_b + I) / 2``, then each ROW divided by its own sum, ``Â_b[i, :] /= Σ_j Â_b[i, j]``;
4. ``rollout = Â_L · … · Â_1``; the map is the read-out row (the class token's) over the patch tokens.

Two defects of the vit-explain reference are *not* reproduced: its normalisation ``a / a.sum(dim=-1)`` (no
``keepdim``) divides entry (i, j) by the sum of row j instead of row i — harmless only when every row already
sums to one (mean fusion, no discarding) — and its gradient rollout pairs the attention of block b with the
gradient of block L+1−b (backward hooks fire in reverse order and the list is not reversed). Here every block
uses its own gradient, and it handles whole batches (vit-explain explains batch element 0 only).

The read-out row is the token the classifier head reads: the class token for ``global_pool='token'``; the
mean of the class- and distillation-token rows for distilled DeiT (whose head averages both); the mean of the
patch-token rows for ``global_pool='avg'`` (models without a class token). See :func:`readout_weights`. A model
with attention pooling (``global_pool='map'``, SigLIP) reads the tokens through the pool's latent query: the read-out
row is then the query's attention over the tokens, fused over the heads as the method fuses a block's (for more than
one latent, weighted as the head reads them; zero for prefix tokens the pool leaves out), and the map is that row
times the blocks' matrix (:func:`pool_readout`). The pool has no residual path, so its row gets no identity.

The pure functions (:func:`fuse_heads`, :func:`discard_smallest`, :func:`normalize_rows`, :func:`rollout`,
:func:`readout_weights`, :func:`pool_readout`, :func:`token_map`) are the math; the classes run them on a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..analyzer import resolve_target
from ..explanation import Explanation
from ..layers import Chain, SelectClassToken, TokenMean
from ._capture import attention_and_gradients, attention_pool, run_with_attention, split_pool
from .base import Explainer

__all__ = ["AttentionRollout", "GradientRollout", "fuse_heads", "discard_smallest", "normalize_rows", "rollout",
           "readout_weights", "pool_readout", "token_map"]

HEAD_FUSIONS = ("mean", "max", "min")


# ------------------------------------------------------------------------------------------------- the math
def _working_dtype(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision attention products lose too much over many blocks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the heads of an attention tensor: (B, heads, N, N) -> (B, N, N) by ``mean``, ``max`` or ``min``
    over the head dimension (Abnar & Zuidema 2020 use the mean; vit-explain adds max and min)."""
    if attn.ndim != 4:
        raise ValueError(f"attention must have shape (B, heads, N, N), got {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(1)
    if head_fusion == "max":
        return attn.amax(1)
    if head_fusion == "min":
        return attn.amin(1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_smallest(a: torch.Tensor, ratio: float, protect: int | None = 0) -> torch.Tensor:
    """Zero the ``floor(ratio · N²)`` smallest entries of each sample's (N, N) matrix ``a`` (B, N, N).

    The entry ``(protect, protect)`` — the class token's attention to itself — is never discarded (vit-explain
    keeps flat index 0 for the same reason); ``protect=None`` protects nothing (models without a class token).
    Returns a new tensor; ties are broken by ``torch.topk``.
    """
    _check_ratio(ratio)
    b, n, _ = a.shape
    count = int(ratio * n * n)
    count = min(count, n * n - (protect is not None))
    if count <= 0:
        return a
    flat = a.reshape(b, n * n)
    candidates = flat
    if protect is not None:
        candidates = flat.clone()
        candidates[:, protect * n + protect] = float("inf")
    idx = candidates.topk(count, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).reshape(b, n, n)


def normalize_rows(a: torch.Tensor) -> torch.Tensor:
    """``Â = (a + I) / 2`` with each row divided by its own sum: ``Â[i, j] = ½(a[i, j] + δ_ij) / Σ_k ½(a[i, k] +
    δ_ik)`` (B, N, N). The identity models the residual connection (Abnar & Zuidema 2020). For a non-negative
    ``a`` every row sum is at least ½, so no row can be zero."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = (a + eye) / 2
    return a / a.sum(-1, keepdim=True)


def rollout(matrices) -> torch.Tensor:
    """``Â_L · … · Â_1`` for the per-block matrices ``[Â_1, ..., Â_L]`` (each (B, N, N), already normalised)."""
    result = None
    for m in matrices:
        result = m if result is None else m @ result
    if result is None:
        raise ValueError("rollout needs at least one attention matrix")
    return result


def readout_weights(chain: Chain, num_tokens: int, num_prefix: int, device=None, dtype=None) -> torch.Tensor:
    """The token weights w (N,) of the classifier's read-out, ``Σ_i w_i = 1``: a map's row is ``w · M``.

    ``SelectClassToken(i)`` contributes token i; ``TokenMean(start)`` the tokens start..N-1 uniformly; several
    read-outs (distilled DeiT: class and distillation token, head averaged) share the weight equally. A chain
    without either reads the class token (0) when there are prefix tokens, else all tokens uniformly.
    """
    w = torch.zeros(num_tokens, device=device, dtype=dtype)
    pools = [m for m in chain.modules() if isinstance(m, (SelectClassToken, TokenMean))]
    if not pools:
        if num_prefix > 0:
            w[0] = 1.0
        else:
            w[:] = 1.0 / num_tokens
        return w
    for pool in pools:
        if isinstance(pool, SelectClassToken):
            if not -num_tokens <= pool.index < num_tokens:
                raise ValueError(f"the model reads token {pool.index} but the sequence has {num_tokens} tokens")
            w[pool.index] += 1.0
        else:
            if pool.start >= num_tokens:
                raise ValueError(f"the model averages tokens from {pool.start} on but has only {num_tokens}")
            w[pool.start:] += 1.0 / (num_tokens - pool.start)
    return w / len(pools)


def pool_readout(chain: Chain, fused: torch.Tensor) -> torch.Tensor:
    """The read-out row of a chain with an attention pool (timm's ``global_pool='map'``) from the pool's attention
    fused over the heads, ``fused`` (B, L, N − start): the latents' rows weighted as the head reads them
    (``λ`` = :func:`readout_weights` of the latents: the first for pool_type 'token', all equally for 'avg'),
    ``Σ_l λ_l fused[:, l]``, with zeros for the ``start`` prefix tokens the pool leaves out: (B, N)."""
    pool = attention_pool(chain)
    if pool is None:
        raise ValueError("pool_readout needs a chain with an attention pool (global_pool='map')")
    lam = readout_weights(chain, fused.shape[1], 0, device=fused.device, dtype=fused.dtype)
    return F.pad(torch.einsum("l,blm->bm", lam, fused), (pool.start, 0))


def token_map(rows: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The patch-token part of per-sample rows (B, N), reshaped to the patch grid (B, gh, gw)
    (token ``P + h·gw + w`` is patch (h, w), P = number of prefix tokens)."""
    b, n = rows.shape
    gh, gw = grid
    if n - num_prefix != gh * gw:
        raise ValueError(f"{n} tokens minus {num_prefix} prefix tokens do not fill a {gh}x{gw} patch grid")
    return rearrange(rows[:, num_prefix:], "b (h w) -> b h w", h=gh, w=gw)


def _check_ratio(ratio) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be a number in [0, 1), got {ratio!r}")


def _protected_token(explainer: Explainer) -> int | None:
    """The class token's index (0) when the model has a class token, else None."""
    from ..layers import ClassToken

    for m in explainer.chain.modules():
        if isinstance(m, ClassToken):
            return 0 if m.kinds and m.kinds[0] == "class" else None
    return None


def _grad_input(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of x that requires grad: the canonized chain's parameters are frozen, so without it no graph
    would reach the attention tensors when x itself does not require grad."""
    return x.detach().requires_grad_(True)


def _readout_map(explainer: Explainer, matrix: torch.Tensor, x: torch.Tensor,
                 pool_row: torch.Tensor | None = None) -> torch.Tensor:
    """``w · matrix`` over the patch tokens on the grid: (B, N, N) -> (B, gh, gw); ``w`` the read-out weights, or
    per sample the attention pool's row ``pool_row`` (B, N) (:func:`pool_readout`)."""
    p = explainer.num_prefix()
    if pool_row is not None:
        return token_map(torch.einsum("bn,bnm->bm", pool_row.to(matrix.dtype), matrix), p, explainer.grid(x))
    w = readout_weights(explainer.chain, matrix.shape[-1], p, device=matrix.device, dtype=matrix.dtype)
    return token_map(torch.einsum("n,bnm->bm", w, matrix), p, explainer.grid(x))


class _RolloutStore:
    """A list stand-in for :func:`run_with_attention`: fuses, discards, normalises and multiplies each block's
    attention as it arrives, so only one (B, N, N) product is kept instead of L (B, heads, N, N) tensors."""

    def __init__(self, head_fusion: str, discard_ratio: float, protect: int | None):
        self.head_fusion, self.discard_ratio, self.protect = head_fusion, discard_ratio, protect
        self.result = None
        self.blocks = 0

    def append(self, attn: torch.Tensor) -> None:
        a = fuse_heads(_working_dtype(attn), self.head_fusion)
        if self.discard_ratio > 0:
            a = discard_smallest(a, self.discard_ratio, self.protect)
        a = normalize_rows(a)
        self.result = a if self.result is None else a @ self.result
        self.blocks += 1


# ---------------------------------------------------------------------------------------------- explainers
class AttentionRollout(Explainer):
    """Attention Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), class-agnostic.

    ``rollout = Â_L ⋯ Â_1`` with ``Â_b = rownorm((fuse_h(A_b) [discarded] + I) / 2)`` (see the module docstring);
    the map is the read-out (class-token) row over the patch tokens, (B, grid_h, grid_w) in
    ``Explanation.token_relevance``; on a 'map'-pooled model the read-out row is the pool query's attention, fused
    over the heads the same way (:func:`pool_readout`; nothing discarded). ``head_fusion``: "mean" (the paper),
    "max" or "min" (vit-explain); ``discard_ratio`` in [0, 1): fraction of the smallest fused entries zeroed per
    sample and block, never the class token's self-attention. The explanation does not depend on the target;
    ``target`` only sets ``Explanation.target``. Cost: one forward pass (no gradients), plus one N×N product per
    block.
    """

    name = "AttentionRollout"
    needs_attention = True

    def __init__(self, model, head_fusion: str = "mean", discard_ratio: float = 0.0):
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        _check_ratio(discard_ratio)
        super().__init__(model)
        self.head_fusion, self.discard_ratio = head_fusion, float(discard_ratio)

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        store = _RolloutStore(self.head_fusion, self.discard_ratio, _protected_token(self))
        pool: list = []
        with torch.no_grad():
            out = run_with_attention(self.chain, x, store, pool)
        t = resolve_target(out, target)
        row = pool_readout(self.chain, fuse_heads(_working_dtype(pool[0]), self.head_fusion)) if pool else None
        return Explanation(relevance=None, output=out, target=t, method=self.name, patch_size=self.patch_size,
                           input_size=tuple(x.shape[-2:]), token_relevance=_readout_map(self, store.result, x, row),
                           extras={"head_fusion": self.head_fusion, "discard_ratio": self.discard_ratio})


def gradient_fused(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted head fusion of one block: ``clamp(mean_h(A ⊙ ∂y_t/∂A), min=0)`` (B, N, N) — the
    negatives are clamped AFTER the head mean (vit-explain's gradient rollout)."""
    if attn.shape != grad.shape:
        raise ValueError(f"attention {tuple(attn.shape)} and gradient {tuple(grad.shape)} must have one shape")
    return (attn * grad).mean(1).clamp(min=0)


def gradient_rollout(attns, grads, discard_ratio: float = 0.0, protect: int | None = 0) -> torch.Tensor:
    """Gradient rollout matrix ``Â_L ⋯ Â_1`` with ``Â_b = rownorm((gradient_fused(A_b, G_b) [discarded] + I)/2)``:
    attention b is paired with ITS OWN gradient G_b = ∂y_t/∂A_b (lists in block order)."""
    if len(attns) != len(grads):
        raise ValueError(f"{len(attns)} attentions but {len(grads)} gradients")
    mats = []
    for a, g in zip(attns, grads):
        f = gradient_fused(_working_dtype(a), _working_dtype(g))
        if discard_ratio > 0:
            f = discard_smallest(f, discard_ratio, protect)
        mats.append(normalize_rows(f))
    return rollout(mats)


class GradientRollout(Explainer):
    """Gradient Attention Rollout (vit-explain, Gildenblat 2020), class-specific.

    As :class:`AttentionRollout`, but block b is fused as ``clamp(mean_h(A_b ⊙ ∂y_t/∂A_b), min=0)`` with
    y_t the target logit and each block's attention paired with its own gradient; on a 'map'-pooled model the
    read-out row is the pool query's attention fused the same way with its own gradient (:func:`pool_readout`).
    ``target``: None (argmax), an int or one index per sample. Cost: one forward and one backward pass.
    """

    name = "GradientRollout"
    needs_attention = True

    def __init__(self, model, discard_ratio: float = 0.0):
        _check_ratio(discard_ratio)
        super().__init__(model)
        self.discard_ratio = float(discard_ratio)

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t, attns, grads = attention_and_gradients(self.chain, _grad_input(x), target, with_grad=True)
        (attns, pool_a), (grads, pool_g) = split_pool(self.chain, attns), split_pool(self.chain, grads)
        matrix = gradient_rollout(attns, grads, self.discard_ratio, _protected_token(self))
        row = None
        if pool_a is not None:
            row = pool_readout(self.chain, gradient_fused(_working_dtype(pool_a), _working_dtype(pool_g)))
        return Explanation(relevance=None, output=out, target=t, method=self.name, patch_size=self.patch_size,
                           input_size=tuple(x.shape[-2:]), token_relevance=_readout_map(self, matrix, x, row),
                           extras={"discard_ratio": self.discard_ratio})
