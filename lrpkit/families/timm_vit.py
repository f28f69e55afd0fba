"""The ``timm-vit`` family: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` (ViT, DeiT, DeiT-3,
ViT+registers), canonized; default composite CP-LRP; geometry from ``patch_embed`` and the prefix tokens.

The chain (one entry per line)::

    Conv2d                        patch projection (patch_embed.proj)
    PositionalEmbedding           + patch positional embedding on the grid (resampled for dynamic_img_size)
    PatchFlatten                  (B, C, h, w) -> (B, h·w, C)
    ClassToken                    prepend class [, distillation] [, register] tokens (with their pos. embedding)
    LayerNormalize, Scale         norm_pre (pre_norm=True only)
    SkipConnection(Chain(LayerNormalize, Scale, SelfAttention [, Scale]))              per block: attention
    SkipConnection(Chain(LayerNormalize, Scale, Linear, act, Linear [, Scale]))        per block: MLP
    LayerNormalize, Scale         final norm (if any)
    SelectClassToken | TokenMean  timm's global_pool 'token' | 'avg', or for 'map' (attention pooling):
        AttentionPool             latent queries attend to the tokens (prefix tokens left out unless
                                  pool_include_prefix)
        Linear                    the pool's output projection
        SkipConnection(Chain(LayerNormalize, Scale, Linear, act, Linear))    the pool's residual MLP
        SelectClassToken | TokenMean                                       the pool's pool_type 'token' | 'avg'
    LayerNormalize, Scale         fc_norm (if any)
    Linear                        head

Adding the prefix tokens' positional embedding to the tokens themselves, and the patch embedding on the grid
before flattening, is the same sum as timm's ``cat(tokens, x) + pos_embed`` in another order, and it handles
``no_embed_class`` and ``dynamic_img_size`` uniformly. The distilled model's eval-mode head
``(head(x_cls) + head_dist(x_dist)) / 2`` becomes ``Sum(Chain(SelectClassToken(0), head/2),
Chain(SelectClassToken(1), head_dist/2))`` (a headless model, ``num_classes=0``, gets ``Scale(1/2)`` in place of the
heads); the canonized model computes the eval-mode output even if the user set ``distilled_training=True``
(timm returns the two heads' logits separately only in training mode). timm's distilled model ignores
``reg_token`` in its forward pass, and so does its canonization. ``global_pool='avg'`` with
``pool_include_prefix=True`` is a :class:`~lrpkit.layers.TokenMean` over all tokens.

Supported exactly: timm's ``PatchEmbed`` (Conv2d projection, no norm, no dynamic padding), ``Block`` with
``Attention`` (qk-norm allowed, no ``scale_attn_norm``, no gate) and ``Mlp`` (``scale_mlp_norm`` allowed), LayerNorm
norms, ``LayerScale``, ``global_pool`` 'token' / 'avg' / 'map'. For 'map' (SigLIP): timm's ``AttentionPoolLatent``
with any ``latent_len``, ``q_proj`` on or off, LayerNorm qk-norms or none, its MLP and norm (or none, for
``out_features=0``), ``pool_type`` 'token' or 'avg', fused attention or not. Anything else (attention pooling 'prr',
a positional embedding inside the pool, a pool without pool_type, 'max' / 'avgmax' / '' pooling, other block,
attention, MLP, norm or embedding types, a patch-embedding norm, dynamic padding, a subclass that overrides the
forward methods, ...) is a :class:`~lrpkit.canonize.CanonizationError`, never a silently different model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import (AttentionPool, Chain, ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Scale,
                      SelectClassToken, SelfAttention, SkipConnection, Sum, TokenMean)
from ..canonize.core import CanonizationError, copy_layer, flatten, join, make_chain, overridden
from . import Family, Geometry, preset_composite, register_family

# the methods of VisionTransformer that make up its forward pass: a subclass that overrides one of them computes
# something this canonizer does not know
_FORWARD_METHODS = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")


def _unsupported(model, what: str):
    return CanonizationError(f"lrpkit cannot canonize this {type(model).__name__}: {what} is not supported. "
                             f"Supported: timm Block/Attention/Mlp, global_pool 'token', 'avg' or 'map' "
                             f"(AttentionPoolLatent), LayerNorm norms.")


def _is_identity(m) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout))


def _norm(norm: nn.Module, path: str, model, unsupported=_unsupported) -> list:
    """LayerNorm -> LayerNormalize + Scale (affine part); Identity -> nothing. ``unsupported(model, what)``: the
    error for anything else (another family passes its own)."""
    if _is_identity(norm):
        return []
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise unsupported(model, f"the norm layer {path} ({type(norm).__name__})")
    entries = [(path, LayerNormalize(norm.eps))]
    if norm.weight is not None or norm.bias is not None:
        weight = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape)
        entries.append((path, Scale(weight, norm.bias)))
    return entries


def _layer_scale(ls: nn.Module, path: str, model) -> list:
    if _is_identity(ls):
        return []
    if not hasattr(ls, "gamma"):
        raise _unsupported(model, f"the layer-scale module {path} ({type(ls).__name__})")
    return [(path, Scale(ls.gamma))]


def _attention(attn: nn.Module, path: str, model) -> SelfAttention:
    from timm.layers import Attention

    if type(attn) is not Attention:
        raise _unsupported(model, f"the attention layer {path} ({type(attn).__name__})")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(model, f"gated attention ({path})")
    if not _is_identity(getattr(attn, "norm", None)):
        raise _unsupported(model, f"scale_attn_norm ({path}.norm)")
    return SelfAttention(copy_layer(attn.qkv), copy_layer(attn.proj), attn.num_heads, attn.scale,
                         q_norm=copy_layer(attn.q_norm), k_norm=copy_layer(attn.k_norm))


def _mlp(mlp: nn.Module, path: str, model) -> list:
    from timm.layers import Mlp

    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise _unsupported(model, f"the MLP {path} ({type(mlp).__name__})")
    return ([(join(path, "fc1"), copy_layer(mlp.fc1)), (join(path, "act"), copy_layer(mlp.act))]
            + _norm(mlp.norm, join(path, "norm"), model) + [(join(path, "fc2"), copy_layer(mlp.fc2))])


def _block(block: nn.Module, path: str, model) -> list:
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        raise _unsupported(model, f"the block type {type(block).__name__} ({path})")
    attn = (_norm(block.norm1, join(path, "norm1"), model)
            + [(join(path, "attn"), _attention(block.attn, join(path, "attn"), model))]
            + _layer_scale(block.ls1, join(path, "ls1"), model))
    mlp = (_norm(block.norm2, join(path, "norm2"), model) + _mlp(block.mlp, join(path, "mlp"), model)
           + _layer_scale(block.ls2, join(path, "ls2"), model))
    return [(join(path, "attn"), SkipConnection(make_chain(attn))),
            (join(path, "mlp"), SkipConnection(make_chain(mlp)))]


def _is_distilled(model) -> bool:
    from timm.models.deit import VisionTransformerDistilled

    return isinstance(model, VisionTransformerDistilled)


def _check_type(model) -> None:
    """Refuse subclasses that change the forward pass of the class they derive from."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    base = VisionTransformerDistilled if _is_distilled(model) else VisionTransformer
    name = overridden(model, base, _FORWARD_METHODS)
    if name is not None:
        raise _unsupported(model, f"a subclass of {base.__name__} that overrides {name}()")


