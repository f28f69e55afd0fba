"""Composites: which rule lands on which layer.

A :class:`Composite` starts from the registered default rule of every layer (:mod:`lrpkit.registry`) and applies
its primitives in order; when several primitives match a layer, the last one listed wins. Layers are numbered
depth-first over the canonized chain (containers before their contents), as the rule table shows.

Primitives (named as in RelevancePropagation.jl):

- ``GlobalMap(rule)``: every layer in ``rule.targets`` (e.g. Linear/Conv/pooling for the basic rules);
- ``GlobalTypeMap({type: rule})``: every layer of a type;
- ``FirstLayerMap(rule)``: the first layer (the input layer) among ``rule.targets``; ``FirstLayerTypeMap({type:
  rule})``: the first layer of one of the types (a leading ``Flatten`` is skipped, as in zennit's first-layer map);
- ``LastLayerMap(rule)`` / ``LastLayerTypeMap({type: rule})``: the same for the last layer (the output layer);
- ``RangeMap(range, rule)`` / ``RangeTypeMap(range, {type: rule})``: layers whose index lies in ``range``;
- ``NameMap({name: rule})``: layers whose module path in the original model matches ``name`` (``fnmatch``
  patterns such as ``"blocks.*.mlp.fc1"`` allowed).

Type and name maps are explicit: a rule that cannot handle a layer they select is an error. ``GlobalMap`` and
``RangeMap`` select only the layers in the rule's ``targets``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .layers import Chain, SkipConnection
from .registry import default_rule
from .rules.base import IncompatibleRuleError
from .walk import Visit, walk


@dataclass
class LayerSlot:
    """One layer of the chain as the composites see it: where the walk met it (:class:`lrpkit.walk.Visit`) and
    the rule assigned so far."""

    visit: Visit
    rule: object = None

    index = property(lambda self: self.visit.index)
    path = property(lambda self: self.visit.path)  # position in the chain, e.g. "5.inner.2"
    name = property(lambda self: self.visit.name)  # module path in the original model
    layer = property(lambda self: self.visit.layer)
    is_container = property(lambda self: self.visit.is_container)


def layer_slots(chain: Chain) -> list[LayerSlot]:
    """All layers of ``chain`` depth-first (containers before their contents), with their default rules."""
    return [LayerSlot(v, default_rule(v.layer)) for v in walk(chain)]


def _assign(slot: LayerSlot, rule, source: str) -> None:
    try:
        rule.check(slot.layer)
    except IncompatibleRuleError as err:
        raise IncompatibleRuleError(f"{source} maps {err} — at layer {slot.index} ({slot.name or slot.path})") \
            from None
    slot.rule = rule


def _leaves(slots):
    return [s for s in slots if not s.is_container]


class GlobalMap:
    """Apply ``rule`` to every layer whose type is in ``rule.targets``."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        for s in slots:
            if isinstance(s.layer, self.rule.targets):
                s.rule = self.rule


