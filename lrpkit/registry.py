"""Default rules and canonizers per layer type, and the scopes in which users add their own.

Canonization accepts a leaf layer only if some rule is registered for its type (or a parent type), and hands a
module to the canonizer registered for its type; composites start from the registered rules and override them.

A :class:`Registry` holds rules and canonizers by type, and model families (:class:`lrpkit.families.Family`).
Registrations apply where they are made:

- in a block: ``with lrpkit.registered(rules={MyLayer: MyRule()}):`` (or ``with registry:``); blocks nest, and
  leaving one restores what was active before, also on an exception;
- process-wide: :func:`register_rule` and :func:`register_canonizer` outside any block add to :data:`GLOBAL`,
  which also holds lrpkit's built-in defaults;
- for one analyzer: :func:`scope` holds a registry around the analyzer's canonization and rule assignment.

A lookup reads the active registries as one: the nearest class in the type's MRO wins, and for the same class the
innermost registration wins (a block overrides what it registers, and only that). The active blocks are held in a
:class:`contextvars.ContextVar`: a block is seen by the thread or asyncio task that opened it (and by tasks that
task creates), not by other threads.
"""

from __future__ import annotations

import contextlib
import contextvars
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

from torch import nn

# a canonizer maps (module, path) to a list of (name, layer) entries of the flat chain
Canonizer = Callable[[nn.Module, str], list]


