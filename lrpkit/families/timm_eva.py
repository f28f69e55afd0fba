"""The ``timm-eva`` family: timm's ``Eva`` (EVA-02 ``eva02_tiny/small/base/large_patch14_*``, EVA-01 style models
with a plain MLP), canonized; default composite CP-LRP; geometry from ``patch_embed`` and the prefix tokens (global
attention).

The chain (one entry per line)::

    Conv2d                        patch projection (patch_embed.proj)
    PositionalEmbedding           + patch positional embedding on the grid (if use_abs_pos_emb)
    PatchFlatten                  (B, C, h, w) -> (B, h·w, C)
    ClassToken                    prepend class [, register] tokens (with their pos. embedding)
    LayerNormalize, Scale         norm_pre (use_pre_transformer_norm only)
    SkipConnection(Chain(LayerNormalize, Scale, SelfAttention(rope=Rotary) [, Scale]))   per block: attention
    SkipConnection(Chain(LayerNormalize, Scale, MLP [, Scale]))                          per block: MLP
    LayerNormalize, Scale         final norm (if any; EVA-02 pools first and normalises with fc_norm)
    TokenMean | SelectClassToken  global_pool 'avg' | 'token'
    LayerNormalize, Scale         fc_norm (if any)
    Linear                        head (if any; the eva02_*_224 MIM models have none)

The MLP is one of

- timm ``GluMlp`` (EVA-02 tiny/small, ``swiglu_mlp=True``): ``Multiply(Chain(Linear), Chain(Linear, SiLU))``
  [, ``LayerNormalize, Scale``], ``Linear``. The packed ``fc1`` is split by its rows into the signal half and the
  gate half; the gate is the ``act(...)`` half, the first one for ``gate_last=False`` (EVA-02), the second for
  ``gate_last=True``;
- timm ``SwiGLU`` (EVA-02 base/large, ``swiglu_mlp=True, scale_mlp=True``): ``Multiply(Chain(fc1_x),
  Chain(fc1_g, SiLU))``, ``LayerNormalize, Scale`` (its inner norm), ``Linear`` (fc2);
- timm ``Mlp`` (``swiglu_mlp=False``): ``Linear, act [, LayerNormalize, Scale], Linear``.

The attention is :class:`~lrpkit.layers.SelfAttention` with one fused ``qkv`` Linear: EVA's fused projection with
its bias ``cat(q_bias, k_bias = 0, v_bias)`` (``qkv_bias_separate`` adds the same bias after the product), or the
separate ``q_proj``, ``k_proj``, ``v_proj`` (``qkv_fused=False``, EVA-02 base/large) stacked by rows, with zeros
for the key's absent bias. Each output feature is the same dot product as in timm, so the fused layer computes the
same numbers (up to the rounding order of the matrix product). Its rotary embedding is a
:class:`~lrpkit.layers.Rotary` with the sine and cosine that timm's ``RotaryEmbeddingCat`` caches for the model's
image size (``rope.get_embed()`` in eval mode), the block's ``rotate_half`` layout and its prefix tokens left
unrotated, exactly as ``EvaAttention`` applies ``apply_rot_embed_cat``. Layer scale (``gamma_1``, ``gamma_2``)
is a :class:`~lrpkit.layers.Scale`; LayerNorm qk-norms are kept.

Supported exactly: ``PatchEmbed`` (Conv2d, no norm, no dynamic padding), ``EvaBlock`` with ``EvaAttention`` (fused
or separate q/k/v, with or without bias, LayerNorm qk-norm) and the MLPs above, RoPE of type ``'cat'``
(``RotaryEmbeddingCat``, either layout, any grid offset, indexing, temperature or reference shape), absolute
positional embedding, class and register tokens, ``no_embed_class``, layer scale, LayerNorm norms, global_pool
'avg' / 'token', ``fc_norm``. Its train-time parts (dropouts, drop path, patch dropout, RoPE coordinate
augmentation) are the identity in eval mode, and the canonized model computes the eval-mode output.

A :class:`~lrpkit.canonize.CanonizationError` names anything else: ``dynamic_img_size`` (the rotary embedding
depends on the input's grid), other RoPE types ('mixed', 'dinov3', 'mrope'), ``attn_type='rope'``
(``AttentionRope``), ``gated_attn``, ``scale_attn_inner`` (a norm between attention and output projection, which
no EVA-02 model has and SelfAttentionRule does not handle), ``use_post_norm`` (``EvaBlockPostNorm``), attention
pooling ('map'), 'max' / 'avgmax' / '' pooling, RmsNorm and other norms, and a subclass that overrides a forward
method.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonize.core import CanonizationError, copy_layer, join, make_chain, overridden
from ..layers import Multiply, Rotary, Scale, SelectClassToken, SelfAttention, SkipConnection, TokenMean
from . import Family, register_family
from .timm_vit import _embedding, _is_identity, _norm, vit_geometry

# the methods of Eva that make up its forward pass: a subclass that overrides one of them computes something this
# canonizer does not know
_FORWARD_METHODS = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")


def _unsupported(model, what: str) -> CanonizationError:
    return CanonizationError(
        f"lrpkit cannot canonize this {type(model).__name__}: {what} is not supported. Supported: timm EvaBlock with "
        f"EvaAttention (fused or separate q/k/v, RoPE 'cat', LayerNorm qk-norm) and a GluMlp, SwiGLU or Mlp, "
        f"global_pool 'avg' or 'token', LayerNorm norms, a fixed image size.")


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An eval-mode Linear with the given (copied, frozen) weight and bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
    return linear.eval()


def _rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    """The Linear made of some output rows of ``linear``."""
    return _frozen_linear(linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def _qkv(attn, path: str, model) -> nn.Linear:
    """EVA's q/k/v projection as one Linear: weight rows ``[W_q; W_k; W_v]``, bias ``[b_q; b_k; b_v]`` (EVA has no
    key bias: zeros)."""
    if attn.qkv is not None:
        if not isinstance(attn.qkv, nn.Linear) or attn.qkv.bias is not None:
            raise _unsupported(model, f"a fused qkv projection other than a bias-free Linear with q_bias / v_bias "
                                      f"({path}.qkv)")
        if attn.q_bias is None:
            return _frozen_linear(attn.qkv.weight, None)
        return _frozen_linear(attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]))
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not all(type(p) is nn.Linear for p in projections):
        raise _unsupported(model, f"q/k/v projections that are not nn.Linear ({path})")
    weight = torch.cat([p.weight for p in projections])
    if all(p.bias is None for p in projections):
        return _frozen_linear(weight, None)
    bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=p.weight.dtype,
                                                                    device=p.weight.device) for p in projections])
    return _frozen_linear(weight, bias)


def _rotary(model, attn, head_dim: int, path: str) -> Rotary | None:
    """The block's rotary embedding for the model's patch grid (None without RoPE)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    if type(rope) is not RotaryEmbeddingCat or getattr(model, "rope_mixed", False):
        raise _unsupported(model, f"the rotary embedding {type(rope).__name__} (rope_type 'mixed', 'dinov3', "
                                  f"'mrope'; only 'cat', RotaryEmbeddingCat)")
    if rope.pos_embed is None:
        raise _unsupported(model, "a rotary embedding without a cached grid (dynamic_img_size)")
    sin, cos = rope.pos_embed.detach().chunk(2, dim=-1)  # what rope.get_embed() returns in eval mode
    grid = tuple(model.patch_embed.grid_size)
    if sin.shape != (grid[0] * grid[1], head_dim):
        raise _unsupported(model, f"a rotary embedding of shape {tuple(sin.shape)} for a {grid[0]}x{grid[1]} grid "
                                  f"and heads of width {head_dim} ({path})")
    return Rotary(sin, cos, num_prefix=attn.num_prefix_tokens, half=bool(getattr(attn, "rotate_half", False)))


