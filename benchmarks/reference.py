"""Today's package next to an earlier revision of it, in one process: the safety net of a redesign.

``load_reference(rev)`` extracts ``lrpkit/`` as it was at git revision ``rev`` (``git archive``) into a cache folder
and imports it under the name ``lrpkit_ref``. The package uses relative imports only, so the copy is a complete,
independent second package: its own registries, rules and layers.

    from reference import load_reference
    old = load_reference("c5a6677")       # the package before the architecture redesign (issue 12)
    old.LRP(model, old.presets.CPLRP())(x)
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "lrpkit_ref"


def load_reference(rev: str):
    """The package at git revision ``rev``, imported as ``lrpkit_ref`` (once per process)."""
    if NAME in sys.modules:
        loaded = sys.modules[NAME]
        if getattr(loaded, "_reference_rev", None) != rev:
            raise RuntimeError(f"{NAME} is already loaded from {loaded._reference_rev}; one reference per process")
        return loaded
    root = os.path.join(tempfile.gettempdir(), "lrpkit-reference", rev)
    target = os.path.join(root, NAME)
    if not os.path.isdir(target):
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "lrpkit"], check=True,
                                 capture_output=True).stdout
        tmp = tempfile.mkdtemp(dir=os.path.dirname(root) if os.path.isdir(os.path.dirname(root)) else None)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        os.makedirs(root, exist_ok=True)
        os.replace(os.path.join(tmp, "lrpkit"), target)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(NAME)
    finally:
        sys.path.remove(root)
    module._reference_rev = rev
    return module
