"""The documentation site stays complete and true to the code.

Every page is in the mkdocs nav; every rule, method, metric, preset and command-line method name is documented,
with the signature the code has; every public module has an API page; relative links point at files that exist;
the formulas are well-formed TeX made of macros MathJax knows. (The Python blocks of the pages run in
tests/test_readme.py; the site itself is built with ``mkdocs build --strict`` in .ci/run.)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import lrpkit
from lrpkit import catalog, evaluate, methods, presets, rules
from lrpkit.rules import chefer as chefer_rules

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def read(name: str) -> str:
    return (DOCS / name).read_text()


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (where ``$`` is not math)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"``.+?``|`[^`\n]+`", "", text)


def headings(text: str) -> set[str]:
    return set(re.findall(r"^#{2,4} (.+?)\s*$", text, flags=re.M))


def section(text: str, heading: str) -> str:
    """The text under ``### heading`` up to the next heading."""
    return text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]


# -- the site's structure ---------------------------------------------------------------------------------------
def nav_and_excluded() -> tuple[set[str], set[str]]:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.md)\s*$", config, flags=re.M))
    block = re.search(r"^exclude_docs: \|\n((?:[ \t]+\S.*\n)+)", config, flags=re.M)
    excluded = {line.strip() for line in block.group(1).splitlines()} if block else set()
    return nav, excluded


def test_every_page_is_in_the_nav():
    nav, excluded = nav_and_excluded()
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages - nav - excluded == set(), "add these pages to the nav of mkdocs.yml"
    assert nav - pages == set(), "the nav names pages that do not exist"


def test_the_nav_covers_the_issue():
    nav, _ = nav_and_excluded()
    wanted = {"index.md", "tutorial.md", "rules.md", "composites.md", "custom-rules.md", "canonization.md",
              "methods.md", "evaluation.md", "benchmarks.md", "ground-truth.md", "cli.md", "cli-explain.md",
              "cli-evaluate.md"}
    assert wanted <= nav


