"""Where LRP's time goes beyond the input gradient's: the self CPU time of each torch operation, per call, for both.

Profiles ``--calls`` calls of each method with :mod:`torch.profiler` (alternating, after two warm-up calls each) and
prints, per operation, the mean self CPU time per call of the gradient and of LRP and their difference: the ``--top``
largest differences, then the few most negative ones (the gradient's own backward operations, which LRP does not
run)::

    uv run python benchmarks/profile_ops.py timm:convnext_tiny epsilon --batch 1
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=40000000000 \\
        uv run python benchmarks/profile_ops.py timm:convnext_tiny epsilon --batch 8 --top 15

Self CPU time leaves out Python, so the totals are below the wall-clock times of ``bench_lrp.py``; page faults land
in the operation that first touches a fresh buffer (glibc's heap kept, as above, removes them from both).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from bench_lrp import build_model, inputs, method_fn


def self_times(fn, x, target) -> Counter:
    """Self CPU time, in ms, of each operation of one call ``fn(x, target)``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x, target)
    return Counter({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a bench_lrp model name, e.g. timm:convnext_tiny")
    parser.add_argument("method", help="a bench_lrp method, e.g. epsilon, CPLRP, AttnLRP")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=6, help="profiled calls per method")
    parser.add_argument("--top", type=int, default=25, help="rows printed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    fns = {"gradient": method_fn(model, "gradient"), "LRP": method_fn(model, args.method)}
    x, target = inputs(args.batch, "cpu")
    for fn in fns.values():
        for _ in range(2):
            fn(x, target)
    totals = {name: Counter() for name in fns}
    for _ in range(args.calls):
        for name, fn in fns.items():
            totals[name].update(self_times(fn, x, target))
    # per call; a Counter reads 0 for an operation that only one of the two runs
    grad, lrp = (Counter({op: ms / args.calls for op, ms in totals[name].items()}) for name in ("gradient", "LRP"))
    print(f"{args.model} {args.method}, batch {args.batch}, {args.threads} threads, mean of {args.calls} calls: "
          f"self CPU {sum(grad.values()):.1f} ms (gradient), {sum(lrp.values()):.1f} ms (LRP)")
    print(f"{'operation':48s} {'gradient ms':>12s} {'LRP ms':>10s} {'LRP - gradient':>15s}")
    ops = sorted(set(grad) | set(lrp), key=lambda k: -(lrp[k] - grad[k]))
    rows = ops if len(ops) <= args.top + 5 else ops[:args.top] + [None] + ops[-5:]
    for op in rows:
        print("..." if op is None else f"{op[:48]:48s} {grad[op]:12.2f} {lrp[op]:10.2f} {lrp[op] - grad[op]:+15.2f}")


if __name__ == "__main__":
    main()
