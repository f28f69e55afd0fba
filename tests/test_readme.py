"""The Python blocks of the README and of every page under docs/ run as written, in order, one namespace per file.

So the examples of the documentation stay true: a page whose example breaks fails here.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def run_blocks(path: Path) -> dict:
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
        exec(compile(block, str(path), "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def one_thread():
    """The examples are small: one torch thread is as fast, and much faster on a machine whose cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_readme_quick_start_runs():
    namespace = run_blocks(ROOT / "README.md")
    expl = namespace["expl"]
    assert expl.relevance.shape == (2, 3, 224, 224)
    assert expl.target.tolist() == [1, 2]


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.relative_to(ROOT / "docs").as_posix())
def test_docs_python_blocks_run(page):
    run_blocks(page)
