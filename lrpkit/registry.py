"""Default rules per layer type, and the registry through which users add their own layer types.

Canonization accepts a layer only if some rule is registered for its type (or a parent type); composites start
from these defaults and override them. Register a custom layer with::

    lrpkit.register_rule(MyLayer, MyRule())
"""

from __future__ import annotations

from torch import nn

_DEFAULTS: dict[type, object] = {}


def register_rule(layer_type: type, rule) -> None:
    """Make ``rule`` the default rule of ``layer_type`` (and its subclasses without a registration of their own).

    After registration, :func:`lrpkit.canonize` accepts the type and every composite assigns ``rule`` to it unless
    a composite primitive maps another rule onto it.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_rule needs an nn.Module subclass, got {layer_type!r}")
    _DEFAULTS[layer_type] = rule


def default_rule(layer: nn.Module):
    """The registered default rule for ``layer``'s type (nearest class in the MRO), or None."""
    for cls in type(layer).__mro__:
        if cls in _DEFAULTS:
            return _DEFAULTS[cls]
    return None


def is_registered(layer: nn.Module) -> bool:
    """Whether a default rule is registered for ``layer``'s type (or a parent type): what canonization requires
    of every leaf layer."""
    return default_rule(layer) is not None
