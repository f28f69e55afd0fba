"""Where CRP's concepts live: the step of the canonized chain that a layer name points to, and the axis of its
output that holds the channels.

A name is a module path of the original model, as in ``model.named_modules()``. The canonized chain keeps these
paths (``Step.name``; :func:`lrpkit.canonize.core.join`), but not one step per module: a LayerNorm becomes two steps,
a timm block two residual connections named after its attention and its MLP, a BatchNorm fused into the layer before
it none. The output of module ``P`` is the output of the last step, in the order outputs are produced, among the
steps that lie in ``P``: a layer named ``P`` or ``P.<child>``, and a container only if everything in it lies in ``P``
too (the residual connection that the timm canonizer names ``blocks.0.mlp`` also holds ``blocks.0.norm2``, so the
output of the MLP ``blocks.0.mlp`` is that of ``blocks.0.mlp.fc2``, and the output of ``blocks.0`` that of the
residual connection, the residual stream).

A rule may have inner sites (``Rule.sites``): ``"<path>.<site>"`` names one, e.g. ``"blocks.5.attn.values"``, the
value outputs of the attention heads, ``y_h = A_h v_h`` merged over the heads (B, N, H·d), the input of the output
projection (:class:`lrpkit.rules.SelfAttentionRule`).
"""

from __future__ import annotations

from torch import nn

from ..layers import (GlobalResponseNormalize, LayerNormalize, PatchFlatten, Permute, Scale, SelectClassToken,
                      SelfAttention, TokenMean)
from ..propagate import Step, enclosing

#: layers whose output holds the channels in dim 1: (B, C, ...)
CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Flatten)
#: layers whose output holds the channels in the last dim: (B, N, C) tokens, (B, H, W, C) channels-last maps
CHANNELS_LAST = (nn.Linear, PatchFlatten, SelfAttention, SelectClassToken, TokenMean)


def locate(steps: list[Step], every: list[Step], layer) -> tuple[Step, str | None]:
    """``(step, site)``: the step whose output is the output of ``layer`` (a module path of the original model, see
    the module docstring, or a step index as in ``LRP.table()``), or, for ``"<path>.<site>"``, the step at
    ``<path>`` whose rule has that inner site (``Rule.sites``: ``"blocks.5.attn.values"``, the heads' value outputs);
    ValueError naming the layers that can be chosen."""
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be a module path (str) or a layer index (int), got {type(layer).__name__}")
    if isinstance(layer, int):
        found = next((s for s in every if s.index == layer), None)
        if found is None:
            raise ValueError(f"layer index {layer} out of range: the canonized model has layers 0..{len(every) - 1} "
                             f"(see LRP(model).table())")
        return found, None
    inside = _lying_in(steps, layer)
    if inside:
        return inside[-1], None
    path, _, site = layer.rpartition(".")
    owner = _lying_in(steps, path)[-1:] if path else []
    if owner and site in owner[0].rule.sites:
        return owner[0], site
    names = ", ".join(dict.fromkeys([s.name for s in every if s.name] +
                                    [f"{s.name}.{site}" for s in every if s.name for site in s.rule.sites]))
    raise ValueError(f"layer {layer!r} is not in the canonized model: either the model has no module of that "
                     f"name, or canonization removed it (a BatchNorm fused into the layer before it, a Dropout or "
                     f"Identity dropped). Layers that can be chosen: {names}; or a layer index of "
                     f"LRP(model).table()")


def _lying_in(steps: list[Step], path: str) -> list[Step]:
    """The steps that lie in module ``path``, in the order their outputs are produced (post-order)."""
    def within(name: str) -> bool:
        return name == path or name.startswith(path + ".")

    found = []

    def visit(chain: list[Step]) -> bool:  # whether everything in ``chain`` lies in the module
        every_inside = True
        for step in chain:
            contents_inside = all([visit(branch) for branch in step.children])  # visit every branch
            inside = within(step.name) and contents_inside
            if inside:
                found.append(step)
            every_inside &= inside
        return every_inside

    visit(steps)
    return found


def channel_axis(steps: list[Step], index: int, site: str | None = None) -> int:
    """The axis of the output of layer ``index`` (or of its rule's inner site ``site``, as the rule declares it)
    that holds its channels: 1 for (B, C, ...) feature maps, -1 for (B, N, C) tokens and channels-last maps.
    Followed through the chain from the input (channels in dim 1): a convolution, BatchNorm or Flatten puts them in
    dim 1; a Linear, an attention layer, the patch flattening or a token pooling last; a Permute where it moves them;
    LayerNormalize, Scale and GlobalResponseNormalize where they work; everything else, a container included, keeps
    the layout of its input."""
    axis = 1
    for chain, k in enclosing(steps, index):
        for step in chain[:k]:  # the layers before it in each chain around it (a container's contents end where
            axis = _after(step.layer, axis)  # they began, so need not be followed)
    return chain[k].rule.sites[site] if site is not None else _after(chain[k].layer, axis)


def _after(layer: nn.Module, axis: int) -> int:
    """The channel axis of ``layer``'s output, given that of its input."""
    if isinstance(layer, CHANNELS_FIRST):
        return 1
    if isinstance(layer, CHANNELS_LAST):
        return -1
    if isinstance(layer, (LayerNormalize, Scale)):
        return layer.dim
    if isinstance(layer, GlobalResponseNormalize):
        return layer.channel_dim
    if isinstance(layer, Permute):
        n = len(layer.dims)
        moved = layer.dims.index(axis % n)
        return -1 if moved == n - 1 else moved
    return axis
