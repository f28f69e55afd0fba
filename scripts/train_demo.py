"""Train the demo ViT and CNN on lrpkit.data and write their weights and configs to lrpkit/app/weights/.

    uv run python scripts/train_demo.py [--model vit|cnn|both] [--out lrpkit/app/weights]

Seeded and CPU-only (2 threads unless --threads 1). Training images come from stream ``--train-seed`` (indices
0..n-1), augmented by the 8 flips/rotations of the square (every class is invariant under them); the held-out
accuracy is measured on a separate stream (``--eval-seed``). Each model is saved as NAME.safetensors plus
NAME.json: the architecture config that lrpkit.models builds from, and a record of the training (data, steps,
held-out accuracy, time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lrpkit.data import CLASS_NAMES, make_dataset, normalize
from lrpkit.models import build_model

CONFIGS = {
    "demo_vit": {
        "arch": "timm_vit",
        "kwargs": {"img_size": 64, "patch_size": 8, "in_chans": 3, "num_classes": len(CLASS_NAMES),
                   "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True,
                   "class_token": True, "global_pool": "token"},
        "train": {"steps": 1500, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup": 100},
    },
    "demo_cnn": {
        "arch": "sequential_cnn",
        "kwargs": {"in_chans": 3, "channels": [8, 16, 32, 64], "num_classes": len(CLASS_NAMES)},
        "train": {"steps": 600, "batch_size": 128, "lr": 3e-3, "weight_decay": 1e-4, "warmup": 50},
    },
}


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply element k[i] in {0..7} of the square's symmetry group to image i (rotation by 90°·(k mod 4), then a
    horizontal flip when k >= 4)."""
    out = torch.empty_like(x)
    for g in range(8):
        idx = (k == g).nonzero(as_tuple=True)[0]
        if idx.numel():
            t = torch.rot90(x[idx], g % 4, dims=(-2, -1))
            out[idx] = t.flip(-1) if g >= 4 else t
    return out


@torch.no_grad()
def accuracy(model, images, labels, batch_size=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(normalize(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train(name: str, data, held_out, seed: int, out: Path, steps: int | None = None) -> dict:
    cfg = json.loads(json.dumps(CONFIGS[name]))
    hp = cfg["train"]
    if steps is not None:
        hp["steps"] = steps
    torch.manual_seed(seed)
    model = build_model(cfg)
    images, labels = data
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(hp["steps"]):
        # linear warm-up, then cosine decay to zero
        lr = hp["lr"] * min(1.0, (step + 1) / hp["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / hp["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        idx = torch.randint(len(images), (hp["batch_size"],), generator=gen)
        x = dihedral(images[idx], torch.randint(8, (len(idx),), generator=gen))
        loss = F.cross_entropy(model(normalize(x)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == hp["steps"]:
            print(f"{name} step {step + 1}/{hp['steps']} loss {loss.item():.4f} lr {lr:.2e} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - t0
    acc = accuracy(model, *held_out)
    print(f"{name}: held-out accuracy {acc:.4f} on {len(held_out[0])} images, trained in {seconds:.0f} s",
          flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    cfg["record"] = {"train_seed": seed, "train_images": len(images), "held_out_accuracy": acc,
                     "held_out_images": len(held_out[0]), "train_seconds": round(seconds, 1),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "normalization": "lrpkit.data.normalize",
                     "class_names": list(CLASS_NAMES)}
    (out / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg["record"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["vit", "cnn", "both"], default="both")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "lrpkit" / "app" / "weights")
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--threads", type=int, default=2, choices=[1, 2],
                   help="torch CPU threads (1 can be faster on a machine shared with other jobs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t = time.time()
    images, labels, _ = make_dataset(args.n_train, seed=args.train_seed)
    held_images, held_labels, _ = make_dataset(args.n_eval, seed=args.eval_seed)
    print(f"generated {args.n_train} training and {args.n_eval} held-out images in {time.time() - t:.0f} s")
    names = {"vit": ["demo_vit"], "cnn": ["demo_cnn"], "both": ["demo_vit", "demo_cnn"]}[args.model]
    for name in names:
        train(name, (images, labels), (held_images, held_labels), args.train_seed, args.out, args.steps)


if __name__ == "__main__":
    main()
