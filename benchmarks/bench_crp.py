"""CRP against separate LRP calls, side by side in one run (issue 15).

    uv run python benchmarks/bench_crp.py                       # VGG16 features.28, K = 8, batch 1 and 8
    uv run python benchmarks/bench_crp.py --batch 8 --repeats 3 --warmup 1

torchvision VGG16 with random weights, ``EpsilonPlusFlat``, 224×224 inputs. One round times ``--lrp-calls`` (= K)
separate ``LRP`` calls and one ``CRP`` call with ``TopConcepts(K)`` at ``--layer`` on the same batch; the ratio is
the median of the per-round ratios CRP / (K LRP calls) (:func:`harness.time_rounds`). ``--with-memory`` adds the peak
memory of one CRP call and of one LRP call, each in a fresh process. Target: ratio ≤ 0.6 at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import lrpkit  # noqa: E402


def build(layer: str, k: int, batch_size: int):
    import torchvision

    torch.manual_seed(0)
    model = harness.freeze(torchvision.models.vgg16())
    lrp = lrpkit.LRP(model, lrpkit.presets.EpsilonPlusFlat())
    return lrp, lrpkit.CRP(lrp, layer, lrpkit.crp.TopConcepts(k), batch_size=batch_size)


def inputs(batch: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    return x, torch.zeros(batch, dtype=torch.long, device=device)


def functions(lrp, crp, calls: int) -> dict:
    def lrp_calls(x, target):
        return [lrp(x, target).relevance for _ in range(calls)]

    def crp_call(x, target):
        return crp(x, target).relevance

    return {"LRP": lrp_calls, "CRP": crp_call}


def memory_main(method, layer, k, batch_size, batch, device):
    lrp, crp = build(layer, int(k), int(batch_size))
    lrp.chain.to(device)
    x, t = inputs(int(batch), device)
    fn = (lambda x, t: lrp(x, t).relevance) if method == "LRP" else (lambda x, t: crp(x, t).relevance)
    print(json.dumps(harness.peak_memory_mib(fn, x, t)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="features.28")
    parser.add_argument("--k", type=int, default=8, help="concepts per sample (TopConcepts)")
    parser.add_argument("--lrp-calls", type=int, default=None, help="LRP calls to compare with (default: k)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-size", type=int, default=32, help="CRP's batch_size")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=1, help="consecutive calls per method and round, the last one "
                        "timed")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--with-memory", action="store_true", help="also the peak memory of one call of each")
    parser.add_argument("--memory", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_main(*args.memory)

    calls = args.lrp_calls or args.k
    lrp, crp = build(args.layer, args.k, args.batch_size)
    lrp.chain.to(args.device)
    fns = functions(lrp, crp, calls)
    rows = []
    for batch in args.batch:
        x, t = inputs(batch, args.device)
        timed = harness.time_rounds(fns, x, t, args.repeats, args.calls, args.warmup)
        row = {"layer": args.layer, "K": args.k, "batch": batch, f"{calls}× LRP s": f"{timed['LRP'][0]:.2f}",
               "CRP s": f"{timed['CRP'][0]:.2f}", "time ratio": f"{timed['CRP'][1]:.2f}"}
        if args.with_memory:
            script, common = os.path.abspath(__file__), [args.layer, str(args.k), str(args.batch_size)]
            m_lrp = harness.memory_in_subprocess(script, ["LRP", *common, str(batch), args.device])
            m_crp = harness.memory_in_subprocess(script, ["CRP", *common, str(batch), args.device])
            row.update({"LRP MiB": f"{m_lrp:.0f}", "CRP MiB": f"{m_crp:.0f}"})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"CRP batch_size={args.batch_size}")
    print(harness.table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
