"""Attention-based baselines without LRP: raw attention and attention GradCAM (the baselines of Chefer, Gur &
Wolf 2021, "Transformer Interpretability Beyond Attention Visualization"), and the generic attention
explainability of Chefer, Gur & Wolf 2021b ("Generic Attention-model Explainability for Interpreting Bi-Modal
and Encoder-Decoder Transformers").

Every map is the read-out row (the class token's; see :func:`lrpkit.methods.rollout.readout_weights`) over the
patch tokens, on the patch grid, in ``Explanation.token_relevance`` (B, grid_h, grid_w). On a model with attention
pooling (``global_pool='map'``, SigLIP) the pool is the last attention and its latent query the read-out: raw
attention and attention GradCAM use the query's row of the pool's attention, generic attention adds the pool as
a query attending to the tokens (``R_q = Ā_pool · R``, Chefer et al. 2021b's rule for a query set attending to a
context whose own relevance starts at zero).
"""

from __future__ import annotations

import torch

from ..analyzer import resolve_target
from ..explanation import Explanation
from ._capture import attention_and_gradients, attention_pool, run_with_attention, split_pool
from .base import Explainer
from .rollout import _grad_input, _working_dtype, pool_readout, readout_weights, token_map

__all__ = ["RawAttention", "AttentionGradCAM", "GenericAttention", "raw_attention_rows", "gradcam_rows",
           "generic_relevance"]


