"""The transformer explainers' speed and peak memory against the plain input gradient (or one forward pass), in one
run.

    uv run python benchmarks/bench_methods.py                 # vit_base_patch16_224, batch 1 and 8, every method
    uv run python benchmarks/bench_methods.py --methods TransformerAttribution --threads 2
    uv run python benchmarks/bench_methods.py --vitcx         # also ViT-CX's masked forward passes (images/s)

Random weights. Time: interleaved rounds against the baseline (:func:`harness.time_pair`; the ratio is the median of
the per-round ratios). Peak memory: each (method, batch) in a fresh process (:func:`harness.peak_memory_mib`), the
explainer built before the measured call; ``explainer MiB`` is what building the explainer adds to the resident
set and keeps (the canonized copy of the model and any prepared rule state), measured in a process of its own.
Targets (issue 4): TransformerAttribution ≤ 1.5× the input gradient; AttentionRollout ≤ 1.2× one forward pass;
ViT-CX's masked passes batched (images per second reported). Issue 16: TransformerAttribution's peak memory ≤ 2×
the input gradient's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from lrpkit import methods  # noqa: E402

#: method -> (the baseline it is measured against,)
METHODS = {"TransformerAttribution": ("gradient",), "PartialLRP": ("gradient",),
           "AttentionRollout": ("forward",), "GradientRollout": ("gradient",)}
DEFAULT = ["TransformerAttribution", "AttentionRollout", "GradientRollout"]


def forward_only(model):
    def run(x, target):
        with torch.no_grad():
            return model(x)
    return run


def explainer(cls, model, **kw):
    method = cls(model, **kw)
    return lambda x, target: method(x, target)


def build_model(name: str, device: str):
    import timm
    torch.manual_seed(0)
    return harness.freeze(timm.create_model(name, pretrained=False)).to(device)


def method_fn(model, method: str):
    if method == "gradient":
        return harness.input_gradient(model)
    if method == "forward":
        return forward_only(model)
    return explainer(getattr(methods, method), model)


def inputs(batch: int, device: str):
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    return x, torch.zeros(batch, dtype=torch.long, device=device)


def memory_main(model_name, method, batch, device, what):
    """Subprocess: print the peak memory (MiB) of one call (``what='call'``) or what building the explainer keeps
    (``what='build'``)."""
    model = build_model(model_name, device)
    if what == "build":
        before = harness._status_kib("VmRSS")
        fn = method_fn(model, method)  # noqa: F841 - alive while the resident set is read
        print(json.dumps((harness._status_kib("VmRSS") - before) / 1024))
        return
    fn = method_fn(model, method)
    x, t = inputs(int(batch), device)
    print(json.dumps(harness.peak_memory_mib(fn, x, t)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (baseline, method)")
    parser.add_argument("--calls", type=int, default=2, help="consecutive calls per method and round, the last one "
                        "timed")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--vitcx", action="store_true")
    parser.add_argument("--memory", nargs=5, metavar=("MODEL", "METHOD", "BATCH", "DEVICE", "WHAT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory_main(*args.memory)
        return

    script = os.path.abspath(__file__)
    threads = [] if not args.threads else ["--threads", str(args.threads)]

    def memory(method, batch, what="call"):
        return harness.memory_in_subprocess(script, [args.model, method, str(batch), args.device, what, *threads])

    model = build_model(args.model, args.device)
    rows = []
    for batch in args.batch:
        x, t = inputs(batch, args.device)
        for name in args.methods:
            (against,) = METHODS[name]
            row = {"method": name, "batch": batch, "against": against}
            if not args.no_time:
                base_s, method_s, ratio = harness.time_pair(method_fn(model, against), method_fn(model, name), x, t,
                                                            args.repeats, args.calls, args.warmup)
                row.update({"baseline s": f"{base_s:.3f}", "method s": f"{method_s:.3f}", "time ratio": f"{ratio:.2f}"})
            if not args.no_memory:
                m_base, m_method = memory(against, batch), memory(name, batch)
                row.update({"baseline MiB": f"{m_base:.0f}", "method MiB": f"{m_method:.0f}",
                            "memory ratio": f"{m_method / m_base:.2f}"})
                if batch == args.batch[0]:
                    row["explainer MiB"] = f"{memory(name, batch, 'build'):.0f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.vitcx:
        vitcx = methods.ViTCX(model, progress=False, seed=0)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(args.device)
        expl = vitcx(x)
        extras = expl.extras
        print(json.dumps({"method": "ViTCX", "masks": extras.get("num_masks"),
                          "masked images": extras.get("masked_images"),
                          "images/s": round(float(extras.get("images_per_second", 0)), 2)}))
    if rows:
        print()
        print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print(harness.table(rows, columns))


if __name__ == "__main__":
    main()
