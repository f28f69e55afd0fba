"""Run a canonized chain while keeping every attention-probability tensor (and, on request, its gradient).

Shared by the attention-based explainers. The chain's own layers are called; nothing is patched or hooked.
"""

from __future__ import annotations

import torch

from ..analyzer import resolve_target
from ..layers import Chain, SelfAttention
from ..walk import run


def run_with_attention(chain: Chain, x: torch.Tensor, store: list) -> torch.Tensor:
    """``chain(x)``, appending each block's attention probabilities A (B, heads, N, N) to ``store`` in order."""
    def call(layer, x):
        if not isinstance(layer, SelfAttention):
            return layer(x)
        y, attn = layer(x, return_attention=True)
        store.append(attn)
        return y

    return run(chain, x, call)


def attention_and_gradients(chain: Chain, x: torch.Tensor, target=None, with_grad: bool = True):
    """Output (B, K), target (B,), attentions [A_1..A_L] and, if ``with_grad``, gradients [∂y_t/∂A_1..] paired
    block by block (gradient b belongs to attention b). ``target``: None (argmax), int or per-sample indices."""
    attns: list = []
    if not with_grad:
        with torch.no_grad():
            out = run_with_attention(chain, x, attns)
        return out, resolve_target(out, target), attns, None
    x = x.detach().requires_grad_(True)  # the chain's parameters are frozen: the graph starts at the input
    with torch.enable_grad():
        out = run_with_attention(chain, x, attns)
        t = resolve_target(out.detach(), target)
        picked = out.gather(1, t[:, None]).sum()
        grads = [g.detach() for g in torch.autograd.grad(picked, attns)]
    return out.detach(), t, [a.detach() for a in attns], grads