class Registry:
    """Default rules and canonizers by type: ``Registry(rules={MyLayer: MyRule()}, canonizers={MyBlock: fn})``, or
    built up with :meth:`rule` and :meth:`canonizer`, which return the registry so calls chain.

    A registry changes nothing until it is active: ``with registry:`` (over whatever is active already), or passed
    to an analyzer. It can be entered again and by several threads at once.
    """

    def __init__(self, rules: Mapping[type, object] | None = None,
                 canonizers: Mapping[type, Canonizer] | None = None):
        self._rules: dict[type, object] = {}
        self._canonizers: dict[type, Canonizer] = {}
        self._families: list = []  # the most recent first
        for layer_type, rule in dict(rules or {}).items():
            self.rule(layer_type, rule)
        for model_type, fn in dict(canonizers or {}).items():
            self.canonizer(model_type, fn)

    def rule(self, layer_type: type, rule) -> Registry:
        """Make ``rule`` the default rule of ``layer_type`` (and of its subclasses without a registration of their
        own): canonization accepts the type, and every composite assigns ``rule`` to it unless a composite
        primitive maps another rule onto it."""
        _check_type(layer_type, "rule")
        _check_rule(rule)
        self._rules[layer_type] = rule
        return self

    def canonizer(self, model_type: type, fn: Canonizer) -> Registry:
        """Teach canonization ``model_type``: ``fn(module, path)`` returns the flat list of ``(name, layer)`` entries
        that compute the module's forward (use :func:`lrpkit.canonize.flatten` inside it for sub-modules)."""
        _check_type(model_type, "canonizer")
        if not callable(fn):
            raise TypeError(f"a canonizer must be a function fn(module, path) returning a list of (name, layer) "
                            f"entries, got {fn!r}; see docs/canonization.md")
        self._canonizers[model_type] = fn
        return self

    def family(self, family) -> Registry:
        """Register a model family (:class:`lrpkit.families.Family`): its canonizers, and the family itself for
        :func:`lrpkit.families.family_of` (a family registered later wins for the same model type)."""
        from .families import Family  # the families import this module

        if not isinstance(family, Family):
            raise TypeError(f"register a lrpkit.families.Family, got {type(family).__name__}; see "
                            f"docs/canonization.md (Adding a model family)")
        for model_type, fn in family.canonizers.items():
            self.canonizer(model_type, fn)
        self._families.insert(0, family)
        return self

    @property
    def families(self) -> tuple:
        """The families registered here, the most recent first."""
        return tuple(self._families)

    @property
    def rules(self) -> Mapping[type, object]:
        """The rules registered here (read-only view)."""
        return MappingProxyType(self._rules)

    @property
    def canonizers(self) -> Mapping[type, Canonizer]:
        """The canonizers registered here (read-only view)."""
        return MappingProxyType(self._canonizers)

    def __enter__(self) -> Registry:
        _SCOPES.set(_SCOPES.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        scopes = _SCOPES.get()
        for i in range(len(scopes) - 1, -1, -1):  # the innermost entry of self: with-blocks exit in order
            if scopes[i] is self:
                _SCOPES.set(scopes[:i] + scopes[i + 1:])
                return
        raise RuntimeError(f"{self!r} is not active here: exit a registry in the thread or task that entered it")

    def __repr__(self) -> str:
        if len(self._rules) + len(self._canonizers) > 8:
            return f"Registry({len(self._rules)} rules, {len(self._canonizers)} canonizers)"
        rules = ", ".join(f"{t.__name__}: {r!r}" for t, r in self._rules.items())
        canonizers = ", ".join(f"{t.__name__}: {getattr(f, '__qualname__', f)}" for t, f in self._canonizers.items())
        return f"Registry(rules={{{rules}}}, canonizers={{{canonizers}}})"


GLOBAL = Registry()
"""The process-wide registry: lrpkit's built-in defaults, and what :func:`register_rule` and
:func:`register_canonizer` add outside any ``with`` block."""

_SCOPES: contextvars.ContextVar[tuple[Registry, ...]] = contextvars.ContextVar("lrpkit_registry_scopes", default=())


def _check_type(cls, what: str) -> None:
    if isinstance(cls, nn.Module):
        raise TypeError(f"a {what} is registered for a layer type, got an instance of {type(cls).__name__}; "
                        f"pass the class itself: {type(cls).__name__}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"a {what} is registered for an nn.Module subclass, got {cls!r}; pass the class of your "
                        f"layer or model (e.g. MyLayer)")


def _check_rule(rule) -> None:
    from .rules.base import Rule  # the rules import this module

    if isinstance(rule, type) and issubclass(rule, Rule):
        raise TypeError(f"register a rule object, not its class: {rule.__name__}() instead of {rule.__name__}")
    if not isinstance(rule, Rule):
        raise TypeError(f"a default rule must be an lrpkit rule (an instance of a subclass of lrpkit.rules.Rule), "
                        f"got {rule!r}; use one of lrpkit.rules, e.g. lrpkit.rules.EpsilonRule(), or write one "
                        f"(docs/custom-rules.md)")


def active() -> tuple[Registry, ...]:
    """The registries lookups read now, outermost first: :data:`GLOBAL`, then the enclosing ``with`` blocks."""
    return (GLOBAL,) + _SCOPES.get()


def _lookup(table: str, module: nn.Module):
    chain = active()[::-1]
    for cls in type(module).__mro__:
        for registry in chain:
            found = getattr(registry, table).get(cls)
            if found is not None:
                return found
    return None


def default_rule(layer: nn.Module):
    """The default rule for ``layer`` in the active registries (nearest class in the MRO; for the same class the
    innermost registration), or None."""
    return _lookup("_rules", layer)


def is_registered(layer: nn.Module) -> bool:
    """Whether a default rule is registered for ``layer``'s type (or a parent type) in the active registries: what
    canonization requires of every leaf layer."""
    return default_rule(layer) is not None


def canonizer_for(module: nn.Module) -> Canonizer | None:
    """The canonizer for ``module`` in the active registries (nearest class in the MRO; for the same class the
    innermost registration), or None."""
    return _lookup("_canonizers", module)


def register_rule(layer_type: type, rule) -> None:
    """Make ``rule`` the default rule of ``layer_type`` (and its subclasses without a registration of their own):
    :func:`lrpkit.canonize` accepts the type, and every composite assigns ``rule`` to it unless a composite
    primitive maps another rule onto it.

    Outside any ``with`` block this is **process-wide** (it adds to :data:`GLOBAL`, for every analyzer and every
    caller, until the process ends); inside one, it adds to the innermost block's registry. To keep a registration
    to one analyzer or one block, use a :class:`Registry` or :func:`registered`.
    """
    active()[-1].rule(layer_type, rule)


def register_canonizer(model_type: type, fn: Canonizer) -> None:
    """Teach :func:`lrpkit.canonize` a module type: ``fn(module, path)`` returns the flat list of ``(name, layer)``
    entries that compute the module's forward. Use :func:`lrpkit.canonize.flatten` inside it for sub-modules.

    Outside any ``with`` block this is **process-wide** (it adds to :data:`GLOBAL`); inside one, it adds to the
    innermost block's registry. To keep a canonizer to one analyzer or one block, use a :class:`Registry` or
    :func:`registered`.
    """
    active()[-1].canonizer(model_type, fn)


def registered(rules: Mapping[type, object] | None = None,
               canonizers: Mapping[type, Canonizer] | None = None) -> Registry:
    """A new :class:`Registry` of ``rules`` and ``canonizers``, to use as a block:
    ``with lrpkit.registered(rules={MyLayer: MyRule()}): ...``."""
    return Registry(rules, canonizers)


def scope(registry: Registry | None):
    """A context manager in which ``registry`` is active over the active ones (nothing changes for None): what an
    analyzer given ``registry=`` holds around canonization and rule assignment."""
    if registry is None:
        return contextlib.nullcontext()
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be an lrpkit.Registry or None, got {type(registry).__name__}; build one "
                        f"with lrpkit.Registry().rule(MyLayer, MyRule()) or lrpkit.registered(rules={{...}})")
    return registry


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """For tests: a block after which :data:`GLOBAL` and the active blocks are as before it, whatever it registered
    (process-wide too) or left entered."""
    rules, canonizers, families = dict(GLOBAL._rules), dict(GLOBAL._canonizers), list(GLOBAL._families)
    token = _SCOPES.set(_SCOPES.get())
    try:
        yield
    finally:
        GLOBAL._families[:] = families
        GLOBAL._rules.clear()
        GLOBAL._rules.update(rules)
        GLOBAL._canonizers.clear()
        GLOBAL._canonizers.update(canonizers)
        _SCOPES.reset(token)