def _prefix_tokens(model) -> tuple[list[torch.Tensor], list[str]]:
    """The prefix tokens in timm's order: class, distillation (DeiT), registers."""
    tokens, kinds = [], []
    distilled = _is_distilled(model)
    if distilled and getattr(model, "cls_token", None) is None:
        raise _unsupported(model, "a distilled model without a class token (class_token=False)")
    if getattr(model, "cls_token", None) is not None:
        tokens.append(model.cls_token.detach())
        kinds.append("class")
    if distilled:
        tokens.append(model.dist_token.detach())
        kinds.append("distillation")
    elif getattr(model, "reg_token", None) is not None:  # timm's distilled model ignores reg_token
        tokens.append(model.reg_token.detach())
        kinds += ["register"] * model.reg_token.shape[1]
    return tokens, kinds


def _embedding(model, path: str, unsupported=_unsupported) -> list:
    """Patch projection, positional embedding, flatten and prefix tokens of a model with timm's ``patch_embed``,
    ``cls_token`` / ``reg_token``, ``pos_embed``, ``no_embed_class`` and ``dynamic_img_size`` (ViT, and EVA,
    whose family passes its own error ``unsupported(model, what)``)."""
    from timm.layers import PatchEmbed

    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        raise unsupported(model, f"the patch embedding {type(pe).__name__} (only timm's PatchEmbed with a Conv2d "
                                 f"projection)")
    if not _is_identity(getattr(pe, "norm", None)):
        raise unsupported(model, "a norm inside the patch embedding (embed norm)")
    if getattr(pe, "dynamic_img_pad", False):
        raise unsupported(model, "dynamic_img_pad")
    entries = [(join(path, "patch_embed.proj"), copy_layer(pe.proj))]
    tokens, kinds = _prefix_tokens(model)
    n_prefix = len(kinds)
    pos = getattr(model, "pos_embed", None)
    if pos is not None:
        pos = pos.detach()
        grid = tuple(pe.grid_size)
        n_pos_prefix = 0 if getattr(model, "no_embed_class", False) else n_prefix
        if pos.shape[1] != n_pos_prefix + grid[0] * grid[1]:
            raise unsupported(model, f"a pos_embed of {pos.shape[1]} entries for {n_pos_prefix} prefix tokens and a "
                                     f"{grid[0]}x{grid[1]} patch grid")
        patch_pos = pos[:, n_pos_prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        dynamic = getattr(model, "dynamic_img_size", False)  # (BEiT, which shares this embedding, has neither)
        entries.append((join(path, "pos_embed"), PositionalEmbedding(patch_pos, dynamic=dynamic)))
        if n_pos_prefix:
            tokens = [torch.cat(tokens, dim=1) + pos[:, :n_pos_prefix]]
    entries.append((join(path, "patch_embed"), PatchFlatten()))
    if tokens:
        entries.append((join(path, "cls_token"), ClassToken(torch.cat(tokens, dim=1), kinds)))
    return entries


def _half(head: nn.Module, name: str, model) -> nn.Module:
    """``head(x) / 2`` as one layer: a halved copy of a Linear head, ``Scale(1/2)`` for an Identity head."""
    if isinstance(head, nn.Linear):
        head = copy_layer(head)
        head.weight.data.mul_(0.5)
        if head.bias is not None:
            head.bias.data.mul_(0.5)
        return head
    if _is_identity(head):
        return Scale(torch.full((model.embed_dim,), 0.5, dtype=model.cls_token.dtype, device=model.cls_token.device))
    raise _unsupported(model, f"the distilled model's {name} ({type(head).__name__}; only Linear or Identity)")


def _head(model, path: str) -> list:
    if _is_distilled(model):
        branches = []
        for index, name in ((0, "head"), (1, "head_dist")):
            head = _half(getattr(model, name), name, model)
            branches.append(Chain([SelectClassToken(index), head], [join(path, "pool"), join(path, name)]))
        return [(join(path, "head"), Sum(*branches))]
    if model.global_pool == "map" and getattr(model, "attn_pool", None) is not None:
        entries = _attention_pool(model, join(path, "attn_pool"))
    elif getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise _unsupported(model, f"global_pool={model.global_pool!r}")
    elif model.global_pool == "token":
        entries = [(join(path, "pool"), SelectClassToken(0))]
    else:
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        entries = [(join(path, "pool"), TokenMean(start))]
    entries += _norm(model.fc_norm, join(path, "fc_norm"), model)
    if not _is_identity(model.head):
        entries += flatten(model.head, join(path, "head"))
    return entries


def _qk_norm(norm: nn.Module, path: str, model) -> nn.Module | None:
    """A qk-norm of the attention pool: Identity (None) or a LayerNorm over the head dimension, copied."""
    if _is_identity(norm):
        return None
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise _unsupported(model, f"the attention pool's qk-norm {path} ({type(norm).__name__}; only LayerNorm)")
    return copy_layer(norm)


def _attention_pool(model, path: str) -> list:
    """timm's ``AttentionPoolLatent`` (``global_pool='map'``): AttentionPool, its output projection, the residual
    MLP ``x + mlp(norm(x))``, and the latent the head reads ('token': the first; 'avg': their mean)."""
    from timm.layers import AttentionPoolLatent

    pool = model.attn_pool
    if type(pool) is not AttentionPoolLatent:
        raise _unsupported(model, f"the attention pool {type(pool).__name__} (only timm's AttentionPoolLatent)")
    if getattr(pool, "pos_embed", None) is not None:
        raise _unsupported(model, "a positional embedding inside the attention pool (AttentionPoolLatent "
                                  "pos_embed='abs')")
    if pool.pool not in ("token", "avg"):
        raise _unsupported(model, f"the attention pool's pool_type={pool.pool!r} (only 'token' or 'avg'; "
                                  f"without it the head gets one vector per latent)")
    if not isinstance(pool.kv, nn.Linear) or not (_is_identity(pool.q) or isinstance(pool.q, nn.Linear)):
        raise _unsupported(model, f"the attention pool's projections ({path}.q, {path}.kv; only Linear)")
    q = nn.Identity() if _is_identity(pool.q) else copy_layer(pool.q)
    start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    attend = AttentionPool(pool.latent, q, copy_layer(pool.kv), pool.num_heads, pool.scale,
                           q_norm=_qk_norm(pool.q_norm, join(path, "q_norm"), model),
                           k_norm=_qk_norm(pool.k_norm, join(path, "k_norm"), model), start=start)
    entries = [(path, attend)]
    if not _is_identity(pool.proj):
        if not isinstance(pool.proj, nn.Linear):
            raise _unsupported(model, f"the attention pool's output projection ({type(pool.proj).__name__})")
        entries.append((join(path, "proj"), copy_layer(pool.proj)))
    if pool.mlp is not None:
        mlp = _norm(pool.norm, join(path, "norm"), model) + _mlp(pool.mlp, join(path, "mlp"), model)
        entries.append((join(path, "mlp"), SkipConnection(make_chain(mlp))))
    elif not _is_identity(pool.norm):
        raise _unsupported(model, "an attention pool with a norm but no MLP")
    latent = SelectClassToken(0) if pool.pool == "token" else TokenMean(0)
    return entries + [(join(path, "pool"), latent)]


def canonize_vit(model, path: str = "") -> list:
    """The flat chain of a timm VisionTransformer (see the module docstring)."""
    _check_type(model)
    entries = _embedding(model, path) + _norm(model.norm_pre, join(path, "norm_pre"), model)
    for i, block in enumerate(model.blocks):
        entries += _block(block, join(path, f"blocks.{i}"), model)
    entries += _norm(model.norm, join(path, "norm"), model) + _head(model, path)
    for _, layer in entries:
        layer.eval()  # the new layers (and the Chains inside SkipConnection / Sum) too, not only the copies
    return entries


def vit_geometry(model, chain=None) -> Geometry:
    """timm's ``patch_embed.patch_size`` and the prefix tokens that the canonized chain prepends (class,
    distillation or register tokens, in timm's order)."""
    size = model.patch_embed.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return Geometry(size, len(_prefix_tokens(model)[1]), global_attention=True)


#: The methods ``lrpkit evaluate`` runs by default on a vision transformer.
VIT_METHODS = ("lrp", "attnlrp", "transformer-attribution", "rollout", "gradient-rollout", "attention-gradcam",
               "gradient", "input-x-gradient", "integrated-gradients", "smoothgrad")

try:
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # timm is a core dependency, but canonization of other models works without it
    pass
else:
    register_family(Family("timm-vit", (VisionTransformer,), {VisionTransformer: canonize_vit},
                           composite=preset_composite("CPLRP"), geometry=vit_geometry, methods=VIT_METHODS))
