"""``lrpkit evaluate``: score explainers over many images (generated with ground truth, or a folder of images and
masks); a CSV row per (image, method), a JSON summary, a table and a plot of the perturbation curves. Resumable,
and sharded over processes under ``torchrun``. The engine is :func:`lrpkit.evaluate.runner.run_evaluation`."""

from __future__ import annotations

import sys
import time


def add_parser(sub) -> None:
    from ...evaluate.runner import DEFAULT_METHODS_CNN, DEFAULT_METHODS_VIT

    parser = sub.add_parser(
        "evaluate", help="score explainers (faithfulness and localisation metrics) over many images",
        description="Explain every image with every chosen method and score the heatmaps: perturbation curves "
                    "(ABPC, MoRF, LeRF), deletion/insertion, and against ground-truth masks the pointing game and "
                    "relevance mass/rank accuracy. Results go to --out incrementally; rerunning the same command "
                    "resumes. Under torchrun the images are sharded over the processes.")
    parser.add_argument("--model", default="demo_vit",
                        help="demo_vit, demo_cnn, a supported torchvision CNN or a timm model name (default demo_vit)")
    parser.add_argument("--weights", default=None, help="local weight file (safetensors or a state dict)")
    parser.add_argument("--method", nargs="+", default=None, metavar="M",
                        help="methods to evaluate (names as in lrpkit explain), or 'all'; default for a ViT: "
                             f"{' '.join(DEFAULT_METHODS_VIT)}; for a CNN: {' '.join(DEFAULT_METHODS_CNN)}")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder of images: DIR/images/NAME.png and optional masks DIR/masks/NAME.png "
                             "(nonzero = object); without it, generated images with ground-truth masks")
    parser.add_argument("--n", "--num-images", dest="n", type=int, default=32,
                        help="number of generated images (default 32); under torchrun write --num-images, since "
                             "torchrun's own parser mistakes --n for an abbreviation of its options")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the generated images (default 1000)")
    parser.add_argument("--out", default="lrpkit-out/evaluate", help="output folder (default lrpkit-out/evaluate)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per explainer call (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: cuda if "
                                                         "available, else cpu)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="side of the square regions removed by the perturbation curves (default: the ViT's "
                             "patch; 8 px for other models up to 64 px inputs, else 16)")
    parser.add_argument("--steps", type=int, default=16, help="steps of the MoRF/LeRF curves (default 16)")
    parser.add_argument("--deletion-steps", type=int, default=32, help="steps of deletion/insertion (default 32)")
    parser.add_argument("--method-seed", type=int, default=0, help="seed of SmoothGrad and ViT-CX (default 0)")
    parser.add_argument("--limit", type=int, default=None,
                        help="compute at most this many images in this run, then write the outputs (rerun to go on)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete earlier results in --out and start again (needed when options differ)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages, only the table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ...evaluate.runner import run_evaluation
    from ._common import torch_threads

    torch_threads(args.threads)
    start = time.perf_counter()
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    try:
        result = run_evaluation(
            args.out, model=args.model, weights=args.weights, methods=args.method, n=args.n, seed=args.seed,
            data=args.data, batch_size=args.batch_size, device=args.device, patch_size=args.patch_size,
            steps=args.steps, deletion_steps=args.deletion_steps, method_seed=args.method_seed,
            overwrite=args.overwrite, limit=args.limit, progress=not args.quiet and sys.stderr.isatty(), log=log)
    except KeyboardInterrupt:
        print(f"\nlrpkit evaluate: interrupted; the finished images are saved in {args.out}: rerun the same "
              f"command to resume", file=sys.stderr)
        return 130
    if result.rank != 0:
        return 0
    done, total = len(result.rows), result.total
    print(f"metrics over {result.images} images x {len(result.methods)} methods "
          f"(mean ± std; ↑ larger is better, ↓ smaller is better):")
    print(result.table)
    if not result.complete:
        print(f"\npartial: {done} of {total} (image, method) pairs are done; rerun the same command to go on")
    print(f"\n{result.computed} pairs computed in this run, {result.reused} found in {result.out}"
          + (f", on {result.world} processes" if result.world > 1 else "")
          + f" ({time.perf_counter() - start:.0f} s)")
    for key in ("csv", "summary", "plot", "results"):
        print(f"{key:<8} {result.files[key]}")
    return 0