LINK = re.compile(r"\]\(([^)\s]+?)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_relative_links_point_at_files(page):
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (page.parent / path).is_file(), f"{page.name}: broken link {target}"


def test_ground_truth_page_shows_the_generated_table():
    generated = read("ground-truth-table.md").strip()
    assert generated.startswith("| method |")
    assert generated in read("ground-truth.md"), \
        "docs/ground-truth.md must show the table that `lrpkit demo --table docs/ground-truth-table.md` wrote"


# -- the API reference ----------------------------------------------------------------------------------------
def api_targets() -> set[str]:
    return {t for page in (DOCS / "api").glob("*.md")
            for t in re.findall(r"^::: (\S+)\s*$", page.read_text(), flags=re.M)}


def test_api_reference_covers_the_public_modules():
    targets = api_targets()
    public = {"lrpkit", "lrpkit.layers", "lrpkit.rules", "lrpkit.composites", "lrpkit.presets", "lrpkit.canonize",
              "lrpkit.methods", "lrpkit.evaluate", "lrpkit.app", "lrpkit.app.data", "lrpkit.app.models",
              "lrpkit.app.viz", "lrpkit.app.catalog", "lrpkit.analyzer", "lrpkit.explanation", "lrpkit.registry"}
    assert public - targets == set()
    internal = {"lrpkit.rules.vjp",  # machinery of the rules, not an interface
                # the command line and the demo: documented as commands (docs/cli*.md)
                "lrpkit.app.cli", "lrpkit.app.commands", "lrpkit.app.demo"}
    for package in map(importlib.import_module, ("lrpkit.rules", "lrpkit.methods", "lrpkit.evaluate",
                                                  "lrpkit.canonize", "lrpkit.app")):
        for info in pkgutil.iter_modules(package.__path__):
            name = f"{package.__name__}.{info.name}"
            if not info.name.startswith("_") and name not in internal:
                assert name in targets, f"add '::: {name}' to a page under docs/api/"


def test_api_targets_exist():
    for target in api_targets():
        importlib.import_module(target)


# -- signatures as documented ---------------------------------------------------------------------------------
def documented_call(text: str, name: str) -> str:
    """The argument list of the first ``name(...)`` written in inline code on the page."""
    found = re.search(r"`" + re.escape(name) + r"\(([^`]*?)\)(?:\s*->\s*\w+)?`", text)
    assert found, f"no `{name}(...)` on the page"
    return " ".join(found.group(1).split())


def check_signature(text: str, obj, skip=("self", "model"), name: str | None = None) -> None:
    """Every documented argument exists with the documented default; every real argument is documented."""
    name = name or obj.__name__
    params = {p.name: p for p in inspect.signature(obj).parameters.values()
              if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    documented = {}
    for part in documented_call(text, name).split(","):
        part = part.strip()
        if not part or part == "*" or part in skip:
            continue
        key, _, value = part.partition("=")
        documented[key.strip()] = value.strip() or None
    assert set(documented) == set(params), f"{name}: documented {sorted(documented)}, code has {sorted(params)}"
    for key, value in documented.items():
        default = params[key].default
        if value is None:
            assert default is inspect.Parameter.empty, f"{name}({key}) has a default, {default!r}: document it"
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:  # a name such as CHEFER_FRACTIONS
            assert getattr(inspect.getmodule(obj), value, None) == default, f"{name}({key}={value})"
            continue
        assert literal == default, f"{name}({key}={value}) but the code's default is {default!r}"


def public_rules():
    seen = {}
    for module in (rules, chefer_rules):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, rules.Rule) and obj not in (rules.Rule, rules.TermRule):
                seen[name] = obj
    return seen


@pytest.mark.parametrize("name", sorted(public_rules()))
def test_every_rule_has_a_section_with_its_signature(name):
    text = read("rules.md")
    assert name in headings(text), f"docs/rules.md needs a '### {name}' section (formula and reference)"
    check_signature(section(text, name), public_rules()[name])


def test_rule_base_classes_are_explained():
    text = read("custom-rules.md")
    for name in ("Rule", "TermRule", "Term", "Group", "modify_input", "modify_param", "modify_denominator"):
        assert re.search(rf"\b{name}\b", text), name


def public_methods():
    return {name: getattr(methods, name) for name in methods.__all__
            if name not in ("Explainer", "NotApplicableError")}


@pytest.mark.parametrize("name", sorted(public_methods()))
def test_every_method_has_a_section_with_its_signature(name):
    text = read("methods.md")
    assert name in headings(text), f"docs/methods.md needs a '### {name}' section"
    obj = public_methods()[name]
    check_signature(section(text, name), obj.__init__ if inspect.isclass(obj) else obj, name=name)


METRICS = [name for name in evaluate.__all__ if inspect.isfunction(getattr(evaluate, name))]


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_is_documented_with_its_signature(name):
    text = read("evaluation.md")
    if name in ("rankdata", "parameterized_layers"):  # helpers, named in their metric's section
        assert f"`{name}" in text
        return
    assert name in headings(text), f"docs/evaluation.md needs a '### {name}' section"
    check_signature(section(text, name), getattr(evaluate, name), skip=())


def test_every_result_type_is_documented():
    text = read("evaluation.md")
    for name in evaluate.__all__:
        assert name in text, name


PRESETS = ["EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat",
           "CPLRP", "AttnLRP"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_in_the_table_with_its_signature(name):
    check_signature(read("composites.md"), getattr(presets, name))


def test_composite_primitives_are_in_the_table():
    text = read("composites.md")
    for name in ("GlobalMap", "GlobalTypeMap", "FirstLayerMap", "FirstLayerTypeMap", "LastLayerMap",
                 "LastLayerTypeMap", "RangeMap", "RangeTypeMap", "NameMap"):
        assert f"`{name}(" in text, name


def test_every_layer_is_in_the_canonization_table():
    text = read("canonization.md")
    for name in lrpkit.layers.__dict__:
        obj = getattr(lrpkit.layers, name)
        if inspect.isclass(obj) and obj.__module__ == "lrpkit.layers":
            assert f"| `{name}(" in text, name


def test_cli_page_names_every_command_and_method():
    text = read("cli.md")
    from lrpkit.cli import COMMANDS

    for command in COMMANDS:
        assert f"lrpkit {command}" in text, command
    for name in catalog.METHODS:
        assert f"`{name}`" in text, f"method name {name!r} of lrpkit.catalog.METHODS is missing in docs/cli.md"


# -- formulas ---------------------------------------------------------------------------------------------------
MACROS = set("""
alpha beta gamma epsilon varepsilon mu sigma rho varphi nabla partial
sum int frac tfrac sqrt operatorname text mathtt mathcal mathbb
odot cdot cdots dots times pm approx sim le ge in ni cap to uparrow leftarrow top
qquad quad big Big lvert rvert max min arg hat bar tilde sin cos mapsto ldots
""".split()) | {",", "!", "{", "}", "_", "|"}


def formulas(text: str) -> list[str]:
    """The TeX of every ``$$...$$`` and ``$...$`` in the page's prose (arithmatex's delimiters)."""
    body = prose(text)
    display = re.findall(r"\$\$(.+?)\$\$", body, flags=re.S)
    body = re.sub(r"\$\$(.+?)\$\$", "", body, flags=re.S)
    inline = re.findall(r"(?<![\\$])\$(?!\s)(.+?)(?<![\s\\])\$", body, flags=re.S)
    return display + inline


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_formulas_are_well_formed(page):
    text = page.read_text()
    stripped = prose(text)
    stripped = re.sub(r"\$\$(.+?)\$\$", "", stripped, flags=re.S)
    stripped = re.sub(r"(?<![\\$])\$(?!\s)(.+?)(?<![\s\\])\$", "", stripped, flags=re.S)
    assert "$" not in stripped, f"{page.name}: an unpaired $ near {stripped[stripped.index('$') - 40:][:80]!r}"
    for block in re.finditer(r"\$\$(.+?)\$\$", prose(text), flags=re.S):
        before, after = prose(text)[: block.start()], prose(text)[block.end():]
        assert before.endswith("\n\n") and (after.startswith("\n\n") or after.strip() == ""), \
            f"{page.name}: a $$ formula must be a paragraph of its own (blank lines around, no indent): {block[0][:60]!r}"
    for tex in formulas(text):
        depth = 0
        for char in re.sub(r"\\[{}]", "", tex):
            depth += {"{": 1, "}": -1}.get(char, 0)
            assert depth >= 0, f"{page.name}: unbalanced braces in {tex!r}"
        assert depth == 0, f"{page.name}: unbalanced braces in {tex!r}"
        unknown = set(re.findall(r"\\([a-zA-Z]+|.)", tex)) - MACROS
        assert not unknown, f"{page.name}: macros {unknown} in {tex!r} (add them to MACROS if MathJax knows them)"
