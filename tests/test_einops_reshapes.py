"""The einops reshapes of ``SelfAttention`` (split and merge of the heads) equal the explicit torch expressions they
replaced: the same values, shape, strides and storage offset, a view exactly where the old expression gave a view
(and a copy where it copied), and the same gradients, for every memory layout of the input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lrpkit.layers import SelfAttention

B, N, H, D = 2, 5, 3, 4


def old_split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, num_heads, -1).transpose(1, 2)


def old_merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def layouts(shape: tuple[int, ...]):
    """Tensors of ``shape`` in every dimension order of memory, plus a strided slice and a chunk of a wider one."""
    g = torch.Generator().manual_seed(0)
    for order in itertools.permutations(range(len(shape))):
        stored = torch.randn([shape[i] for i in order], generator=g)
        yield f"order{order}", stored.permute([order.index(i) for i in range(len(shape))])
    yield "every-other", torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    yield "chunk", torch.randn(*shape[:-1], 3 * shape[-1], generator=g).chunk(3, dim=-1)[1]


def same_tensor(new: torch.Tensor, old: torch.Tensor, source: torch.Tensor) -> None:
    assert torch.equal(new, old)
    assert new.shape == old.shape and new.dtype == old.dtype
    assert new.stride() == old.stride()
    assert new.storage_offset() == old.storage_offset()
    assert new.is_contiguous() == old.is_contiguous()
    shares = source.untyped_storage().data_ptr()
    assert (new.untyped_storage().data_ptr() == shares) == (old.untyped_storage().data_ptr() == shares)


@pytest.fixture
def layer():
    return SelfAttention(nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D), num_heads=H, scale=D ** -0.5)


@pytest.mark.parametrize("name,t", list(layouts((B, N, H * D))), ids=lambda v: v if isinstance(v, str) else "")
def test_split_heads_equals_view_transpose(layer, name, t):
    new, old = layer.split_heads(t), old_split_heads(t, H)
    same_tensor(new, old, t)
    assert new.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # always a view


@pytest.mark.parametrize("name,t", list(layouts((B, H, N, D))), ids=lambda v: v if isinstance(v, str) else "")
def test_merge_heads_equals_transpose_reshape(name, t):
    same_tensor(SelfAttention.merge_heads(t), old_merge_heads(t), t)


def test_merge_heads_copies_exactly_when_the_old_expression_did():
    contiguous = torch.randn(B, H, N, D)  # attn @ v: merging the heads needs a copy
    assert SelfAttention.merge_heads(contiguous).untyped_storage().data_ptr() != contiguous.untyped_storage().data_ptr()
    split = torch.randn(B, N, H, D).transpose(1, 2)  # split_heads' output: merging is a view again
    assert SelfAttention.merge_heads(split).untyped_storage().data_ptr() == split.untyped_storage().data_ptr()


def test_gradients_and_their_layout_are_the_same(layer):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, 3 * H * D, generator=g)
    upstream = torch.randn(B, N, H * D, generator=g)
    grads = []
    for split, merge in ((layer.split_heads, SelfAttention.merge_heads),
                         (lambda t: old_split_heads(t, H), old_merge_heads)):
        leaf = x.clone().requires_grad_(True)
        q, k, v = (split(t) for t in leaf.chunk(3, dim=-1))
        y = merge(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
        (grad,) = torch.autograd.grad(y, leaf, upstream)
        grads.append((y.detach(), grad))
    (y_new, g_new), (y_old, g_old) = grads
    assert torch.equal(y_new, y_old) and torch.equal(g_new, g_old)
    assert y_new.stride() == y_old.stride() and g_new.stride() == g_old.stride()


def test_inside_inference_mode(layer):
    with torch.inference_mode():
        t = torch.randn(B, N, H * D)
        same_tensor(layer.split_heads(t), old_split_heads(t, H), t)
        u = torch.randn(B, H, N, D)
        same_tensor(SelfAttention.merge_heads(u), old_merge_heads(u), u)
