"""The transformer explainers' speed against the plain input gradient and one forward pass, in one run.

    uv run python benchmarks/bench_methods.py                 # vit_base_patch16_224, batch 1 and 8
    uv run python benchmarks/bench_methods.py --vitcx         # also ViT-CX's masked forward passes (images/s)

Random weights. Targets (issue 4): TransformerAttribution ≤ 1.5× the input gradient; AttentionRollout ≤ 1.2×
one forward pass; ViT-CX's masked passes batched (images per second reported).
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


def forward_only(model):
    def run(x, target):
        with torch.no_grad():
            return model(x)
    return run


def explainer(cls, model, **kw):
    method = cls(model, **kw)
    return lambda x, target: method(x, target)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vitcx", action="store_true")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = harness.freeze(timm.create_model(args.model, pretrained=False)).to(args.device)
    baselines = {"gradient": harness.input_gradient(model), "forward": forward_only(model)}
    candidates = {"TransformerAttribution": (explainer(methods.TransformerAttribution, model), "gradient"),
                  "AttentionRollout": (explainer(methods.AttentionRollout, model), "forward"),
                  "GradientRollout": (explainer(methods.GradientRollout, model), "gradient")}
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(args.device)
        t = torch.zeros(batch, dtype=torch.long, device=args.device)
        base = {name: harness.time_call(fn, x, t, args.repeats) for name, fn in baselines.items()}
        for name, (fn, against) in candidates.items():
            seconds = harness.time_call(fn, x, t, args.repeats)
            row = {"method": name, "batch": batch, "seconds": f"{seconds:.3f}", "against": against,
                   "baseline s": f"{base[against]:.3f}", "ratio": f"{seconds / base[against]:.2f}"}
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
    print()
    print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(harness.table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
