"""LRP speed and memory against the plain input gradient, side by side in one run.

    uv run python benchmarks/bench_lrp.py --suite cnn    # ResNet-50, VGG16: Epsilon-only and EpsilonPlusFlat
    uv run python benchmarks/bench_lrp.py --suite vit    # vit_base_patch16_224: CPLRP (ε), CPLRP (γ on Linear)
    uv run python benchmarks/bench_lrp.py --suite timm-siglip   # attention pooling ('map'): CPLRP, AttnLRP
    uv run python benchmarks/bench_lrp.py --suite timm-eva --threads 2   # eva02_small_patch14_224: CPLRP, AttnLRP
    uv run python benchmarks/bench_lrp.py --suite timm-swin --threads 2   # swin_tiny_patch4_window7_224: CPLRP, AttnLRP

Random weights (nothing is downloaded); batch 1 and 8 by default; ``--device cuda`` on a GPU machine.
``--against REV`` also times the package as it was at git revision REV (benchmarks/reference.py) in the same rounds,
so that a change is measured old against new in one interleaved run:

    uv run python benchmarks/bench_lrp.py --suite cnn --against c5a6677

On a machine shared with other jobs, ``--threads 1 --clock cpu`` times the CPU time of the calling thread instead
of wall time (far less disturbed by the other jobs; the ratio of one thread, not of two).

Targets (issues 2 and 3): ε-only ≤ 1.15× (CNN) / ≤ 1.2× (ViT), EpsilonPlusFlat ≤ 1.6×, CPLRP with γ ≤ 2×,
peak memory ≤ 1.5× the input gradient's. Issue 13 (suites timm-beit, timm-siglip, timm-eva, timm-swin): CPLRP ≤ 1.2×,
AttnLRP ≤ 1.5×, memory ≤ 1.5×.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import lrpkit  # noqa: E402
from reference import load_reference  # noqa: E402
from lrpkit.composites import Composite, GlobalMap  # noqa: E402
from lrpkit.rules import EpsilonRule  # noqa: E402

SUITES = {
    "cnn": [("resnet50", "epsilon"), ("resnet50", "EpsilonPlusFlat"), ("vgg16", "epsilon"),
            ("vgg16", "EpsilonPlusFlat")],
    "vit": [("vit_base_patch16_224", "CPLRP"), ("vit_base_patch16_224", "CPLRP-gamma")],
    "timm-efficientnet": [("timm:efficientnet_b0", "epsilon"), ("timm:mobilenetv3_large_100", "epsilon")],
    "timm-convnext": [("timm:convnext_tiny", "epsilon")],
    "timm-resnet": [("timm:resnet50", "epsilon"), ("timm:resnet50", "EpsilonPlusFlat")],
    "timm-beit": [("timm:beit_base_patch16_224", "CPLRP"), ("timm:beit_base_patch16_224", "AttnLRP")],
    "timm-siglip": [("timm:vit_base_patch16_siglip_224", "CPLRP"), ("timm:vit_base_patch16_siglip_224", "AttnLRP")],
    "timm-eva": [("timm:eva02_small_patch14_224", "CPLRP"), ("timm:eva02_small_patch14_224", "AttnLRP")],
    "timm-swin": [("timm:swin_tiny_patch4_window7_224", "CPLRP"), ("timm:swin_tiny_patch4_window7_224", "AttnLRP")],
}


def build_model(name: str):
    """A model with random weights: ``timm:NAME`` (and any ``vit*`` / ``deit*`` name) from timm, else torchvision."""
    torch.manual_seed(0)
    if name.startswith(("vit", "deit", "timm:")):
        import timm
        model = timm.create_model(name.removeprefix("timm:"), pretrained=False)
    else:
        import torchvision
        model = getattr(torchvision.models, name)()
    return harness.freeze(model)


def composite(name: str, pkg=lrpkit):
    if name == "epsilon":
        return pkg.composites.Composite(pkg.composites.GlobalMap(pkg.rules.EpsilonRule()))
    if name == "CPLRP":
        return pkg.presets.CPLRP()
    if name == "CPLRP-gamma":
        return pkg.presets.CPLRP(gamma=0.25)
    return getattr(pkg.presets, name)()


def method_fn(model, method: str, against: str | None = None):
    """``gradient``, or LRP with the composite ``method``; ``ref:METHOD`` with the package at revision ``against``."""
    if method == "gradient":
        return harness.input_gradient(model)
    pkg = lrpkit
    if method.startswith("ref:"):
        pkg, method = load_reference(against), method[4:]
    lrp = pkg.LRP(model, composite(method, pkg))
    return lambda x, target: lrp(x, target).relevance


def inputs(batch: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    return x, torch.zeros(batch, dtype=torch.long, device=device)


def memory_main(model_name, method, batch, device, against=None):
    model = build_model(model_name).to(device)
    fn = method_fn(model, method, against)
    x, t = inputs(int(batch), device)
    print(json.dumps(harness.peak_memory_mib(fn, x, t)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cnn")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (gradient, LRP); the time ratio "
                        "is the median of the per-round ratios")
    parser.add_argument("--calls", type=int, default=2, help="consecutive calls per method and round, the last one "
                        "timed (1: strict alternation, each call right after the other method)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the calling thread's CPU time (needs --threads 1), for a machine shared with other "
                        "jobs, where wall time is disturbed")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--against", default=None, help="git revision whose package is timed in the same rounds")
    parser.add_argument("--memory", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_main(*args.memory)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    rows, models = [], {}
    for model_name, method in SUITES[args.suite]:
        if model_name not in models:
            models[model_name] = build_model(model_name).to(args.device)
        model = models[model_name]
        fns = {"gradient": method_fn(model, "gradient"), "LRP": method_fn(model, method)}
        if args.against:
            fns["before"] = method_fn(model, "ref:" + method, args.against)
        for batch in args.batch:
            x, t = inputs(batch, args.device)
            timed = harness.time_rounds(fns, x, t, args.repeats, args.calls, args.warmup, clock)
            row = {"model": model_name, "method": method, "batch": batch, "gradient s": f"{timed['gradient'][0]:.3f}",
                   "LRP s": f"{timed['LRP'][0]:.3f}", "time ratio": f"{timed['LRP'][1]:.2f}"}
            if args.against:
                row.update({"before s": f"{timed['before'][0]:.3f}", "before ratio": f"{timed['before'][1]:.2f}"})
            if not args.no_memory:
                script = os.path.abspath(__file__)
                extra = [args.against] if args.against else []
                m_grad = harness.memory_in_subprocess(script, [model_name, "gradient", str(batch), args.device])
                m_lrp = harness.memory_in_subprocess(script, [model_name, method, str(batch), args.device])
                row.update({"gradient MiB": f"{m_grad:.0f}", "LRP MiB": f"{m_lrp:.0f}",
                            "memory ratio": f"{m_lrp / m_grad:.2f}"})
                if args.against:
                    m_old = harness.memory_in_subprocess(script, [model_name, "ref:" + method, str(batch),
                                                                  args.device] + extra)
                    row["before memory ratio"] = f"{m_old / m_grad:.2f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = list(rows[0].keys())
    print()
    print(f"device={args.device} threads={torch.get_num_threads()} clock={args.clock} torch={torch.__version__}")
    print(harness.table(rows, columns))


if __name__ == "__main__":
    main()
