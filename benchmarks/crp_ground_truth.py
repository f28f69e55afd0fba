"""Concept Relevance Propagation on the ground-truth data: do a class's concepts find that class, and does their
heatmap lie on the object?

    uv run python benchmarks/crp_ground_truth.py                       # demo CNN and ViT, 1000 scanned images
    uv run python benchmarks/crp_ground_truth.py --scan 2000 --table docs/crp-ground-truth-table.md

The bundled demo models (:mod:`lrpkit.app.models`) classify generated images (:mod:`lrpkit.app.data`) by the shape
of their one red object, whose pixel mask is known. For each model, at a late layer (CNN: ``12``, the last
convolution; ViT: ``blocks.2``, the residual stream after the third of four blocks), and for every class y:

1. the *top concept* c_y of class y: the channel with the largest mean relevance R_c = Σ_p R_{c,p} at the layer
   over the held-out images predicted as y, explaining y (LRP with the model's default composite);
2. its 16 reference samples among ``--scan`` other images (:func:`lrpkit.crp.reference_samples`, each image
   explaining its predicted class) by relevance maximisation and by activation maximisation; reported: the share
   that belong to class y (chance: 1/6), and the share of a reference crop's pixels that are object pixels (for
   whole images, the object's area share: printed as the baseline);
3. (needs the CRP analyzer, ``lrpkit.crp.CRP``) the relevance mass accuracy (Arras et al. 2022) on the object mask
   of c_y's conditional heatmap, over the held-out images of class y predicted as y, against plain LRP's heatmap.

Reference: Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
Relevance Propagation", Nature Machine Intelligence 5.
"""

from __future__ import annotations

import argparse
import time

import torch

import lrpkit
from lrpkit.app import data, models
from lrpkit.crp import reference_samples
from lrpkit.crp.locate import locate
from lrpkit.crp.probe import channel_maps, layer_relevance, tokens_layout
from lrpkit.evaluate import relevance_mass_accuracy

LAYERS = {"demo_cnn": "12", "demo_vit": "blocks.2"}


def top_concepts(lrp, layer, x, batch=64) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted (N,), per-channel relevance R_c (N, C)) explaining each image's predicted class."""
    ref = locate(lrp, layer)
    preds, per = [], []
    for i in range(0, len(x), batch):
        R, t = layer_relevance(lrp, ref, x[i:i + batch])
        per.append(channel_maps(R, tokens_layout(lrp, R)).sum(-1))
        preds.append(t)
    return torch.cat(preds), torch.cat(per)


def crop_precision(result, masks: torch.Tensor) -> torch.Tensor:
    """(K, k): the share of each reference crop's pixels that are object pixels of its image."""
    out = torch.zeros(result.indices.shape, dtype=torch.float64)
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            y0, x0, y1, x1 = result.boxes[r, j].tolist()
            out[r, j] = masks[result.indices[r, j], y0:y1, x0:x1].double().mean()
    return out


def heatmap_mass(lrp, layer, x, masks, y, channel) -> tuple[float, float] | None:
    """Mean relevance mass accuracy of concept ``channel``'s conditional heatmap and of LRP's, or None without the
    CRP analyzer."""
    try:
        from lrpkit.crp import CRP, IndexedConcepts
    except ImportError:
        return None
    crp = CRP(lrp, layer=layer, concepts=IndexedConcepts(channel))
    concept = crp(x, target=y).relevance[:, 0].sum(1)
    plain = lrp(x, y).heatmap
    return (float(relevance_mass_accuracy(concept, masks).nanmean()),
            float(relevance_mass_accuracy(plain, masks).nanmean()))


def evaluate(name: str, args) -> list[dict]:
    model = models.load_demo_cnn() if name == "demo_cnn" else models.load_demo_vit()
    lrp, layer = lrpkit.LRP(model), LAYERS[name]
    held_x01, held_y, held_m = data.make_dataset(args.held_out, seed=args.seed + 1)
    scan_x01, scan_y, scan_m = data.make_dataset(args.scan, seed=args.seed)
    held = data.normalize(held_x01)
    predicted, per = top_concepts(lrp, layer, held)
    classes = range(len(data.CLASS_NAMES))
    concepts = [int(per[predicted == y].mean(0).argmax()) for y in classes]
    scan = torch.utils.data.TensorDataset(data.normalize(scan_x01), scan_y)
    found = {mode: reference_samples(lrp, scan, layer, concepts=sorted(set(concepts)), k=args.k, mode=mode,
                                     statistic=args.statistic, batch_size=args.batch, progress=False)
             for mode in ("relevance", "activation")}
    rows = []
    for y, c in zip(classes, concepts):
        row = {"model": name, "layer": layer, "class": data.CLASS_NAMES[y], "concept": c}
        for mode, result in found.items():
            r = result.row(c)
            row[f"{mode}_share"] = float((result.labels[r] == y).double().mean())
            row[f"{mode}_crop"] = float(crop_precision(result, scan_m)[r].mean())
        chosen = ((held_y == y) & (predicted == y)).nonzero()[:, 0][: args.mass_images]
        mass = heatmap_mass(lrp, layer, held[chosen], held_m[chosen], y, c) if len(chosen) else None
        row["crp_mass"], row["lrp_mass"] = mass if mass is not None else (None, None)
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    cols = [("model", "model"), ("layer", "layer"), ("class", "class"), ("concept", "top concept"),
            ("relevance_share", "class share, relevance"), ("activation_share", "class share, activation"),
            ("relevance_crop", "object share of crop, relevance"),
            ("activation_crop", "object share of crop, activation"),
            ("crp_mass", "mass on object, CRP"), ("lrp_mass", "mass on object, LRP")]
    lines = ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    by_model: dict = {}
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k]) for k, _ in cols) + " |")
        by_model.setdefault(row["model"], []).append(row)
    for name, group in by_model.items():
        mean = {k: (sum(r[k] for r in group) / len(group) if all(r[k] is not None for r in group) else None)
                for k, _ in cols[4:]}
        lines.append("| " + " | ".join([f"**{name}**", group[0]["layer"], "**mean**", ""]
                                       + [f"**{_fmt(mean[k])}**" for k, _ in cols[4:]]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--scan", type=int, default=1000, help="images scanned for reference samples")
    parser.add_argument("--held-out", type=int, default=300, help="images that choose each class's top concept")
    parser.add_argument("--mass-images", type=int, default=32, help="images per class for the heatmap mass")
    parser.add_argument("--k", type=int, default=16, help="reference samples per concept")
    parser.add_argument("--seed", type=int, default=2000, help="seed of the scanned images (held out: seed + 1)")
    parser.add_argument("--statistic", default="max", choices=("max", "sum"),
                        help="rank by the maximum (default) or the sum over the positions")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        start = time.perf_counter()
        rows += evaluate(name, args)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    _, _, masks = data.make_dataset(args.scan, seed=args.seed)
    text = table(rows) + f"\n\nObject share of the whole image (the crop baseline): {masks.double().mean():.2f}."
    print(text)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
