"""Demo models trained on :mod:`lrpkit.data`, and a safe local weight loader.

The shipped weights live in ``lrpkit/app/weights/``: for each model ``NAME.safetensors`` (the state dict) and
``NAME.json`` (the architecture config and the training record written by ``scripts/train_demo.py``). The JSON
file is the single source of truth for the architecture; the builders here turn it into a module.

Both models take images normalised with :func:`lrpkit.data.normalize` (inputs in [0, 1], then
(x - MEAN) / STD) and return logits over :data:`lrpkit.data.CLASS_NAMES`. Nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "WEIGHTS_DIR",
    "build_demo_vit",
    "build_demo_cnn",
    "build_model",
    "load_config",
    "load_weights",
    "load_demo_vit",
    "load_demo_cnn",
]

#: Folder of the shipped demo weights and configs.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def build_demo_vit(config: dict) -> nn.Module:
    """A timm ``VisionTransformer`` built from ``config["kwargs"]`` (randomly initialised).

    ``config`` is the content of ``demo_vit.json``: ``{"arch": "timm_vit", "kwargs": {...}}`` where the kwargs
    are passed unchanged to ``timm.models.vision_transformer.VisionTransformer``.
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**config["kwargs"])


def build_demo_cnn(config: dict) -> nn.Sequential:
    """A plain ``nn.Sequential`` CNN built from ``config["kwargs"]`` (randomly initialised).

    For each width c_k in ``channels``: Conv2d(3×3, padding 1) → BatchNorm2d → ReLU, followed by MaxPool2d(2)
    for all but the last block; then AdaptiveAvgPool2d(1) → Flatten → Linear(c_last, num_classes).
    Only flat, standard layers, so LRP canonization (BatchNorm fusion) applies directly.
    """
    kw = config["kwargs"]
    layers: list[nn.Module] = []
    c_in = int(kw.get("in_chans", 3))
    channels = [int(c) for c in kw["channels"]]
    for k, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        if k < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, int(kw["num_classes"]))]
    return nn.Sequential(*layers)


_BUILDERS = {"timm_vit": build_demo_vit, "sequential_cnn": build_demo_cnn}


def build_model(config: dict) -> nn.Module:
    """Build the (untrained) module described by a demo config, dispatching on ``config["arch"]``."""
    arch = config.get("arch")
    if arch not in _BUILDERS:
        raise ValueError(f"unknown demo architecture {arch!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[arch](config)


def load_config(name: str, weights_dir: str | Path | None = None) -> dict:
    """Read ``NAME.json`` from the weights folder (default :data:`WEIGHTS_DIR`)."""
    path = Path(weights_dir or WEIGHTS_DIR) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"demo model config not found: {path}")
    return json.loads(path.read_text())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # weights_only=True: tensors and plain containers only, never arbitrary pickled code.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a plain state dict; lrpkit never unpickles arbitrary objects "
                         f"(torch.load with weights_only=True refused it: {first})") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _first(items: list[str], n: int = 10, sep: str = ", ") -> str:
    """``[a, b, ...]`` with at most ``n`` items and the count of the rest (a wrong checkpoint of a large model
    would otherwise make an error message of thousands of characters)."""
    more = f"{sep}... ({len(items) - n} more)" if len(items) > n else ""
    return "[" + sep.join(items[:n]) + more + "]"


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights from a local file into ``model`` in place and return it.

    ``.safetensors`` files are read with safetensors; any other file with
    ``torch.load(path, weights_only=True)`` (a state dict, or a dict holding one under ``"state_dict"``), so no
    pickled code is ever executed. Tensors are copied to the device and dtype of the model's own parameters.
    With ``strict`` (default) every key must match in name and shape; otherwise a ``ValueError`` names the file
    and lists the missing keys, the unexpected keys and the shape mismatches. With ``strict=False`` missing and
    unexpected keys are ignored, but shape mismatches are still an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {_first([repr(k) for k in missing])}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_first([repr(k) for k in unexpected])}")
    if shapes:
        problems.append(f"shape mismatches {_first(shapes, sep='; ')}")
    if problems:
        raise ValueError(f"weights in {path} do not fit {type(model).__name__}: " + ", ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
    return model


def _load_demo(name: str) -> nn.Module:
    config = load_config(name)
    model = build_model(config)
    load_weights(model, WEIGHTS_DIR / f"{name}.safetensors")
    return model.eval()


def load_demo_vit() -> nn.Module:
    """The demo timm ViT (patch 8 on 64×64 inputs, class token) trained on :mod:`lrpkit.data`, in eval mode.

    Inputs: ``lrpkit.data.normalize(images)`` with images in [0, 1], shape (B, 3, 64, 64); outputs logits over
    ``lrpkit.data.CLASS_NAMES``. Architecture in ``weights/demo_vit.json``.
    """
    return _load_demo("demo_vit")


def load_demo_cnn() -> nn.Sequential:
    """The demo ``nn.Sequential`` CNN trained on :mod:`lrpkit.data`, in eval mode.

    Inputs: ``lrpkit.data.normalize(images)`` with images in [0, 1], shape (B, 3, H, W) (trained at 64×64;
    global average pooling accepts other sizes); outputs logits over ``lrpkit.data.CLASS_NAMES``.
    Architecture in ``weights/demo_cnn.json``.
    """
    return _load_demo("demo_cnn")