# ------------------------------------------------------------------------------------------------- the math
def raw_attention_rows(attn: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``mean_h Σ_i w_i A[:, h, i, :]``: the read-out row of the head-averaged attention (B, heads, N, N) ->
    (B, N)."""
    return torch.einsum("n,bhnm->bm", w, attn) / attn.shape[1]


def gradcam_rows(attn: torch.Tensor, grad: torch.Tensor, w: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention GradCAM of one block (Chefer et al. 2021, baseline): with the read-out rows
    ``a_h = Σ_i w_i A[h, i, :]`` and ``g_h = Σ_i w_i G[h, i, :]`` (G = ∂y_t/∂A), each head is weighted by the mean
    of its gradient over the patch tokens, ``α_h = mean_{j ≥ P} g_h[j]``; the map is
    ``clamp(mean_h(α_h · a_h), min=0)`` (B, N) (the prefix columns are computed too; the caller drops them)."""
    a = torch.einsum("n,bhnm->bhm", w, attn)
    g = torch.einsum("n,bhnm->bhm", w, grad)
    alpha = g[..., num_prefix:].mean(-1, keepdim=True)
    return (alpha * a).mean(1).clamp(min=0)


def generic_relevance(attns, grads) -> torch.Tensor:
    """Chefer et al. 2021b, self-attention rule: ``R = I``; for each block b in order
    ``Ā_b = mean_h((∇A_b ⊙ A_b)⁺)`` (clamp BEFORE the head mean) and ``R ← R + Ā_b · R``.
    Returns R (B, N, N)."""
    if len(attns) != len(grads) or not attns:
        raise ValueError(f"need one gradient per attention, got {len(attns)} attentions and {len(grads)} gradients")
    a0 = attns[0]
    r = torch.eye(a0.shape[-1], device=a0.device, dtype=_working_dtype(a0).dtype).expand(a0.shape[0], -1, -1)
    for a, g in zip(attns, grads):
        cam = (_working_dtype(g) * _working_dtype(a)).clamp(min=0).mean(1)
        r = r + cam @ r
    return r


class _LastAttention:
    """A list stand-in for :func:`run_with_attention` that keeps only the latest attention."""

    value = None

    def append(self, attn: torch.Tensor) -> None:
        self.value = attn


def _explanation(explainer: Explainer, rows: torch.Tensor, out, t, x, name) -> Explanation:
    return Explanation(relevance=None, output=out, target=t, method=name, patch_size=explainer.patch_size,
                       input_size=tuple(x.shape[-2:]),
                       token_relevance=token_map(rows, explainer.num_prefix(), explainer.grid(x)))


def _weights(explainer: Explainer, n: int, like: torch.Tensor) -> torch.Tensor:
    return readout_weights(explainer.chain, n, explainer.num_prefix(), device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------- explainers
class RawAttention(Explainer):
    """Raw attention (baseline of Chefer et al. 2021): the last block's attention probabilities, averaged over
    the heads, read-out (class-token) row over the patch tokens; on a 'map'-pooled model the pool query's row of
    the pool's attention. Class-agnostic; one forward pass, no gradient."""

    name = "RawAttention"
    needs_attention = True

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        store, pool = _LastAttention(), []
        with torch.no_grad():
            out = run_with_attention(self.chain, x, store, pool)
        t = resolve_target(out, target)
        if pool:
            return _explanation(self, pool_readout(self.chain, _working_dtype(pool[0]).mean(1)), out, t, x,
                                self.name)
        a = _working_dtype(store.value)
        return _explanation(self, raw_attention_rows(a, _weights(self, a.shape[-1], a)), out, t, x, self.name)


class AttentionGradCAM(Explainer):
    """Attention GradCAM (baseline of Chefer et al. 2021, after Selvaraju et al. 2017): the last block's
    class-token attention rows ``a_h`` weighted per head by ``α_h``, the mean over the patch tokens of the
    class-token row of ``∂y_t/∂A``; ``map = clamp(mean_h(α_h a_h), min=0)`` (see :func:`gradcam_rows`). On a
    'map'-pooled model the last attention is the pool's and the rows are its latent query's.
    ``target``: None (argmax), an int or one index per sample. One forward and one backward pass."""

    name = "AttentionGradCAM"
    needs_attention = True

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t, attns, grads = attention_and_gradients(self.chain, _grad_input(x), target, with_grad=True)
        a, g = _working_dtype(attns[-1]), _working_dtype(grads[-1])
        pool = attention_pool(self.chain)
        if pool is not None:  # the latents' rows over the pooled tokens, then the prefix tokens left out put back
            lam = readout_weights(self.chain, a.shape[-2], 0, device=a.device, dtype=a.dtype)
            rows = gradcam_rows(a, g, lam, max(self.num_prefix() - pool.start, 0))
            rows = torch.nn.functional.pad(rows, (pool.start, 0))
        else:
            rows = gradcam_rows(a, g, _weights(self, a.shape[-1], a), self.num_prefix())
        return _explanation(self, rows, out, t, x, self.name)


class GenericAttention(Explainer):
    """Generic attention explainability (Chefer, Gur & Wolf 2021b): ``R = I``; per block
    ``R ← R + mean_h((∂y_t/∂A_b ⊙ A_b)⁺) · R``; the map is R's read-out (class-token) row over the patch
    tokens (see :func:`generic_relevance`). On a 'map'-pooled model the pool's latent query attends to the tokens:
    its row is ``mean_h((∂y_t/∂A_pool ⊙ A_pool)⁺) · R`` (:func:`~lrpkit.methods.rollout.pool_readout`).
    ``target``: None (argmax), an int or one index per sample. One forward and one backward pass."""

    name = "GenericAttention"
    needs_attention = True

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        self.check_input(x)
        out, t, attns, grads = attention_and_gradients(self.chain, _grad_input(x), target, with_grad=True)
        (attns, pool_a), (grads, pool_g) = split_pool(self.chain, attns), split_pool(self.chain, grads)
        r = generic_relevance(attns, grads)
        if pool_a is not None:
            cam = (_working_dtype(pool_g) * _working_dtype(pool_a)).clamp(min=0).mean(1)  # (B, L, N − start)
            rows = torch.einsum("bn,bnm->bm", pool_readout(self.chain, cam), r)
        else:
            rows = torch.einsum("n,bnm->bm", _weights(self, r.shape[-1], r), r)
        return _explanation(self, rows, out, t, x, self.name)