class GlobalTypeMap:
    """Apply ``{type: rule}`` to every layer that is an instance of the type."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)

    def _match(self, s):
        for layer_type, rule in self.mapping.items():
            if isinstance(s.layer, layer_type):
                _assign(s, rule, type(self).__name__)

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        for s in slots:
            self._match(s)


def _end_layers(slots, matches, last: bool) -> list:
    """The first (or last) leaf layer for which ``matches(layer)`` holds. If it sits in a branch of a container
    whose branches run side by side (a ``Sum``, e.g. the two heads of a distilled DeiT, or a ``Multiply``; not the
    inner chain of a ``SkipConnection``), the first (last) such layer of every branch of the innermost one."""
    candidates = [s for s in _leaves(slots) if matches(s.layer)]
    if not candidates:
        return []
    end = candidates[-1] if last else candidates[0]
    by_index = {s.index: s for s in slots}
    split = next((c for c in _enclosing(end, by_index) if not isinstance(c.layer, SkipConnection)), None)
    if split is None:
        return [end]
    ends: dict = {}
    for s in candidates:
        branch = next((inner.visit.branch for inner in (s, *_enclosing(s, by_index))
                       if inner.visit.parent == split.index), None)
        if branch is not None and (last or branch not in ends):
            ends[branch] = s
    return list(ends.values())


def _enclosing(slot, by_index):
    """The containers around ``slot``, innermost first (the walk's ``parent`` links)."""
    while slot.visit.parent is not None:
        slot = by_index[slot.visit.parent]
        yield slot


class FirstLayerMap:
    """Apply ``rule`` to the first (input) layer: the first leaf layer whose type is in ``rule.targets``, so that a
    leading ``Flatten`` is skipped as in zennit's first-layer map (for a rule without ``targets``: the first leaf).
    Like the other primitives it selects nothing in a chain without such a layer."""

    last = False

    def __init__(self, rule):
        self.rule = rule

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        targets = getattr(self.rule, "targets", ())
        for slot in _end_layers(slots, lambda layer: not targets or isinstance(layer, targets), self.last):
            _assign(slot, self.rule, type(self).__name__)


class LastLayerMap(FirstLayerMap):
    """Apply ``rule`` to the last (output) layer: the last leaf layer whose type is in ``rule.targets`` (for a rule
    without ``targets``: the last leaf)."""

    last = True


class FirstLayerTypeMap(GlobalTypeMap):
    """Apply ``{type: rule}`` to the first leaf layer that is an instance of one of the types (zennit's
    ``first_map``): ``FirstLayerTypeMap({nn.Conv2d: ZBoxRule(0, 1)})`` maps the first convolution."""

    last = False

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        types = tuple(t for key in self.mapping for t in (key if isinstance(key, tuple) else (key,)))
        for slot in _end_layers(slots, lambda layer: isinstance(layer, types), self.last):
            self._match(slot)


class LastLayerTypeMap(FirstLayerTypeMap):
    """Apply ``{type: rule}`` to the last leaf layer that is an instance of one of the types."""

    last = True


class RangeMap:
    """Apply ``rule`` to the layers with index in ``range`` whose type is in ``rule.targets``."""

    def __init__(self, index_range: range, rule):
        self.range, self.rule = index_range, rule

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        GlobalMap(self.rule).apply([s for s in slots if s.index in self.range])


class RangeTypeMap(GlobalTypeMap):
    """Apply ``{type: rule}`` to the layers with index in ``range`` that are instances of the type."""

    def __init__(self, index_range: range, mapping: dict):
        super().__init__(mapping)
        self.range = index_range

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        super().apply([s for s in slots if s.index in self.range])


class NameMap:
    """Apply ``{name: rule}`` to the layers whose module path in the original model matches ``name``
    (``fnmatch`` pattern). A LayerNorm's name covers both its LayerNormalize and Scale parts: the rule lands on
    those it can handle; it is an error if it can handle none, or if no layer matches."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)

    def apply(self, slots):
        """Set the rule of the slots this primitive selects (``slots``: :func:`layer_slots` of a chain)."""
        for pattern, rule in self.mapping.items():
            matched = [s for s in slots if fnmatch.fnmatchcase(s.name, pattern)]
            if not matched:
                raise KeyError(f"NameMap: no layer is named {pattern!r}; print the rule table to see the names")
            usable = [s for s in matched if rule.accepts(s.layer)]
            if not usable:
                _assign(matched[0], rule, "NameMap")  # raises the incompatibility error
            for s in usable:
                s.rule = rule


class Composite:
    """An ordered list of primitives; ``Composite(p1, p2, ...)``. Later primitives win."""

    def __init__(self, *primitives):
        for p in primitives:
            if not hasattr(p, "apply"):
                raise TypeError(f"Composite takes composite primitives (GlobalMap, ...), got {p!r}")
        self.primitives = list(primitives)

    def assign(self, chain: Chain) -> list[LayerSlot]:
        """The layers of ``chain`` with the rule each gets."""
        slots = layer_slots(chain)
        for p in self.primitives:
            p.apply(slots)
        missing = [s for s in slots if s.rule is None]
        if missing:
            raise IncompatibleRuleError("no rule for: " + ", ".join(
                f"{s.index} {s.name} ({type(s.layer).__name__})" for s in missing))
        return slots

    def table(self, chain: Chain) -> str:
        """A readable table: index, path in the chain, module name, layer, rule."""
        return format_table(self.assign(chain))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.primitives))})"


def format_table(slots: list[LayerSlot]) -> str:
    """The rule table of assigned slots: one row per layer with index, path, name, layer (indented by nesting
    depth) and rule."""
    rows = [("index", "path", "name", "layer", "rule")]
    for s in slots:
        layer = "  " * s.visit.depth + (type(s.layer).__name__ if s.is_container else _short(s.layer))
        rows.append((str(s.index), s.path, s.name, layer, repr(s.rule)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def _short(layer: nn.Module) -> str:
    """``Type(extra_repr)`` on one line (a layer with submodules, as SelfAttention, prints over several lines),
    cut at 60 characters."""
    text = f"{type(layer).__name__}({layer.extra_repr()})".replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
