"""The explicit layers that canonization introduces.

Each layer is a small ``nn.Module`` whose ``forward`` is exactly the computation it replaces, so a canonized
model gives the same output as the original. The rules in :mod:`lrpkit.rules` are written against these layers.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from einops import rearrange
from torch import nn


class Chain(nn.Module):
    """A flat sequence of layers, ``Chain(f1, ..., fL)(x) = fL(...f1(x))``.

    Like ``nn.Sequential``, but every entry remembers the path of the module it came from in the original model
    (``names``), which composites (``NameMap``) and the rule table use.
    """

    def __init__(self, layers: Sequence[nn.Module], names: Sequence[str] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        names = list(names) if names is not None else [str(i) for i in range(len(self.layers))]
        if len(names) != len(self.layers):
            raise ValueError(f"Chain got {len(self.layers)} layers but {len(names)} names")
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> nn.Module:
        return self.layers[i]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)


class Container(nn.Module):
    """A layer made of branches, each a :class:`Chain` applied to the same input, whose outputs it merges:
    ``y = merge(a, [f_1(a), ..., f_n(a)])``. Its rule propagates relevance into the branches with their own rules."""

    def chains(self) -> tuple[Chain, ...]:
        """The branches, in order."""
        raise NotImplementedError

    def merge(self, x: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The container's output from its input and its branches' outputs."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x, [branch(x) for branch in self.chains()])


class SkipConnection(Container):
    """Residual connection ``y = a + f(a)`` with ``f`` an explicit :class:`Chain`.

    Its rule (:class:`lrpkit.rules.SkipConnectionRule`) splits the relevance in proportion to the two summands.
    """

    def __init__(self, inner: Chain):
        super().__init__()
        self.inner = inner

    def chains(self) -> tuple[Chain, ...]:
        return (self.inner,)

    def merge(self, x, outputs):
        return x + outputs[0]


class Sum(Container):
    """Parallel branches added up, ``y = Σ_i f_i(a)`` (e.g. a ResNet block with a downsampling shortcut).

    Its rule (:class:`lrpkit.rules.SumRule`) splits the relevance in proportion to the branch outputs.
    """

    def __init__(self, *branches: Chain):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def chains(self) -> tuple[Chain, ...]:
        return tuple(self.branches)

    def merge(self, x, outputs):
        out = outputs[0]
        for o in outputs[1:]:
            out = out + o
        return out


class Multiply(Container):
    """The element-wise product of two branches, ``y = s(a) ⊙ g(a)`` (broadcasting): a squeeze-excitation gate
    ``x ⊙ σ(W₂ relu(W₁ mean(x)))`` (``signal`` an empty chain, the identity), or a gated linear unit
    ``act(x W_g) ⊙ (x W_u)``. ``gate`` is the factor that :class:`lrpkit.rules.ProductRule`'s ``gate`` mode
    holds constant.
    """

    def __init__(self, signal: Chain, gate: Chain):
        super().__init__()
        self.signal, self.gate = signal, gate

    def chains(self) -> tuple[Chain, ...]:
        return (self.signal, self.gate)

    def merge(self, x, outputs):
        return outputs[0] * outputs[1]


class PatchFlatten(nn.Module):
    """Patch grid to token sequence: ``(B, C, H, W) -> (B, H·W, C)``, token ``n = h·W + w``.

    A pure reshape: its rule is the exact inverse reshape of the relevance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class PositionalEmbedding(nn.Module):
    """Adds the patch positional embedding on the patch grid: ``y = x + e`` with ``x`` of shape (B, C, H, W).

    ``embed`` holds the embedding of the patch tokens as a (1, C, gh, gw) grid. For ``dynamic=True`` it is
    resampled to the input's grid with timm's ``resample_abs_pos_embed`` (bicubic), exactly as timm's
    ``dynamic_img_size`` models do; otherwise the grid must match. The embedding of the prefix tokens (class,
    distillation, register tokens) is folded into :class:`ClassToken`, which is the same sum in another order.
    """

    def __init__(self, embed: torch.Tensor, dynamic: bool = False):
        super().__init__()
        self.embed = nn.Parameter(embed.detach().clone(), requires_grad=False)
        self.dynamic = dynamic

    def grid_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The embedding (1, C, H, W) for a patch grid of size ``grid``."""
        if tuple(self.embed.shape[-2:]) == tuple(grid):
            return self.embed
        if not self.dynamic:
            raise ValueError(
                f"the input gives a {grid[0]}x{grid[1]} patch grid but the model was built for "
                f"{self.embed.shape[-2]}x{self.embed.shape[-1]}; resize the input, or create the timm model with "
                f"dynamic_img_size=True"
            )
        from timm.layers import resample_abs_pos_embed

        tokens = self.embed.flatten(2).transpose(1, 2)
        tokens = resample_abs_pos_embed(tokens, new_size=list(grid), old_size=list(self.embed.shape[-2:]),
                                        num_prefix_tokens=0)
        return tokens.transpose(1, 2).reshape(1, -1, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.grid_embedding(tuple(x.shape[-2:]))


class ClassToken(nn.Module):
    """Prepends the prefix tokens: ``y = [t_1, ..., t_P, x_1, ..., x_N]`` with constant tokens ``t``.

    ``tokens`` is (1, P, C) and already includes the prefix tokens' positional embedding where the model adds
    one. ``kinds`` names each prefix token ("class", "distillation", "register") for the relevance accounting.
    """

    def __init__(self, tokens: torch.Tensor, kinds: Sequence[str]):
        super().__init__()
        if tokens.shape[1] != len(kinds):
            raise ValueError(f"ClassToken got {tokens.shape[1]} tokens but {len(kinds)} kinds")
        self.tokens = nn.Parameter(tokens.detach().clone(), requires_grad=False)
        self.kinds = list(kinds)

    @property
    def num_prefix(self) -> int:
        """P, the number of prepended tokens."""
        return len(self.kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)


class SelectClassToken(nn.Module):
    """Selects one token: ``y = x[:, index]`` (timm's ``global_pool='token'``), (B, N, C) -> (B, C)."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


class TokenMean(nn.Module):
    """Mean over the tokens from ``start`` on: ``y = 1/(N-start) Σ_{n>=start} x_n`` (timm's ``global_pool='avg'``)."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:].mean(dim=1)


class LayerNormalize(nn.Module):
    """The normalisation part of LayerNorm over the last dimension (or ``dim``): ``y = (x - μ(x)) / σ(x)``,
    ``σ(x) = sqrt(Var(x) + eps)`` (biased variance). The affine part is a separate :class:`Scale`.

    ``dim=1`` on a (B, C, H, W) feature map is timm's ``LayerNorm2d`` (LayerNorm over the channels of each
    position), computed as timm does: moved to the last dimension, normalised, moved back."""

    def __init__(self, eps: float = 1e-5, dim: int = -1):
        super().__init__()
        self.eps = eps
        self.dim = dim

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """``σ(x) = sqrt(Var(x) + eps)`` over ``dim`` (biased variance), keeping ``dim`` with size 1.

        The variance is accumulated in float64 by the two-pass formula ``mean((x - mean(x))²)``: as accurate as
        torch's ``var`` (Welford's update in float64), and about ten times faster on CPU, where ``var`` does not
        vectorise. Rounded to ``x``'s dtype the two give the same value except where their float64 values straddle
        a rounding boundary, which takes a row whose mean is many times its spread (measured on float32 rows of
        96 to 768 values: none in 10⁶ rows of unit scale, 7 in 10⁴ rows with mean/std = 10⁴). A float64 ``x`` has
        no wider type to accumulate in and keeps torch's ``var``."""
        if x.dtype == torch.float64:
            return torch.sqrt(x.var(dim=self.dim, unbiased=False, keepdim=True) + self.eps)
        d = x.to(torch.float64)
        d.sub_(d.mean(dim=self.dim, keepdim=True))
        var = d.square_().mean(dim=self.dim, keepdim=True).to(x.dtype)
        return torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - μ(x)) / σ(x)`` as the forward pass computes it (torch's ``layer_norm``), for rules that need ``y``
        again without calling the module (and its hooks)."""
        if self.dim in (-1, x.ndim - 1):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        x = x.movedim(self.dim, -1)
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" if self.dim != -1 else ""


class Scale(nn.Module):
    """Element-wise affine map over the last dimension (or ``dim``): ``y = w ⊙ x + b``.

    Canonization uses it for LayerNorm's affine part and for LayerScale (``b = None``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dim: int = -1):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dim = dim

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._shape(x)
        y = x * self.weight.view(shape)
        return y if self.bias is None else y.add_(self.bias.view(shape))  # in y's buffer: one tensor, not two


class Permute(nn.Module):
    """``y = x.permute(dims)``, e.g. (B, C, H, W) -> (B, H, W, C) for a channels-last MLP (timm's ConvNeXt block).

    A view, as in timm: a ConvNeXt's feature maps lie channels last in memory (its LayerNorm2d leaves them so), so
    the permuted tensor is contiguous and the one permuted back is channels last again; a copy in either direction
    would mix the two layouts in the element-wise steps after it. A pure rearrangement: its rule is the inverse
    permutation of the relevance."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    @property
    def inverse(self) -> tuple[int, ...]:
        """The permutation that undoes ``dims``."""
        inv = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inv[d] = i
        return tuple(inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class GlobalResponseNormalize(nn.Module):
    """Global response normalisation (ConvNeXt V2, timm's ``GlobalResponseNorm``) on a (B, H, W, C) tensor
    (``channel_dim=-1``) or a (B, C, H, W) one (``channel_dim=1``):

    ``G_c = ‖x_c‖₂`` over the spatial positions, ``N_c = G_c / (mean_c G + eps)``,
    ``y = x + γ ⊙ (x ⊙ N) + β``.

    With ``N`` held constant (:class:`lrpkit.rules.GlobalResponseNormRule`, as LayerNorm's σ) it is an
    element-wise affine map of ``x`` with the factor ``1 + γ ⊙ N``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, channel_dim: int = -1):
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (B, C, H, W) or -1 (B, H, W, C), got {channel_dim}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.eps = eps
        self.channel_dim = channel_dim

    def _shape(self) -> tuple[int, ...]:
        return (1, 1, 1, -1) if self.channel_dim == -1 else (1, -1, 1, 1)

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """``N = G / (mean_c G + eps)``, the normalised response per sample and channel (broadcastable to x)."""
        spatial = (1, 2) if self.channel_dim == -1 else (2, 3)
        g = x.norm(p=2, dim=spatial, keepdim=True)
        return g / (g.mean(dim=self.channel_dim, keepdim=True) + self.eps)

    def forward_with_response(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, N)``: the output and the normalised response it was computed with."""
        shape, n = self._shape(), self.response(x)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * n), n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_response(x)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, channel_dim={self.channel_dim}"


class Rotary(nn.Module):
    """Rotary position embedding (RoPE; Su et al. 2021, "RoFormer"), as timm's ``apply_rot_embed_cat`` applies it to
    the query and key heads (B, H, N, d) of EVA-02:

    ``t ↦ t ⊙ cos + rot(t) ⊙ sin`` per token position, with ``rot`` the rotation of each channel pair by 90°:
    interleaved pairs ``[x0, x1, ...] ↦ [−x1, x0, ...]`` (``half=False``) or the two halves ``[a, b] ↦ [−b, a]``
    (``half=True``). The ``num_prefix`` leading tokens (class, registers) are not rotated. ``sin`` and ``cos``
    (N − num_prefix, d) are constants of the canonized model (its image size), so the map is linear in ``t``.
    """

    def __init__(self, sin: torch.Tensor, cos: torch.Tensor, num_prefix: int = 0, half: bool = False):
        super().__init__()
        self.register_buffer("sin", sin.detach().clone())
        self.register_buffer("cos", cos.detach().clone())
        self.num_prefix, self.half = num_prefix, half
        # rot(t) = swap(t) ⊙ sign with sign = (−1, +1, −1, ...) (interleaved) or (−1, ..., −1, +1, ..., +1) (half);
        # the sign folded into sin once: the products are the same numbers (a negation is exact)
        d = sin.shape[-1]
        sign = torch.tensor([-1.0, 1.0]).repeat_interleave(d // 2) if half else torch.tensor([-1.0, 1.0]).repeat(d // 2)
        self.register_buffer("sign", sign.to(self.sin), persistent=False)  # sin's dtype and device
        self.register_buffer("signed_sin", self.sin * self.sign, persistent=False)

    def swap(self, t: torch.Tensor) -> torch.Tensor:
        """The channels of each pair exchanged: ``[x0, x1, ...] ↦ [x1, x0, ...]`` (interleaved) or ``[a, b] ↦ [b, a]``
        (half)."""
        if self.half:
            return t.roll(t.shape[-1] // 2, dims=-1)
        return t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """``rot(t)``: every channel pair turned by 90°."""
        return self.swap(t) * self.sign

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix
        body = t[:, :, p:]
        body = (body * self.cos + self.swap(body) * self.signed_sin).to(t.dtype)  # t ⊙ cos + rot(t) ⊙ sin
        return torch.cat([t[:, :, :p], body], dim=2) if p else body

    def transpose(self, s: torch.Tensor) -> torch.Tensor:
        """``Jᵀ s``, the rotation's transpose applied to ``s`` (B, H, N, d) (it turns back): ``s ⊙ cos −
        rot(s ⊙ sin)``, since ``rot`` is antisymmetric; the prefix tokens pass ``s``. The rules use it for the
        relevance through the rotation."""
        p = self.num_prefix
        body = s[:, :, p:]
        body = (body * self.cos - self.rotate(body * self.sin)).to(s.dtype)
        return torch.cat([s[:, :, :p], body], dim=2) if p else body

    def extra_repr(self) -> str:
        return f"tokens={self.sin.shape[0]}, head_dim={self.sin.shape[-1]}, num_prefix={self.num_prefix}, " \
               f"half={self.half}"


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C), as in timm's ``Attention`` (and BEiT's, EVA's):

    ``q, k, v = split(x W_qkv + b_qkv)`` per head; ``q, k = rope(norm_q(q)), rope(norm_k(k))`` (qk-norm and rotary
    embedding, each else the identity); ``S = q kᵀ · scale + B`` (``B`` a constant score bias: a relative position
    bias, a window mask; else none); ``A = softmax(S)``; ``y = A v``; heads merged; ``out = y W_proj + b_proj``.

    ``forward(x, return_attention=True)`` also returns the attention probabilities A (B, heads, N, N), which timm's
    fused attention never materialises.

    A subclass that attends within groups of tokens (Swin's windows) overrides :meth:`group` and :meth:`ungroup`, a
    permutation of the tokens into groups stacked along the batch and its inverse, and :meth:`score_bias` to lay its
    bias out over the groups. The rules run on the grouped tokens and pass relevance back through the inverse
    permutation.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, scale: float,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, norm: nn.Module | None = None,
                 bias: torch.Tensor | None = None, rope: Rotary | None = None):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads = num_heads
        self.scale = scale
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()
        self.register_buffer("attn_bias", None if bias is None else bias.detach().clone())
        self.rope = rope if rope is not None else nn.Identity()

    @property
    def head_dim(self) -> int:
        """d, the width of one head: ``qkv.out_features / (3 · num_heads)``."""
        return self.qkv.out_features // (3 * self.num_heads)

    def extra_repr(self) -> str:
        extras = [name for name, on in (("bias", self.attn_bias is not None), ("rope", not isinstance(
            self.rope, nn.Identity)), ("qk_norm", not isinstance(self.q_norm, nn.Identity))) if on]
        return ", ".join([f"heads={self.num_heads}, head_dim={self.head_dim}"] + extras)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H·d) -> (B, H, N, d)."""
        return rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)  # a view of t, as t.view(...).transpose(1, 2)

    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, N, H·d)."""
        return rearrange(t, "b h n d -> b n (h d)")  # as t.transpose(1, 2).reshape(...): a copy unless t allows a view

    def positions(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope(norm_q(q)), rope(norm_k(k))``: the heads (B, H, N, d) that the scores multiply."""
        return self.rope(self.q_norm(q)), self.rope(self.k_norm(k))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normalised, rotated) and v, each (B, H, N, d)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return *self.positions(self.split_heads(q), self.split_heads(k)), self.split_heads(v)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B·G, n, C): the groups of tokens that attend to each other (all of them: the identity)."""
        return x

    def ungroup(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The inverse of :meth:`group` for a batch of ``batch`` samples."""
        return t

    def score_bias(self, q: torch.Tensor) -> torch.Tensor | None:
        """The constant ``B`` added to the scores of the heads ``q`` (broadcastable to (B, H, N, N)), or None."""
        bias = self.attn_bias
        if bias is not None and bias.shape[-1] != q.shape[-2]:
            raise ValueError(f"this attention's score bias (a relative position bias) is fixed to {bias.shape[-1]} "
                             f"tokens, but the input gives {q.shape[-2]}: the model was built for one image size; "
                             f"resize the input to it (the model's data config), or rebuild the timm model for "
                             f"this size (set_input_size) before explaining it")
        return bias

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``S = q kᵀ · scale + B`` (B, H, N, N)."""
        s = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.score_bias(q)
        return s if bias is None else s + bias

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``A = softmax(S)`` (B, H, N, N)."""
        return torch.softmax(self.scores(q, k), dim=-1)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        batch, x = x.shape[0], self.group(x)
        q, k, v = self.qkv_heads(x)
        if return_attention:
            attn = self.attention(q, k)
            y = attn @ v
        else:
            bias = self.score_bias(q)
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q),
                                                           scale=self.scale)
        out = self.ungroup(self.proj(self.norm(self.merge_heads(y))), batch)
        return (out, attn) if return_attention else out


