"""The layout: the application lives in ``lrpkit.app``, and every old public import path still works.

``lrpkit.data``, ``lrpkit.models``, ``lrpkit.viz``, ``lrpkit.demo``, ``lrpkit.cli`` and ``lrpkit.commands`` are the
modules of ``lrpkit.app`` under their old names (one module object, not a copy), ``lrpkit.catalog`` keeps the names
it had, ``python -m lrpkit.cli`` and the ``lrpkit`` console script run the command line, pickles that name the old
paths load, and ``import lrpkit`` imports neither the application nor matplotlib.
"""

from __future__ import annotations

import importlib
import io
import pickle
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import lrpkit

ROOT = Path(__file__).resolve().parents[1]

#: Old path → new path of every moved module.
MOVED = {
    "lrpkit.data": "lrpkit.app.data",
    "lrpkit.models": "lrpkit.app.models",
    "lrpkit.viz": "lrpkit.app.viz",
    "lrpkit.catalog": "lrpkit.app.catalog",
    "lrpkit.demo": "lrpkit.app.demo",
    "lrpkit.cli": "lrpkit.app.cli",
    "lrpkit.commands": "lrpkit.app.commands",
    "lrpkit.commands.demo": "lrpkit.app.commands.demo",
    "lrpkit.commands.explain": "lrpkit.app.commands.explain",
    "lrpkit.commands.evaluate": "lrpkit.app.commands.evaluate",
}

#: The names that lrpkit.catalog had before it was split.
CATALOG_NAMES = ("DEMO_MODELS", "TORCHVISION_MODELS", "CROP_MODES", "METHODS", "Preprocess", "load_model",
                 "make_method", "model_names_like", "class_names")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("old", MOVED)
def test_an_old_path_is_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == module.__spec__.name == MOVED[old]  # the module keeps its own name and spec
    assert sys.modules[old] is module


def test_the_old_import_statements():
    import lrpkit.data
    import lrpkit.models
    import lrpkit.viz
    from lrpkit import catalog, cli, data, demo, models, viz
    from lrpkit.commands import explain

    assert (data, models, viz, demo, cli) == (lrpkit.app.data, lrpkit.app.models, lrpkit.app.viz, lrpkit.app.demo,
                                               lrpkit.app.cli)
    assert lrpkit.data is data and lrpkit.models is models and lrpkit.viz is viz
    assert explain is lrpkit.app.commands.explain
    for module in (data, models, viz):
        for name in module.__all__:
            assert getattr(importlib.import_module(module.__name__.replace(".app", "")), name) is getattr(module,
                                                                                                          name)
    from lrpkit.data import CLASS_NAMES, make_dataset  # noqa: F401
    from lrpkit.models import WEIGHTS_DIR, load_demo_vit  # noqa: F401
    from lrpkit.viz import overlay  # noqa: F401

    assert WEIGHTS_DIR == Path(lrpkit.app.models.__file__).resolve().parent / "weights"
    assert sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "demo_cnn.json", "demo_cnn.safetensors", "demo_vit.json", "demo_vit.safetensors"]
    assert callable(catalog.load_model)


def test_catalog_keeps_its_names_from_the_three_modules_it_was_split_into():
    from lrpkit import catalog
    from lrpkit.app import method_registry, preprocess, zoo

    assert sorted(catalog.__all__) == sorted(CATALOG_NAMES)
    split = {}
    for module in (preprocess, zoo, method_registry):
        for name in module.__all__:
            assert name not in split, f"{name} is in two modules"
            split[name] = getattr(module, name)
    assert sorted(split) == sorted(CATALOG_NAMES)
    for name, obj in split.items():
        assert getattr(catalog, name) is obj, name
    assert lrpkit.catalog.load_model is zoo.load_model


def test_a_missing_module_below_an_old_path_is_not_found():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lrpkit.commands.nope")
    with pytest.raises(AttributeError):
        lrpkit.nope  # noqa: B018


def test_import_lrpkit_imports_neither_the_application_nor_matplotlib():
    done = run_python("import sys, lrpkit; print(sorted(m for m in sys.modules if m.startswith(('matplotlib', "
                      "'lrpkit.app'))))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    done = run_python("import sys, lrpkit; lrpkit.viz; import lrpkit.data; from lrpkit import models; "
                      "print('matplotlib' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_python_m_lrpkit_cli_and_the_console_script():
    done = subprocess.run([sys.executable, "-m", "lrpkit.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "{demo,explain,evaluate,concepts}" in done.stdout
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lrpkit"]
    assert script.value == "lrpkit.app.cli:main"
    assert script.load() is lrpkit.app.cli.main


def old_pickle(obj, old: str, new: str) -> bytes:
    """``obj`` pickled as a pickle written before the move would be: its class named by the old module path."""
    data = pickle.dumps(obj, protocol=2)  # protocol 2 (torch.save's) names a class as "module\nname\n"
    assert f"c{new}\n".encode() in data
    return data.replace(f"c{new}\n".encode(), f"c{old}\n".encode())


def test_pickles_that_name_the_old_paths_load():
    from lrpkit import catalog, data

    sample = data.make_sample(3, seed=1, size=16)
    back = pickle.loads(old_pickle(sample, "lrpkit.data", "lrpkit.app.data"))
    assert type(back) is data.Sample and all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                                             for a, b in zip(back, sample))
    prep = catalog.Preprocess(size=(8, 8), resize=9, mean=(0.5,) * 3, std=(0.25,) * 3)
    module = type(prep).__module__
    assert pickle.loads(old_pickle(prep, "lrpkit.catalog", module)) == prep

    buffer = io.BytesIO()  # torch.save's legacy format is one pickle stream, so its module names can be edited
    torch.save({"prep": prep, "sample": sample}, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue().replace(f"c{module}\n".encode(), b"clrpkit.catalog\n")
    raw = raw.replace(b"clrpkit.app.data\n", b"clrpkit.data\n")
    assert b"clrpkit.catalog\n" in raw and b"clrpkit.data\n" in raw
    loaded = torch.load(io.BytesIO(raw), weights_only=False)
    assert loaded["prep"] == prep and torch.equal(loaded["sample"].image, sample.image)
