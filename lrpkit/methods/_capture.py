"""Run a canonized chain while keeping every attention-probability tensor (and, on request, its gradient).

Shared by the attention-based explainers. The chain's own layers are called; nothing is patched or hooked.
"""

from __future__ import annotations

import torch

from ..analyzer import resolve_target
from ..layers import AttentionPool, Chain, SelfAttention
from ..walk import run


def run_with_attention(chain: Chain, x: torch.Tensor, store: list, pool_store: list | None = None) -> torch.Tensor:
    """``chain(x)``, appending each block's attention probabilities A (B, heads, N, N) to ``store`` in order, and
    the attention of an attention pool (:class:`~lrpkit.layers.AttentionPool`, (B, heads, L, N − start)) to
    ``pool_store`` if given."""
    def call(layer, x):
        if isinstance(layer, AttentionPool) and pool_store is not None:
            y, attn = layer(x, return_attention=True)
            pool_store.append(attn)
            return y
        if not isinstance(layer, SelfAttention):
            return layer(x)
        y, attn = layer(x, return_attention=True)
        store.append(attn)
        return y

    return run(chain, x, call)


def attention_and_gradients(chain: Chain, x: torch.Tensor, target=None, with_grad: bool = True):
    """Output (B, K), target (B,), attentions [A_1..A_L] and, if ``with_grad``, gradients [∂y_t/∂A_1..] paired
    block by block (gradient b belongs to attention b). ``target``: None (argmax), int or per-sample indices.
    A chain with an attention pool ('map') has the pool's attention (B, heads, L, N − start) and its gradient last
    (see :func:`split_pool`)."""
    attns: list = []
    pool: list = []
    if not with_grad:
        with torch.no_grad():
            out = run_with_attention(chain, x, attns, pool)
        return out, resolve_target(out, target), attns + pool, None
    x = x.detach().requires_grad_(True)  # the chain's parameters are frozen: the graph starts at the input
    with torch.enable_grad():
        out = run_with_attention(chain, x, attns, pool)
        t = resolve_target(out.detach(), target)
        picked = out.gather(1, t[:, None]).sum()
        grads = [g.detach() for g in torch.autograd.grad(picked, attns + pool)]
    return out.detach(), t, [a.detach() for a in attns + pool], grads


def attention_pool(chain: Chain) -> AttentionPool | None:
    """The chain's attention pool (timm's ``global_pool='map'``), or None."""
    return next((m for m in chain.modules() if isinstance(m, AttentionPool)), None)


def split_pool(chain: Chain, tensors: list) -> tuple[list, torch.Tensor | None]:
    """``(blocks, pool)``: a list from :func:`attention_and_gradients` split into the blocks' part and the attention
    pool's (the last entry; None for a chain without a pool)."""
    if attention_pool(chain) is None:
        return list(tensors), None
    return list(tensors[:-1]), tensors[-1]