class AttentionPool(nn.Module):
    """Attention pooling with learned latent queries (timm's ``AttentionPoolLatent``, the 'map' head of SigLIP), on
    tokens (B, N, C):

    ``q = norm_q(split(latent W_q + b_q))`` (1, heads, L, d), a constant of the model (``W_q`` the identity for
    timm's ``q_proj=False``); ``k, v = split(x' W_kv + b_kv)`` over the tokens ``x' = x[:, start:]`` (``start``: the
    prefix tokens the pool leaves out, timm's ``pool_include_prefix=False``), ``k = norm_k(k)``;
    ``A = softmax(q kᵀ · scale)`` (B, heads, L, N − start); ``y = merge(A v)`` (B, L, heads·d).

    The rest of timm's pool (its output projection, the residual MLP ``y + mlp(norm(y))`` and the choice of the
    latent, ``'token'`` or ``'avg'``) are separate layers of the chain. ``forward(x, return_attention=True)`` also
    returns A, which a fused attention never materialises.
    """

    def __init__(self, latent: torch.Tensor, q: nn.Module, kv: nn.Linear, num_heads: int, scale: float,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, start: int = 0):
        super().__init__()
        self.latent = nn.Parameter(latent.detach().clone(), requires_grad=False)
        self.q, self.kv = q, kv
        self.num_heads, self.scale, self.start = num_heads, scale, start
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()

    @property
    def latent_len(self) -> int:
        """L, the number of latent queries."""
        return self.latent.shape[1]

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H·d) -> (B, H, N, d)."""
        return rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)

    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, N, H·d)."""
        return rearrange(t, "b h n d -> b n (h d)")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens the pool attends to, ``x[:, start:]``."""
        return x[:, self.start:] if self.start else x

    def query(self) -> torch.Tensor:
        """``norm_q(split(latent W_q + b_q))`` (1, H, L, d): the same for every input."""
        return self.q_norm(self.split_heads(self.q(self.latent)))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k (normalised) and v of the tokens ``x[:, start:]``, each (B, H, N − start, d)."""
        k, v = self.kv(self.tokens(x)).chunk(2, dim=-1)
        return self.k_norm(self.split_heads(k)), self.split_heads(v)

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``A = softmax(q kᵀ · scale)`` (B, H, L, N − start)."""
        return torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        q, (k, v) = self.query(), self.keys_values(x)
        q = q.expand(x.shape[0], -1, -1, -1)
        if return_attention:
            attn = self.attention(q, k)
            y = self.merge_heads(attn @ v)
            return y, attn
        return self.merge_heads(nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale))

    def extra_repr(self) -> str:
        return f"latent_len={self.latent_len}, num_heads={self.num_heads}, start={self.start}"
# --- Swin ---
class WindowSelfAttention(SelfAttention):
    """Shifted-window multi-head self-attention (Swin; Liu et al. 2021, "Swin Transformer: Hierarchical Vision
    Transformer using Shifted Windows") on a channels-last feature map (B, H, W, C), as timm's
    ``SwinTransformerBlock._attn`` computes it with its ``WindowAttention``:

    1. cyclic shift ``x ↦ roll(x, (−s_h, −s_w))`` over (H, W) (``shift`` (0, 0): none);
    2. zeros appended below and to the right up to a multiple of the window (timm's padding; none when the grid is a
       multiple of ``window``);
    3. partition into windows of ``window`` = (w_h, w_w) tokens, stacked along the batch sample by sample: window
       (i, j) of sample b is group ``b·nW + i·(W_p/w_w) + j``, its tokens in row-major order;
    4. in each window, :class:`SelfAttention` with the score bias ``B_rel + M``: ``B_rel`` (heads, n, n) the relative
       position bias of the window (timm's table read through its index), ``M`` (nW, n, n) timm's shift mask (0
       within a region of the shifted map, −100 across regions; none without a shift);
    5. windows merged back, the padding cropped, the shift undone.

    Steps 1-3 are :meth:`group`, 5 is :meth:`ungroup` (exact permutations, except the crop of the padding; each one
    gather of the tokens by an index built once), 4 is the attention of :class:`SelfAttention` with
    :meth:`score_bias`. ``grid`` (H, W) is the feature map the model was
    built for (the shift mask depends on it); another grid is an error.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, scale: float, window: tuple[int, int],
                 grid: tuple[int, int], shift: tuple[int, int] = (0, 0), relative_bias: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        super().__init__(qkv, proj, num_heads, scale, bias=relative_bias)
        self.window, self.grid, self.shift = tuple(window), tuple(grid), tuple(shift)
        hp, wp = self.padded_grid
        windows = (hp // self.window[0]) * (wp // self.window[1])
        if mask is not None and mask.shape[0] != windows:
            raise ValueError(f"a shift mask of {mask.shape[0]} windows for a {hp}x{wp} map in {self.window} windows "
                             f"({windows} windows)")
        self.register_buffer("mask", None if mask is None else mask.detach().clone())
        source, place = self._token_order()
        self.register_buffer("source", source.to(self.qkv.weight.device))
        self.register_buffer("place", place.to(self.qkv.weight.device))

    @property
    def padded_grid(self) -> tuple[int, int]:
        """(H_p, W_p): the grid rounded up to a multiple of the window."""
        return tuple(-(-g // w) * w for g, w in zip(self.grid, self.window))

    @property
    def num_windows(self) -> int:
        """nW, the windows of one sample."""
        hp, wp = self.padded_grid
        return (hp // self.window[0]) * (wp // self.window[1])

    def _token_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The permutation as indices: ``source`` (H_p·W_p,), the position ``h·W + w`` of the input token at each
        place of the grouped layout (H·W for a padding token), and ``place`` (H·W,), its inverse on the input
        tokens. Window (i, j), token (r, c) sits at the padded, shifted position (i·w_h + r, j·w_w + c); the
        shifted map holds input token ((h + s_h) mod H, (w + s_w) mod W) at (h, w) (``roll`` by (−s_h, −s_w))."""
        (h, w), (hp, wp), (wh, ww), (sh, sw) = self.grid, self.padded_grid, self.window, self.shift
        rows = torch.arange(hp).view(hp // wh, 1, wh, 1).expand(-1, wp // ww, -1, ww).reshape(-1)
        cols = torch.arange(wp).view(1, wp // ww, 1, ww).expand(hp // wh, -1, wh, -1).reshape(-1)
        inside = (rows < h) & (cols < w)
        source = torch.where(inside, (rows + sh) % h * w + (cols + sw) % w, h * w)
        place = torch.empty(h * w, dtype=torch.long)
        place[source[inside]] = torch.arange(hp * wp)[inside]
        return source, place

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B·nW, w_h·w_w, C): shift, pad, partition (steps 1-3), as one gather of the tokens."""
        b, h, w, c = x.shape
        if (h, w) != self.grid:
            raise ValueError(f"the window attention gets a {h}x{w} feature map but the model was built for "
                             f"{self.grid[0]}x{self.grid[1]} (its shift mask and windows depend on it); give the "
                             f"input the model's img_size")
        tokens = x.reshape(b, h * w, c)
        if self.padded_grid != self.grid:
            tokens = nn.functional.pad(tokens, (0, 0, 0, 1))  # token H·W: the zeros of the padding
        return tokens.index_select(1, self.source).view(-1, self.window[0] * self.window[1], c)

    def ungroup(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """(B·nW, w_h·w_w, C) -> (B, H, W, C): merge the windows, crop the padding, undo the shift (step 5), as one
        gather."""
        c = t.shape[-1]
        return t.reshape(batch, -1, c).index_select(1, self.place).view(batch, *self.grid, c)

    def score_bias(self, q: torch.Tensor) -> torch.Tensor:
        """``B_rel + M`` for the windows ``q`` (B·nW, heads, n, d): (1, heads, n, n) without a shift mask, else laid
        out over the B·nW windows (B·nW, heads, n, n), window k of each sample with mask ``M[k]``."""
        bias = self.attn_bias.unsqueeze(0)
        if self.mask is None:
            return bias
        per_window = self.mask.unsqueeze(1) + bias  # (nW, heads, n, n)
        return per_window.repeat(q.shape[0] // self.num_windows, 1, 1, 1)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``S = q kᵀ · scale + B_rel + M`` (B·nW, heads, n, n), the mask added per window by broadcasting (as timm
        does) instead of being laid out over the batch first."""
        s = (q * self.scale) @ k.transpose(-2, -1)
        if self.mask is None:
            return s + self.attn_bias
        n = s.shape[-1]
        s = s.view(-1, self.num_windows, self.num_heads, n, n) + (self.mask.unsqueeze(1) + self.attn_bias)
        return s.view(-1, self.num_heads, n, n)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window}, shift={self.shift}, grid={self.grid}"


class SpaceToDepth(nn.Module):
    """The rearrangement of Swin's patch merging (timm's ``PatchMerging`` before its norm): (B, H, W, C) ->
    (B, ⌈H/2⌉, ⌈W/2⌉, 4C). Each 2×2 block of positions becomes one position whose channels are the block's four
    positions in timm's order of (row offset r, column offset s): (0, 0), (1, 0), (0, 1), (1, 1), i.e. channel
    ``s·2C + r·C + k`` holds channel k of position (2i + r, 2j + s). An odd H or W first gets a row or column of
    zeros below or to the right, as in timm.

    A permutation (with the zero padding): its rule is the inverse permutation of the relevance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        return x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)

    @staticmethod
    def inverse(R: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The relevance (B, H/2, W/2, 4C) of the outputs moved back to the input positions, ``shape`` (B, H, W, C);
        what the output took from the zero padding is dropped (zero under every rule that weighs by the input)."""
        b, h, w, c = shape
        h2, w2 = R.shape[1], R.shape[2]
        R = R.reshape(b, h2, w2, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * h2, 2 * w2, c)
        return R[:, :h, :w].contiguous() if (2 * h2, 2 * w2) != (h, w) else R
