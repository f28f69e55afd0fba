"""mkdocs hook: turn the Sphinx roles of lrpkit's docstrings into links of the API reference.

The docstrings write cross-references the Sphinx way, ``:class:`~lrpkit.layers.Chain``` or ``:func:`flatten```.
mkdocstrings renders them as the role's name followed by inline code. This hook (run on the finished pages, before
mkdocs-autorefs resolves references) replaces each ``:role:<code>target</code>`` by an autorefs reference to the
documented object:

- ``~a.b.C`` shows ``C``, as in Sphinx;
- a name is resolved like Python scopes, from the object whose docstring holds it outwards
  (``lrpkit.rules.basic.GammaRule`` → ``lrpkit.rules.basic.X`` → ``lrpkit.rules.X`` → ``lrpkit.X``), then, for a
  re-exported name such as ``lrpkit.LRP``, by its last component when exactly one documented object has it;
- a target that is not documented stays inline code (without the role's name);
- an old module path of the application (``lrpkit.data.normalize``) first becomes its new one
  (``lrpkit.app.data.normalize``), as ``lrpkit/_aliases.py`` maps it at import time.
"""

from __future__ import annotations

import ast
import bisect
import re
from pathlib import Path

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")
ANCHOR = re.compile(r'id="(lrpkit(?:\.\w+)+)"')


def _read_aliases() -> dict[str, str]:
    """``ALIASES`` of lrpkit/_aliases.py (old module path → new), read without importing lrpkit."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "lrpkit" / "_aliases.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "ALIASES" for t in targets):
                return ast.literal_eval(node.value)
    raise RuntimeError("lrpkit/_aliases.py has no ALIASES")


ALIASES = _read_aliases()


def _moved(target: str) -> str:
    for old, new in ALIASES.items():
        if target == old or target.startswith(old + "."):
            return new + target[len(old):]
    return target


def _resolve(target: str, scope: str | None, known: set[str], by_name: dict[str, list[str]]) -> str | None:
    target = _moved(target)
    parts = scope.split(".") if scope else []
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i] + [target])
        if candidate in known:
            return candidate
    if target in known:
        return target
    tail = [ident for ident in known if ident.endswith("." + target)]
    if len(tail) == 1:
        return tail[0]
    same = by_name.get(target.rsplit(".", 1)[-1], [])
    return same[0] if len(same) == 1 else None


def on_env(env, config, files):
    pages = [f.page for f in files if f.page is not None and f.page.content]
    known = {ident for page in pages for ident in ANCHOR.findall(page.content)}
    by_name: dict[str, list[str]] = {}
    for ident in sorted(known):
        by_name.setdefault(ident.rsplit(".", 1)[-1], []).append(ident)

    for page in pages:
        html = page.content
        anchors = [(m.start(), m.group(1)) for m in ANCHOR.finditer(html)]
        starts = [pos for pos, _ in anchors]

        def link(match: re.Match) -> str:
            short, target, call = match.group(1), match.group(2), match.group(3) or ""
            i = bisect.bisect_left(starts, match.start()) - 1
            scope = anchors[i][1] if i >= 0 else None
            shown = target.rsplit(".", 1)[-1] if short else target
            code = f"<code>{shown}{call}</code>"
            ident = _resolve(target, scope, known, by_name)
            return f'<autoref identifier="{ident}" optional>{code}</autoref>' if ident else code

        page.content = ROLE.sub(link, html)
    return env
