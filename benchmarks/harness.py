"""Timing and peak-memory harness for the benchmarks: every figure is a ratio against the plain input gradient
(parameters frozen) measured in the same run.

Time: :func:`time_pair` (LRP against the gradient: interleaved rounds, the median of the per-round ratios) or
:func:`time_call` (median wall time of ``repeats`` calls after one warm-up call). Peak memory: each (model, method, batch)
runs once in a fresh subprocess; the process's resident-set high-water mark is reset just before the call
(``/proc/self/clear_refs``) and the peak minus the resident set before the call is the memory the call needed.
On a CUDA device, ``torch.cuda.max_memory_allocated`` is used instead.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def input_gradient(model):
    """The baseline: ``∂ y_t / ∂ x`` by one forward and one backward pass, parameters frozen."""
    def run(x, target):
        x = x.detach().requires_grad_(True)
        out = model(x)
        (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
        return grad
    return run


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, x, target, repeats: int = 3) -> float:
    """Median seconds of ``fn(x, target)`` over ``repeats`` runs after one warm-up run."""
    fn(x, target)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, target)
        _sync(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_rounds(fns: dict, x, target, repeats: int = 7, calls: int = 2, warmup: int = 3,
                clock=time.perf_counter, faults: dict | None = None) -> dict:
    """Interleaved timing of the functions in ``fns`` (name -> fn): ``warmup`` untimed rounds, then ``repeats``
    rounds; in each round, every function in turn is called ``calls`` times in a row, of which only the last is
    timed. Returns name -> (median seconds, median of the per-round ratios to the first function).

    Why rounds: the ratio of two calls made back to back is robust against the slow drifts of a shared machine.
    Why untimed calls first: a call that directly follows the other method finds the heap laid out for that
    method (glibc trims freed memory at the top of the heap), and re-faults the pages it needs beyond the other's
    peak; a user explaining a thousand images runs one method in its steady state. Why several warm-up rounds:
    the first rounds in a process measured higher ratios than the later ones (ResNet-50 with ε, batch 1 and 8:
    1.16 and 1.14 in the first 7 rounds, 1.09 to 1.11 in each of the next three sets of 7).

    ``clock``: wall time by default; ``time.thread_time`` counts the CPU time of the calling thread only, which on a
    machine shared with other jobs is far less disturbed than wall time (with one intra-op thread, all of a call's
    work runs on the calling thread).

    ``faults``: a dict that gets, per name, the median number of minor page faults of the timed calls
    (``ru_minflt``, the whole process's): how often the allocator handed the call fresh pages."""
    rounds, faulted = [], []
    for round_ in range(warmup + repeats):
        times, flt = {}, {}
        for name, f in fns.items():
            for _ in range(calls - 1):
                f(x, target)
            _sync(x.device)
            before, start = _minor_faults(), clock()
            f(x, target)
            _sync(x.device)
            times[name], flt[name] = clock() - start, _minor_faults() - before
        if round_ >= warmup:
            rounds.append(times)
            faulted.append(flt)
    if faults is not None:
        faults.update({name: statistics.median(r[name] for r in faulted) for name in fns})
    first = next(iter(fns))
    return {name: (statistics.median(r[name] for r in rounds), statistics.median(r[name] / r[first] for r in rounds))
            for name in fns}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_pair(base, fn, x, target, repeats: int = 7, calls: int = 2, warmup: int = 3) -> tuple[float, float, float]:
    """:func:`time_rounds` of two functions: (median seconds of base, median seconds of fn, median ratio)."""
    timed = time_rounds({"base": base, "fn": fn}, x, target, repeats, calls, warmup)
    return timed["base"][0], timed["fn"][0], timed["fn"][1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn, x, target) -> float:
    """Extra memory (MiB) one call of ``fn(x, target)`` needs at its peak (run it in a fresh process)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(x, target)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn(x, target)
    return (_status_kib("VmHWM") - before) / 1024


def memory_in_subprocess(script: str, args: list[str]) -> float:
    """Run ``script --memory ARGS`` in a fresh interpreter; it prints one JSON number (MiB)."""
    # every allocation above 64 KiB gets its own mapping, returned at once when freed: the resident set then
    # follows the live memory instead of glibc's heap high-water mark
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, script, "--memory", *args], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