def _qk_norm(norm: nn.Module, path: str, model) -> nn.Module | None:
    if _is_identity(norm):
        return None
    if not isinstance(norm, nn.LayerNorm):
        raise _unsupported(model, f"the qk-norm {path} ({type(norm).__name__})")
    return copy_layer(norm)


def _attention(attn, path: str, model) -> SelfAttention:
    from timm.models.eva import EvaAttention

    if type(attn) is not EvaAttention:
        raise _unsupported(model, f"the attention layer {path} ({type(attn).__name__}; attn_type='rope'?)")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(model, f"gated attention (gated_attn, {path}.gate)")
    if not _is_identity(attn.norm):
        raise _unsupported(model, f"scale_attn_inner (the norm {path}.norm before the output projection)")
    if not isinstance(attn.proj, nn.Linear):
        raise _unsupported(model, f"the output projection {path}.proj ({type(attn.proj).__name__})")
    qkv = _qkv(attn, path, model)
    return SelfAttention(qkv, copy_layer(attn.proj), attn.num_heads, attn.scale,
                         q_norm=_qk_norm(attn.q_norm, join(path, "q_norm"), model),
                         k_norm=_qk_norm(attn.k_norm, join(path, "k_norm"), model),
                         rope=_rotary(model, attn, qkv.out_features // (3 * attn.num_heads), path))


def _product(signal: list, gate: list, path: str) -> tuple:
    """``signal ⊙ gate`` as a Multiply of two branches on the same input, named after the MLP that computes it."""
    return path, Multiply(make_chain(signal), make_chain(gate))


def _mlp(mlp, path: str, model) -> list:
    from timm.layers import GluMlp, Mlp, SwiGLU

    norm = _norm(mlp.norm, join(path, "norm"), model, _unsupported) if hasattr(mlp, "norm") else []
    linears = [getattr(mlp, name, None) for name in ("fc1", "fc1_x", "fc1_g", "fc2")]
    if not all(m is None or type(m) is nn.Linear for m in linears):
        raise _unsupported(model, f"the MLP {path} with layers other than nn.Linear (use_conv?)")
    fc1, act, fc2 = join(path, "fc1"), join(path, "act"), join(path, "fc2")
    if type(mlp) is GluMlp:
        h = mlp.fc1.out_features // 2
        first, second = _rows(mlp.fc1, slice(0, h)), _rows(mlp.fc1, slice(h, 2 * h))
        signal, gate = (first, second) if mlp.gate_last else (second, first)  # the gate is the act(...) half
        product = _product([(fc1, signal)], [(fc1, gate), (act, copy_layer(mlp.act))], path)
    elif type(mlp) is SwiGLU:
        product = _product([(join(path, "fc1_x"), copy_layer(mlp.fc1_x))],
                           [(join(path, "fc1_g"), copy_layer(mlp.fc1_g)), (act, copy_layer(mlp.act))], path)
    elif type(mlp) is Mlp:
        return [(fc1, copy_layer(mlp.fc1)), (act, copy_layer(mlp.act))] + norm + [(fc2, copy_layer(mlp.fc2))]
    else:
        raise _unsupported(model, f"the MLP {path} ({type(mlp).__name__})")
    return [product] + norm + [(fc2, copy_layer(mlp.fc2))]


def _layer_scale(gamma, path: str) -> list:
    return [] if gamma is None else [(path, Scale(gamma))]


def _block(block, path: str, model) -> list:
    from timm.models.eva import EvaBlock, EvaBlockPostNorm

    if type(block) is EvaBlockPostNorm:
        raise _unsupported(model, f"use_post_norm (EvaBlockPostNorm, {path})")
    if type(block) is not EvaBlock:
        raise _unsupported(model, f"the block type {type(block).__name__} ({path})")
    attn = (_norm(block.norm1, join(path, "norm1"), model, _unsupported)
            + [(join(path, "attn"), _attention(block.attn, join(path, "attn"), model))]
            + _layer_scale(block.gamma_1, join(path, "gamma_1")))
    mlp = (_norm(block.norm2, join(path, "norm2"), model, _unsupported) + _mlp(block.mlp, join(path, "mlp"), model)
           + _layer_scale(block.gamma_2, join(path, "gamma_2")))
    return [(join(path, "attn"), SkipConnection(make_chain(attn))),
            (join(path, "mlp"), SkipConnection(make_chain(mlp)))]


def _check_model(model) -> None:
    from timm.models.eva import Eva

    name = overridden(model, Eva, _FORWARD_METHODS)
    if name is not None:
        raise _unsupported(model, f"a subclass of Eva that overrides {name}()")
    if model.dynamic_img_size:
        raise _unsupported(model, "dynamic_img_size (the rotary and positional embeddings follow the input's "
                                  "grid; create the model with a fixed img_size)")
    if getattr(model, "attn_pool", None) is not None:
        raise _unsupported(model, "attention pooling (global_pool='map')")
    if model.global_pool not in ("avg", "token"):
        raise _unsupported(model, f"global_pool={model.global_pool!r}")


def _head(model, path: str) -> list:
    pool = SelectClassToken(0) if model.global_pool == "token" else TokenMean(model.num_prefix_tokens)
    entries = [(join(path, "pool"), pool)] + _norm(model.fc_norm, join(path, "fc_norm"), model, _unsupported)
    if not _is_identity(model.head):
        if type(model.head) is not nn.Linear:
            raise _unsupported(model, f"the head {type(model.head).__name__}")
        entries.append((join(path, "head"), copy_layer(model.head)))
    return entries


def canonize_eva(model, path: str = "") -> list:
    """The flat chain of a timm Eva (see the module docstring)."""
    _check_model(model)
    entries = _embedding(model, path, _unsupported) + _norm(model.norm_pre, join(path, "norm_pre"), model,
                                                             _unsupported)
    for i, block in enumerate(model.blocks):
        entries += _block(block, join(path, f"blocks.{i}"), model)
    entries += _norm(model.norm, join(path, "norm"), model, _unsupported) + _head(model, path)
    for _, layer in entries:
        layer.eval()  # the new layers (and the Chains inside SkipConnection / Multiply) too
    return entries


def _cplrp(chain):
    from ..presets import CPLRP
    return CPLRP()


#: The methods ``lrpkit evaluate`` runs by default on EVA. Chefer's transformer attribution reads the class
#: token's row, and EVA-02 pools the patch tokens by their mean (and rotates q and k), so it is not among them.
EVA_METHODS = ("lrp", "attnlrp", "rollout", "gradient-rollout", "attention-gradcam", "gradient", "input-x-gradient",
               "integrated-gradients", "smoothgrad")

try:
    from timm.models.eva import Eva
except ImportError:  # pragma: no cover - timm is a core dependency
    pass
else:
    register_family(Family("timm-eva", (Eva,), {Eva: canonize_eva}, composite=_cplrp, geometry=vit_geometry,
                           methods=EVA_METHODS))

