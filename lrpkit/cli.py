"""The ``lrpkit`` command line: ``lrpkit demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    from . import demo

    torch_threads(args.threads)
    start = time.perf_counter()
    results, figure = demo.run(n=args.n, seed=args.seed, vitcx=not args.no_vitcx, out=args.out)
    print()
    print(f"metrics over {args.n} images (mean ± std; ↑ larger is better, ↓ smaller is better):")
    print(demo.format_table(results))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(demo.format_table(results, markdown=True) + "\n")
        print(f"table written to {args.table}")
    print(f"\nfigure written to {figure.resolve()}  ({time.perf_counter() - start:.0f} s in all)")
    return 0


def torch_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lrpkit", description="Layer-wise Relevance Propagation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain generated images with every method on the bundled ViT; "
                                       "write a figure and print the metrics")
    demo.add_argument("--n", type=int, default=16, help="number of generated images (default 16)")
    demo.add_argument("--seed", type=int, default=1000, help="seed of the generated images (default 1000)")
    demo.add_argument("--out", default="lrpkit-out", help="folder for the figure (default lrpkit-out)")
    demo.add_argument("--table", default=None, help="also write the metrics as a markdown table to this file")
    demo.add_argument("--no-vitcx", action="store_true", help="leave out ViT-CX (the slowest method)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
