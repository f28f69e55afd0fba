"""The application's old module paths, kept working: ``lrpkit.data`` is ``lrpkit.app.data``, and so on.

The application (demo, generated data, bundled models, heatmaps, the command line, the model zoo) moved under
:mod:`lrpkit.app`; the library core stays at the top level. A finder on ``sys.meta_path`` maps each old path, and
every module below it, to its new place: ``import lrpkit.data``, ``from lrpkit.commands import explain``,
``python -m lrpkit.cli`` and a pickle that names ``lrpkit.data.Sample`` all get the module of ``lrpkit.app``
itself, not a copy (one module object under two names, so a monkeypatch, an ``isinstance`` check or a pickle sees
one class). ``lrpkit.__getattr__`` imports them on first use as attributes (``lrpkit.viz``), so that
``import lrpkit`` imports neither the application nor matplotlib.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

#: Old module path → where the module lives now. Modules below an old path map the same way
#: (``lrpkit.commands.explain`` → ``lrpkit.app.commands.explain``).
ALIASES = {
    "lrpkit.catalog": "lrpkit.app.catalog",
    "lrpkit.cli": "lrpkit.app.cli",
    "lrpkit.commands": "lrpkit.app.commands",
    "lrpkit.data": "lrpkit.app.data",
    "lrpkit.demo": "lrpkit.app.demo",
    "lrpkit.models": "lrpkit.app.models",
    "lrpkit.viz": "lrpkit.app.viz",
}


def new_name(name: str) -> str | None:
    """The module path that the old path ``name`` stands for now, or None when ``name`` did not move."""
    top = ".".join(name.split(".", 2)[:2])
    return ALIASES[top] + name[len(top):] if top in ALIASES else None


class _AliasSpec(importlib.machinery.ModuleSpec):
    # ``python -m lrpkit.cli`` runs the code of lrpkit/app/cli.py with ``__package__ = spec.parent``: the real
    # module's package, so that relative imports in it resolve as in an ordinary import.
    @property
    def parent(self) -> str:
        return self.loader.real.parent


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new place: imports that one and hands it over unchanged."""

    def __init__(self, real: importlib.machinery.ModuleSpec):
        self.real = real
        self._own_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.real.name)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # importlib has just set the alias's spec on the module; it keeps its own (its name is the new path).
        module.__spec__ = self._own_spec

    # What runpy asks of a loader (python -m lrpkit.cli), answered by the real module's loader.
    def get_code(self, fullname):
        return self.real.loader.get_code(self.real.name)

    def get_source(self, fullname):
        return self.real.loader.get_source(self.real.name)

    def is_package(self, fullname):
        return self.real.submodule_search_locations is not None


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`ALIASES` (and the modules below them) at their new place."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        if real is None:  # no such module at the new place either: the usual ModuleNotFoundError
            return None
        spec = _AliasSpec(fullname, _AliasLoader(real), origin=real.origin)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), ahead of the finder that would load a second copy of a
    module below an aliased package from the package's folder."""
    if not any(type(finder).__qualname__ == "AliasFinder" and type(finder).__module__ == __name__  # reload-proof
               for finder in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
