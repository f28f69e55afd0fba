"""``lrpkit concepts``: the concepts (channels of a layer) a model used for each image, where, and what they look
like.

For each image it writes ``OUT/NAME.png``: one row per concept, the K concepts with the largest relevance at
``--layer`` for the explained class (CRP's ``TopConcepts``), each shown as its conditional heatmap over the image,
titled with its channel and its share of the relevance at the layer,

$$\\text{share}_c = \\frac{R_c}{\\sum_{c'} R_{c'}}, \\qquad R_c = \\sum_p R_{c,p},$$

(R_{c,p}: the relevance of channel c at position p of the layer; the sum over all channels is all the relevance
that reaches the layer). With ``--reference-data DIR`` each row goes on with the concept's reference samples in
that folder (:func:`lrpkit.crp.reference_samples`, relevance maximisation): their crops with their conditional
heatmaps. The scan is cached in ``OUT/reference-cache`` (a rerun reuses it). ``OUT/concepts.json`` lists every
image's concepts with their relevance and share.

Reference: Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
Relevance Propagation", Nature Machine Intelligence 5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.data import Dataset

_EXAMPLES = """examples:
  lrpkit concepts img.png --model demo_cnn --layer 12 --top 4
  lrpkit concepts photos/ --model vgg16 --weights vgg16.pth --layer features.28 --top 5 \\
      --reference-data imagenet-val-subset/ --reference-k 8 --out runs/concepts
"""


def add_parser(sub) -> None:
    """Add the ``concepts`` subcommand to the subparsers ``sub``; its ``func`` is :func:`run`."""
    import argparse

    parser = sub.add_parser(
        "concepts", help="the K most relevant concepts of a layer per image: conditional heatmaps, reference crops",
        description="Concept Relevance Propagation: for each IMAGE, the K channels of --layer with the largest\n"
                    "relevance for the explained class, each as its conditional heatmap with its share of the\n"
                    "relevance; with --reference-data, also each concept's reference samples from that folder.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (anything Pillow reads) or folders (their image files, sorted)")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="demo_vit, demo_cnn, a torchvision CNN (vgg*, resnet*) or any timm model name")
    parser.add_argument("--weights", metavar="FILE", help="local weights: .safetensors or a state-dict file "
                        "(no pickled code runs); without it timm and torchvision models have random weights")
    parser.add_argument("--layer", required=True, metavar="PATH",
                        help="module path of the layer in the model, as in model.named_modules() (e.g. "
                             "features.28, layer4, blocks.5.mlp.fc1)")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="concepts per image (default 5)")
    parser.add_argument("--target", default=None, metavar="T",
                        help="class to explain: an index or a class name (default: each image's predicted class)")
    parser.add_argument("--reference-data", default=None, metavar="DIR",
                        help="folder of images (or DIR/images/) to find each concept's reference samples in")
    parser.add_argument("--reference-k", type=int, default=6, metavar="N",
                        help="reference samples per concept (default 6)")
    parser.add_argument("--out", default="lrpkit-out/concepts", metavar="DIR",
                        help="output folder (default lrpkit-out/concepts)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per pass (default 8)")
    parser.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda, cuda:N, mps, or auto")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of random weights (default 0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    parser.set_defaults(func=run)


def _usage_error(message: str):
    from ..cli import UsageError

    return UsageError(message)


def _check_options(args) -> None:
    for name in ("top", "reference_k", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise _usage_error(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if args.threads is not None and args.threads < 1:
        raise _usage_error(f"--threads must be a positive int, got {args.threads}")
    if args.reference_data is not None and not Path(args.reference_data).is_dir():
        raise FileNotFoundError(f"--reference-data folder not found: {args.reference_data}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--out {out} is a file; give a folder (it is created when missing)")


class _ImageFiles(Dataset):
    """The images of a folder as a torch Dataset of normalised model inputs (``x01`` on request)."""

    def __init__(self, folder: Path, prep):
        from .explain import image_paths

        inner = folder / "images"
        self.paths = image_paths([str(inner if inner.is_dir() else folder)])
        self.prep = prep

    def __len__(self) -> int:
        return len(self.paths)

    def x01(self, i: int):
        return self.prep.load(self.paths[i])

    def __getitem__(self, i: int):
        return self.prep.normalize(self.x01(i))


def concept_shares(lrp, layer, x, target, channels):
    """``(share, total)``: the relevance of each chosen channel at ``layer`` (B, K) over the total relevance at the
    layer (B,), and that total, from the relevance at the layer's output (:func:`lrpkit.crp.probe.layer_relevance`)."""
    from ...crp.locate import locate
    from ...crp.probe import channel_maps, layer_relevance, tokens_layout

    ref = locate(lrp, layer)
    R, _ = layer_relevance(lrp, ref, x, target)
    per_channel = channel_maps(R, tokens_layout(lrp, R)).sum(-1)  # (B, C): R_c = Σ_p R_{c,p}
    total = per_channel.sum(1)
    chosen = per_channel.gather(1, channels.to(per_channel.device))
    return chosen / total.masked_fill(total == 0, 1.0)[:, None], total


