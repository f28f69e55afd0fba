"""LRP's time ratio against the input gradient in fresh processes, with the page faults of each call.

On CPU, glibc's allocator maps large blocks fresh and adapts its mmap threshold to each process's history of frees,
so the same code can measure ratios 0.1 apart in two processes. This script runs ``--processes`` fresh interpreters
one after another (alternating between the working tree and ``--against REV`` if given); each times the two methods
as ``bench_lrp.py`` does (:func:`harness.time_rounds`: ``--warmup`` untimed rounds, then ``--repeats`` rounds of two
calls per method, the second one timed) and prints the median ratio with the median minor page faults per timed call
(``ru_minflt``) of each method::

    uv run python benchmarks/ratio_per_process.py timm:convnext_tiny epsilon --batch 1 8 --against f36f121
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=40000000000 \\
        uv run python benchmarks/ratio_per_process.py timm:convnext_tiny epsilon   # glibc's heap kept: no faults
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        uv run python benchmarks/ratio_per_process.py timm:convnext_tiny epsilon   # tcmalloc (as torch's run_cpu)

The child processes inherit the environment, so an allocator set in front applies to every one of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import harness
from bench_lrp import build_model, inputs, method_fn


def one_process(model_name: str, method: str, batches: list[int], warmup: int, repeats: int,
                against: str | None) -> list[dict]:
    """The figures of this process: per batch, the median ratio and faults per call."""
    model = build_model(model_name)
    fns = {"gradient": method_fn(model, "gradient"), "LRP": method_fn(model, ("ref:" if against else "") + method,
                                                                         against)}
    out = []
    for batch in batches:
        x, t = inputs(batch, "cpu")
        faults = {}
        timed = harness.time_rounds(fns, x, t, repeats=repeats, warmup=warmup, faults=faults)
        out.append({"batch": batch, "ratio": round(timed["LRP"][1], 3),
                    **{f"faults {name}": int(v) for name, v in faults.items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a bench_lrp model name, e.g. timm:convnext_tiny")
    parser.add_argument("method", help="a bench_lrp method, e.g. epsilon, CPLRP, AttnLRP")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--processes", type=int, default=3, help="per package")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", help="a git revision: its package in alternate processes")
    parser.add_argument("--child", metavar="REV", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(one_process(args.model, args.method, args.batch, args.warmup, args.repeats,
                                     args.child or None)))
        return
    for _ in range(args.processes):
        for rev in ([""] + ([args.against] if args.against else [])):
            cmd = [sys.executable, __file__, args.model, args.method, "--batch", *map(str, args.batch), "--warmup",
                   str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads), "--child", rev]
            rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(rev or "working tree", " | ".join(
                f"batch {r['batch']}: {r['ratio']:.3f} (faults: gradient {r['faults gradient']}, "
                f"LRP {r['faults LRP']})" for r in rows), flush=True)


if __name__ == "__main__":
    main()
