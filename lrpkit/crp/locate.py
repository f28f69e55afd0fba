"""Where a layer name points: the step of the canonized chain that a module path names, and the axis of its output
that holds the channels. One resolver for everything that takes ``layer=`` (:class:`lrpkit.CRP`, the
reference-sample scan, the ``lrpkit concepts`` command).

A name is a module path of the original model, as in ``model.named_modules()``. The canonized chain keeps these
paths (``Step.name``; :func:`lrpkit.canonize.core.join`), but not one step per module: a LayerNorm becomes two steps,
a timm block two residual connections named after its attention and its MLP, a BatchNorm fused into the layer before
it none. The output of module ``P`` is the output of the last step, in the order outputs are produced, among the
steps that lie in ``P``: a layer named ``P`` or ``P.<child>``, and a container only if everything in it lies in ``P``
too (the residual connection that the timm canonizer names ``blocks.0.mlp`` also holds ``blocks.0.norm2``, so the
output of the MLP ``blocks.0.mlp`` is that of ``blocks.0.mlp.fc2``, and the output of ``blocks.0`` that of the
residual connection, the residual stream).

Examples, on the chains of the families:

- ``"blocks.5.mlp.fc1"`` (timm ViT): the hidden neurons of the MLP; ``"blocks.5.mlp"``: the MLP's output (fc2),
  ``"blocks.5.attn"``: the attention's output (after ``proj``); ``"blocks.5"``: the residual stream after the block;
- ``"layer1.0"`` (ResNet): the block's output after its last ReLU;
- ``"features.28"`` (VGG): the convolution (with a BatchNorm fused in, if there was one).

A rule may have inner sites (``Rule.sites``): ``"<path>.<site>"`` names one, e.g. ``"blocks.5.attn.values"``, the
value outputs of the attention heads, ``y_h = A_h v_h`` merged over the heads (B, N, H·d), the input of the output
projection (:class:`lrpkit.rules.SelfAttentionRule`). An int is a step index, the ``index`` of ``LRP.table()``.

A module that canonization removed (a BatchNorm fused into the layer before it, Dropout, Identity) is an error
that names the layers that can be chosen.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from ..channels import channel_axis_after
from ..propagate import Step, enclosing

__all__ = ["LayerRef", "locate", "layer_names", "channel_axis"]

@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: the ``step`` whose output (or whose rule's inner ``site``) it is, and ``asked``, what the
    caller wrote. ``index`` (the rule table's index), ``name`` (the module path the table shows), ``path`` (the
    position in the chain, e.g. ``"5.inner.2"``) and ``layer`` (the canonized module) are the step's."""

    step: Step
    site: str | None = None
    asked: object = None

    @property
    def index(self) -> int:
        return self.step.index

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def path(self) -> str:
        return self.step.path

    @property
    def layer(self) -> nn.Module:
        return self.step.layer


def locate(lrp, layer) -> LayerRef:
    """The :class:`LayerRef` of ``layer`` in the analyzer ``lrp``: a module path of the original model (see the
    module docstring), ``"<path>.<site>"`` for a rule's inner site, or a step index as in ``lrp.table()``.
    ``ValueError`` for an unknown or removed name or an index out of range (naming what can be chosen),
    ``TypeError`` for anything else."""
    steps, every = lrp.steps, lrp.all_steps
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be a module path (str) or a rule-table index (int), got {type(layer).__name__}")
    if isinstance(layer, int):
        found = next((s for s in every if s.index == layer), None)
        if found is None:
            raise ValueError(f"layer index {layer} is out of range: the rule table has indices 0..{len(every) - 1} "
                             f"(print lrp.table())")
        return LayerRef(found, None, layer)
    inside = _lying_in(steps, layer) if layer else []
    if inside:
        return LayerRef(inside[-1], None, layer)
    path, _, site = layer.rpartition(".")
    owner = _lying_in(steps, path)[-1:] if path else []
    if owner and site in owner[0].rule.sites:
        return LayerRef(owner[0], site, layer)
    raise _unknown(every, layer)


def layer_names(every: list[Step]) -> list[str]:
    """The names ``layer=`` accepts, each once, in rule-table order: the module paths of the chain's layers and
    ``"<path>.<site>"`` for the rules' inner sites (besides these, any module that contains them and the rule-table
    indices)."""
    names = [s.name for s in every if s.name] + [f"{s.name}.{site}" for s in every if s.name for site in s.rule.sites]
    return list(dict.fromkeys(names))


def _unknown(every: list[Step], layer: str) -> ValueError:
    names = layer_names(every)
    like = difflib.get_close_matches(layer, names, n=3)
    hint = f" (did you mean {', '.join(map(repr, like))}?)" if like else ""
    shown = ", ".join(names[:60]) + (f", ... ({len(names) - 60} more)" if len(names) > 60 else "")
    return ValueError(
        f"no layer {layer!r} in the canonized model{hint}: either the model has no module of that name, or "
        f"canonization removed it (it fuses each BatchNorm into the layer before it and drops Dropout and "
        f"Identity). Layers that can be chosen: {shown}; or any module that contains them, or a rule-table index "
        f"(print lrp.table())")


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
    that holds its channels: 1 for (B, C, ...) feature maps, -1 for (B, N, C) tokens and channels-last maps,
    followed through the chain from the input by :func:`lrpkit.channels.channel_axis_after`."""
    axis = 1
    for chain, k in enclosing(steps, index):
        for step in chain[:k]:  # the layers before it in each chain around it (a container's contents end where
            axis = channel_axis_after(step.layer, axis)  # they began, so need not be followed)
    return chain[k].rule.sites[site] if site is not None else channel_axis_after(chain[k].layer, axis)