def _references(args, lrp, data: _ImageFiles, out: Path):
    """The reference scan over ``--reference-data`` (every channel, cached in ``OUT/reference-cache``)."""
    from ...crp import reference_samples

    return reference_samples(lrp, data, args.layer, k=args.reference_k, mode="relevance",
                             batch_size=args.batch_size, cache=out / "reference-cache",
                             progress=sys.stderr.isatty())


def _reference_panels(lrp, args, refs, data, channels: list[int], device):
    """For each channel: its reference images (x01) and their conditional heatmaps of that concept."""
    import torch

    from ...crp import CRP, IndexedConcepts

    images, heatmaps = [], []
    for c in channels:
        row = refs.row(c)
        idx = refs.indices[row].tolist()
        x01 = torch.stack([data.x01(i) for i in idx])
        crp = CRP(lrp, layer=args.layer, concepts=IndexedConcepts(c))
        expl = crp(torch.stack([data[i] for i in idx]).to(device))  # each reference's own predicted class
        images.append(list(x01))
        heatmaps.append(list(expl.relevance[:, 0].detach().sum(1).cpu()))
    return images, heatmaps


def run(args) -> int:
    """Run ``lrpkit concepts`` for parsed ``args``; returns the exit status (0)."""
    import torch

    from ... import LRP
    from .. import viz, zoo
    from ._common import load_model, torch_threads
    from .explain import image_paths, output_names, resolve_device, resolve_target

    _check_options(args)
    torch_threads(args.threads)
    paths = image_paths(args.images)
    device = resolve_device(args.device)
    out = Path(args.out)
    model, prep = load_model(args, device)
    lrp = LRP(model)
    layer = args.layer
    count = _channel_count(lrp, layer, prep.normalize(prep.load(paths[0]))[None].to(device))
    if args.top > count:
        raise _usage_error(f"--top {args.top} is larger than the {count} channels of layer {layer}")
    data = _ImageFiles(Path(args.reference_data), prep) if args.reference_data is not None else None
    if data is not None and args.reference_k > len(data):
        raise _usage_error(f"--reference-k {args.reference_k} is larger than the {len(data)} images in "
                           f"{args.reference_data}")
    labels = zoo.class_names(args.model, model)
    out.mkdir(parents=True, exist_ok=True)  # the checks passed: start writing
    refs = _references(args, lrp, data, out) if data is not None else None
    from ...crp import CRP, TopConcepts  # the CRP analyzer

    crp = CRP(lrp, layer=layer, concepts=TopConcepts(args.top))

    names, rows = output_names(paths), []
    for start in range(0, len(paths), args.batch_size):
        batch_paths = paths[start:start + args.batch_size]
        x01 = torch.stack([prep.load(p) for p in batch_paths])
        x = prep.normalize(x01).to(device)
        if start == 0:
            with torch.no_grad():
                classes = model(x[:1]).shape[1]
            target = resolve_target(args.target, classes, labels, args.model)
        expl = crp(x, target)  # the K concepts of each image and their conditional heatmaps
        share, total = concept_shares(lrp, layer, x, expl.target, expl.concepts)
        for b, path in enumerate(batch_paths):
            name = names[start + b]
            channels = expl.concepts[b].tolist()
            titles = [f"channel {c}\n{float(s):.0%}" for c, s in zip(channels, share[b])]
            kwargs = {}
            if refs is not None:
                kwargs["references"], kwargs["heatmaps"] = _reference_panels(lrp, args, refs, data, channels, device)
                kwargs["boxes"] = refs.boxes[[refs.row(c) for c in channels]]
                kwargs["column_titles"] = ["image"] + [f"reference {j + 1}" for j in range(refs.k)]
            png = viz.concept_grid(path=out / f"{name}.png", image=x01[b],
                                   image_heatmaps=expl.relevance[b].detach().sum(1).cpu(), row_titles=titles,
                                   **kwargs)
            t = int(expl.target[b])
            rows.append({"image": str(path), "name": name, "target": t,
                         "target_name": labels[t] if labels else None, "layer": str(layer), "png": str(png),
                         "layer_relevance": float(total[b]),
                         "concepts": [{"channel": c, "relevance": float(r), "share": float(s)} for c, r, s in
                                      zip(channels, expl.concept_relevance[b].tolist(), share[b].tolist())],
                         "references": ([refs.indices[refs.row(c)].tolist() for c in channels]
                                        if refs is not None else None)})
            shown = ", ".join(f"{c} ({float(s):.0%})" for c, s in zip(channels, share[b]))
            print(f"{path}: class {t}{' ' + repr(labels[t]) if labels else ''}, concepts {shown} -> {png}",
                  flush=True)
    summary = out / "concepts.json"
    summary.write_text(json.dumps({"model": args.model, "weights": args.weights, "layer": str(layer),
                                   "top": args.top, "reference_data": args.reference_data,
                                   "reference_images": [str(p) for p in data.paths] if data is not None else None,
                                   "images": rows}, indent=2) + "\n")
    print(f"{len(paths)} image(s) written under {out}; summary in {summary}")
    return 0


def _channel_count(lrp, layer, x) -> int:
    """The number of channels (concepts) of ``layer``; an unknown layer is an error (naming the choices)."""
    from ...crp.locate import locate
    from ...crp.probe import layer_activation, tokens_layout

    value = layer_activation(lrp, locate(lrp, layer), x)
    return value.shape[-1] if tokens_layout(lrp, value) else value.shape[1]
