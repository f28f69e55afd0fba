"""``lrpkit demo``: every explainer on the bundled ViT and generated images; a figure and a metrics table."""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="explain generated images with every method on the bundled ViT; "
                                         "write a figure and print the metrics")
    parser.add_argument("--n", type=int, default=16, help="number of generated images (default 16)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the generated images (default 1000)")
    parser.add_argument("--out", default="lrpkit-out", help="folder for the figure (default lrpkit-out)")
    parser.add_argument("--table", default=None, help="also write the metrics as a markdown table to this file")
    parser.add_argument("--no-vitcx", action="store_true", help="leave out ViT-CX (the slowest method)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .. import demo
    from ._common import torch_threads

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
