"""The output folder of :func:`~lrpkit.evaluate.runner.run_evaluation`: its file names, ``_Store`` (the
append-only JSON-lines files of rows, one per rank while sharded), ``_check_config`` (``config.json``: what the rows
depend on; a folder written with another configuration is refused) and :func:`parameter_digest` (the model's
weights in that configuration).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["parameter_digest"]

CONFIG, RESULTS, CSV_FILE, SUMMARY, PLOT = "config.json", "results.jsonl", "results.csv", "summary.json", "curves.png"
RANK_FILES = "results.rank*.jsonl"  # the per-rank row files of a sharded run
# config key -> the command-line option that sets it (for the "different configuration" error)
OPTION_OF = {"version": "(the file format)", "model": "--model",
             "parameters": "--model/--weights (the model's parameters)",
             "source": "--data (generated images or a folder)", "data": "--data", "seed": "--seed",
             "size": "(the model's input size)", "patch_size": "--patch-size", "steps": "--steps",
             "deletion_steps": "--deletion-steps", "method_seed": "--method-seed"}
FORMAT_VERSION = 1


class _Store:
    """The rows of an output folder: ``results.jsonl`` plus the per-rank files of a sharded run.

    Rows are keyed by (image, method); the first row of a key wins. A line that does not parse (a write cut off
    by a crash) is skipped, and the next append starts on a new line.
    """

    def __init__(self, out: Path, rank: int, world: int):
        self.out = out
        self.own = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")

    def rank_files(self) -> list[Path]:
        return sorted(self.out.glob(RANK_FILES))

    @staticmethod
    def read_file(path: Path) -> dict:
        rows: dict = {}
        if not path.is_file():
            return rows
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    key = (row["image"], row["method"])
                except (ValueError, KeyError, TypeError):
                    continue
                rows.setdefault(key, row)
        return rows

    def read(self) -> tuple[dict, dict]:
        """(rows of results.jsonl, rows of the per-rank files not in results.jsonl)."""
        main = self.read_file(self.out / RESULTS)
        extra: dict = {}
        for path in self.rank_files():
            for key, row in self.read_file(path).items():
                if key not in main:
                    extra.setdefault(key, row)
        return main, extra

    @staticmethod
    def append(path: Path, rows: list[dict]) -> None:
        """Append rows as JSON lines, flushed and synced to disk before returning."""
        if not rows:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(path, "a+b") as f:
            f.seek(0, io.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, io.SEEK_END)
                if f.read(1) != b"\n":  # a line cut off by a crash: close it, it will be skipped
                    f.seek(0, io.SEEK_END)
                    f.write(b"\n")
            f.seek(0, io.SEEK_END)
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``model.state_dict()`` (sorted by name): equal
    digests mean equal weights, whatever device or file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_config(out: Path, identity: dict, overwrite: bool) -> str | None:
    """On rank 0: compare with (or write) ``config.json``; return an error text or None."""
    ours = [out / f for f in (CONFIG, RESULTS, CSV_FILE, SUMMARY, PLOT)] + sorted(out.glob(RANK_FILES))
    if overwrite:
        for f in ours:
            f.unlink(missing_ok=True)
    cfg = out / CONFIG
    if cfg.is_file():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))["identity"]
        except (ValueError, KeyError, TypeError):
            return f"{cfg} is not a config written by lrpkit evaluate; choose another --out or pass --overwrite"
        keys = sorted(set(old) | set(identity), key=lambda k: list(OPTION_OF).index(k) if k in OPTION_OF else 99)
        def show(k, v):
            return f"{v[:12]}…" if k == "parameters" and isinstance(v, str) else repr(v)

        diffs = [f"{OPTION_OF.get(k, k)}: {show(k, old.get(k))} there, {show(k, identity.get(k))} now"
                 for k in keys if old.get(k) != identity.get(k)]
        if diffs:
            return (f"{out} holds results of a different configuration ({'; '.join(diffs)}); rerun with the "
                    f"same options to resume, choose another --out, or pass --overwrite to start again")
        return None
    if (out / RESULTS).exists() or list(out.glob(RANK_FILES)):
        return f"{out} holds results but no {CONFIG}; choose another --out or pass --overwrite"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"lrpkit_evaluate": FORMAT_VERSION, "identity": identity}, indent=2) + "\n",
                   encoding="utf-8")
    return None
