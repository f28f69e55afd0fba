"""The ``timm-beit`` family: timm's ``Beit`` (BEiT and BEiT v2: ``beit_base_patch16_224``, ``beitv2_*``, ...),
canonized; default composite CP-LRP; geometry as a ViT's (patch size from ``patch_embed``, one prefix token, the
class token; global attention).

The chain (one entry per line)::

    Conv2d                        patch projection (patch_embed.proj)
    PositionalEmbedding           + patch positional embedding on the grid (use_abs_pos_emb=True only)
    PatchFlatten                  (B, C, h, w) -> (B, h·w, C)
    ClassToken                    prepend the class token (with its positional embedding)
    SkipConnection(Chain(LayerNormalize, Scale, SelfAttention [, Scale]))              per block: attention
    SkipConnection(Chain(LayerNormalize, Scale, Linear, act, [LayerNormalize, Scale,] Linear [, Scale]))   MLP
    LayerNormalize, Scale         final norm (use_fc_norm=False only)
    TokenMean(1) | SelectClassToken(0)   global_pool 'avg' (the patch tokens) | 'token'
    LayerNormalize, Scale         fc_norm (use_fc_norm, the default with 'avg')
    Linear                        head

What BEiT adds to a ViT, and what it becomes:

- the relative position bias of each block's attention (``use_rel_pos_bias``): timm's ``_get_rel_pos_bias()``, the
  table gathered at the relative position index, (1, heads, N, N), is a constant of the canonized model, the score
  bias ``B`` of :class:`~lrpkit.layers.SelfAttention` (``S = q kᵀ·scale + B``). The table is laid out for one
  patch grid, so the canonized model takes that image size only (another size is a clear ValueError);
- the q/v-only bias: timm's ``qkv`` Linear has no bias and adds ``cat(q_bias, k_bias, v_bias)`` (``k_bias`` a zero
  buffer) — folded into one Linear with that bias, the same affine map (``qkv_bias_separate`` too);
- layer scale ``gamma_1`` / ``gamma_2`` (``init_values``): a :class:`~lrpkit.layers.Scale` after each branch;
- the class token and the optional absolute positional embedding, as in the ViT (shared with
  :mod:`lrpkit.families.timm_vit`).

Not supported, each a :class:`~lrpkit.canonize.CanonizationError` naming it: the shared relative position bias
(``use_shared_rel_pos_bias``, used by none of timm's named BEiT models), the SwiGLU MLP (``swiglu_mlp``),
``global_pool=''`` (per-token logits), other block, attention, MLP, norm or embedding types, and subclasses that
override the forward methods.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonize.core import CanonizationError, copy_layer, flatten, join, make_chain, overridden
from ..layers import Scale, SelectClassToken, SelfAttention, SkipConnection, TokenMean
from . import Family, register_family
from .timm_vit import VIT_METHODS, _embedding, _is_identity, _mlp, _norm, vit_geometry

_FORWARD_METHODS = ("forward", "forward_features", "forward_head")


def _unsupported(model, what: str, fix: str = "") -> CanonizationError:
    return CanonizationError(f"lrpkit cannot canonize this {type(model).__name__}: {what} is not supported"
                             f"{'; ' + fix if fix else ''}. Supported: timm's Beit with its Block, Attention (with "
                             f"or without a relative position bias per block) and Mlp, global_pool 'avg' or "
                             f"'token', LayerNorm norms.")


def _check_model(model) -> None:
    from timm.models.beit import Beit

    name = overridden(model, Beit, _FORWARD_METHODS)
    if name is not None:
        raise _unsupported(model, f"a subclass of Beit that overrides {name}()")
    if getattr(model, "rel_pos_bias", None) is not None:
        raise _unsupported(model, "the shared relative position bias (use_shared_rel_pos_bias=True)",
                           "none of timm's named BEiT models uses it; use a relative position bias per block "
                           "(use_rel_pos_bias=True)")
    if model.global_pool not in ("avg", "token"):
        raise _unsupported(model, f"global_pool={model.global_pool!r} (logits per token)",
                           "use global_pool='avg' or 'token'")


def _qkv(attn: nn.Module) -> nn.Linear:
    """timm BEiT's qkv projection with its bias folded in: ``x W + cat(q_bias, k_bias, v_bias)`` (``k_bias`` is a
    zero buffer), one Linear."""
    qkv = copy_layer(attn.qkv)
    if attn.q_bias is None:
        return qkv
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone()
    if qkv.bias is not None:  # timm's BEiT never has one; a user-made model might
        bias = bias + qkv.bias.detach()
    qkv.bias = nn.Parameter(bias, requires_grad=False)
    return qkv


def _attention(attn: nn.Module, path: str, model) -> SelfAttention:
    from timm.models.beit import Attention

    if type(attn) is not Attention:
        raise _unsupported(model, f"the attention layer {path} ({type(attn).__name__})")
    bias = None
    if attn.relative_position_bias_table is not None:
        with torch.no_grad():
            bias = attn._get_rel_pos_bias().detach().clone()  # (1, heads, N, N): the table at the relative index
    return SelfAttention(_qkv(attn), copy_layer(attn.proj), attn.num_heads, attn.scale, bias=bias)


def _gamma(gamma: torch.Tensor | None, path: str) -> list:
    return [] if gamma is None else [(path, Scale(gamma))]


def _block(block: nn.Module, path: str, model) -> list:
    from timm.layers import Mlp
    from timm.models.beit import Block

    if type(block) is not Block:
        raise _unsupported(model, f"the block type {type(block).__name__} ({path})")
    if type(block.mlp) is not Mlp:
        raise _unsupported(model, f"the MLP {join(path, 'mlp')} ({type(block.mlp).__name__}; swiglu_mlp=True)",
                           "the SwiGLU MLP is canonized for EVA-02, not yet for BEiT")
    attn = (_norm(block.norm1, join(path, "norm1"), model)
            + [(join(path, "attn"), _attention(block.attn, join(path, "attn"), model))]
            + _gamma(block.gamma_1, join(path, "gamma_1")))
    mlp = (_norm(block.norm2, join(path, "norm2"), model) + _mlp(block.mlp, join(path, "mlp"), model)
           + _gamma(block.gamma_2, join(path, "gamma_2")))
    return [(join(path, "attn"), SkipConnection(make_chain(attn))),
            (join(path, "mlp"), SkipConnection(make_chain(mlp)))]


def _head(model, path: str) -> list:
    """timm's ``forward_head``: the mean of the patch tokens (the class token left out) or the class token, then
    ``fc_norm`` and the head."""
    pool = TokenMean(model.num_prefix_tokens) if model.global_pool == "avg" else SelectClassToken(0)
    entries = [(join(path, "pool"), pool)] + _norm(model.fc_norm, join(path, "fc_norm"), model)
    if not _is_identity(model.head):
        entries += flatten(model.head, join(path, "head"))
    return entries


def canonize_beit(model, path: str = "") -> list:
    """The flat chain of a timm Beit (see the module docstring)."""
    _check_model(model)
    entries = _embedding(model, path)
    for i, block in enumerate(model.blocks):
        entries += _block(block, join(path, f"blocks.{i}"), model)
    entries += _norm(model.norm, join(path, "norm"), model) + _head(model, path)
    for _, layer in entries:
        layer.eval()
    return entries


def _cplrp(chain):
    from ..presets import CPLRP
    return CPLRP()


try:
    from timm.models.beit import Beit
except ImportError:  # timm is a core dependency, but canonization of other models works without it
    pass
else:
    register_family(Family("timm-beit", (Beit,), {Beit: canonize_beit}, composite=_cplrp, geometry=vit_geometry,
                           methods=VIT_METHODS))
