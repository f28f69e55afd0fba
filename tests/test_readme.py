"""The Python blocks of the README and of docs/*.md run as written, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def run_blocks(path: Path) -> dict:
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
        exec(compile(block, str(path), "exec"), namespace)
    return namespace


def test_readme_quick_start_runs():
    namespace = run_blocks(ROOT / "README.md")
    expl = namespace["expl"]
    assert expl.relevance.shape == (2, 3, 224, 224)
    assert expl.target.tolist() == [1, 2]


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md"], ids=lambda p: p.name)
def test_docs_python_blocks_run(page):
    run_blocks(page)
