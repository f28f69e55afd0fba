"""Models, preprocessing and explainers by name: what ``lrpkit explain`` and ``lrpkit evaluate`` build from their
options, usable from Python too.

- :func:`load_model` builds a model by name (a timm model, a supported torchvision CNN, or the bundled demo models
  ``demo_vit`` / ``demo_cnn``) with random weights, then loads a local weight file when given one (safetensors, or
  a state dict read with ``torch.load(weights_only=True)``, so no pickled code runs). Nothing is downloaded.
- :class:`Preprocess` turns an image file into the model's input: resizing and cropping from the model's timm data
  config (torchvision: the ImageNet convention; demo models: 64×64 and :func:`lrpkit.data.normalize`).
- :data:`METHODS` and :func:`make_method` name every explainer of the library with a short command-line name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import methods, presets
from .analyzer import LRP
from .rules import ZBoxRule

__all__ = ["DEMO_MODELS", "TORCHVISION_MODELS", "METHODS", "Preprocess", "load_model", "make_method",
           "model_names_like"]

#: The bundled demo models (:mod:`lrpkit.models`).
DEMO_MODELS = ("demo_vit", "demo_cnn")

#: The torchvision CNNs that :func:`lrpkit.canonize` supports.
TORCHVISION_MODELS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                      "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input.

    ``load(path)`` reads an image file as RGB, resizes its shorter side to ``resize`` pixels (``interpolation``)
    and center-crops it to ``size`` (H, W), giving ``x01`` in [0, 1] of shape (3, H, W);
    ``normalize(x01) = (x01 - mean) / std`` per channel gives the model's input. The two steps are separate
    because perturbation metrics perturb in [0, 1] pixel space.
    """

    size: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def load(self, path: str | Path) -> torch.Tensor:
        """The image at ``path`` as a (3, H, W) float tensor in [0, 1], resized and center-cropped."""
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms import functional as F
        from torchvision.transforms import InterpolationMode

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {path} as an image ({err}); give a PNG, JPEG or other file "
                             f"that Pillow can open") from err
        mode = InterpolationMode(self.interpolation)
        x = F.pil_to_tensor(image).float() / 255
        x = F.resize(x, self.resize, interpolation=mode, antialias=True)
        return F.center_crop(x, list(self.size)).clamp(0, 1)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(x01 - mean) / std over the channel dimension (dim -3)."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        return (x01 - mean) / std

    @classmethod
    def from_timm(cls, model: nn.Module) -> "Preprocess":
        """From timm's data config of ``model`` (``input_size``, ``crop_pct``, ``interpolation``, ``mean``,
        ``std``): resize to ``floor(size / crop_pct)``, then center-crop, as timm's eval transform does."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        size = tuple(int(s) for s in cfg["input_size"][1:])
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        return cls(size=size, resize=int(size[0] / crop_pct), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=cfg.get("interpolation") or "bicubic")


def model_names_like(name: str, n: int = 5) -> list[str]:
    """Up to ``n`` known model names close to ``name`` (for error messages)."""
    import timm

    known = list(DEMO_MODELS) + list(TORCHVISION_MODELS) + timm.list_models()
    return difflib.get_close_matches(name, known, n=n, cutoff=0.6)


def _num_classes_in(weights: Path, model_name: str) -> int | None:
    """The number of classes of the classifier stored in a weight file (its last 2-d ``*.weight`` whose name
    says head/fc/classifier), or None when the file does not say."""
    from .models import _read_state_dict

    state = _read_state_dict(weights)
    heads = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2
             and any(part in k for part in ("head", "fc", "classifier"))]
    return int(state[heads[-1]].shape[0]) if heads else None


def load_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
               ) -> tuple[nn.Module, Preprocess]:
    """Build the model called ``name`` in eval mode and its :class:`Preprocess`.

    ``name`` is ``demo_vit`` / ``demo_cnn`` (trained weights shipped with lrpkit), a torchvision CNN in
    :data:`TORCHVISION_MODELS`, or any timm model name (``timm.list_models()``). Without ``weights`` the timm and
    torchvision models have random weights. ``weights`` is a local file loaded with
    :func:`lrpkit.models.load_weights` (strict: names and shapes must fit). ``num_classes`` defaults to the size of
    the classifier in the weight file, else to the architecture's default.
    """
    from . import data, models

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
    if name in DEMO_MODELS:
        model = models.load_demo_vit() if name == "demo_vit" else models.load_demo_cnn()
        prep = Preprocess(size=(64, 64), resize=64, mean=data.MEAN, std=data.STD, interpolation="bilinear")
    else:
        if num_classes is None and weights is not None:
            num_classes = _num_classes_in(weights, name)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if name in TORCHVISION_MODELS:
            import torchvision

            model = torchvision.models.get_model(name, weights=None, **kwargs)
            prep = Preprocess(size=(224, 224), resize=256, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                              interpolation="bilinear")
        else:
            import timm

            if not timm.is_model(name):
                like = model_names_like(name)
                hint = f"; did you mean {', '.join(like)}?" if like else ""
                raise ValueError(f"unknown model name {name!r}: not a bundled demo model, a supported torchvision "
                                 f"CNN or a timm model{hint} (list timm's with timm.list_models())")
            model = timm.create_model(name, pretrained=False, **kwargs)
            prep = Preprocess.from_timm(model)
    if weights is not None:
        models.load_weights(model, weights)
    return model.eval(), prep


def _lrp(composite: Callable) -> Callable:
    return lambda model, prep, seed: LRP(model, composite(prep) if composite else None)


def _box(prep: Preprocess):
    """EpsilonGammaBox with the z^B bounds of pixel values 0 and 1 after normalisation."""
    low = ((0.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(1, 3, 1, 1)
    high = ((1.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(1, 3, 1, 1)
    return presets.EpsilonGammaBox(low, high)


#: Command-line name → (description, factory(model, preprocess, seed) → explainer(x, target) → Explanation).
METHODS: dict[str, tuple[str, Callable]] = {
    "lrp": ("LRP with lrpkit's default composite (CP-LRP on transformers, EpsilonPlusFlat otherwise)", _lrp(None)),
    "cplrp": ("LRP, CP-LRP preset with ε (transformers)", _lrp(lambda p: presets.CPLRP())),
    "cplrp-gamma": ("LRP, CP-LRP preset with γ = 0.25 (transformers)", _lrp(lambda p: presets.CPLRP(gamma=0.25))),
    "attnlrp": ("LRP, AttnLRP preset (transformers)", _lrp(lambda p: presets.AttnLRP())),
    "epsilon-plus": ("LRP, EpsilonPlus preset", _lrp(lambda p: presets.EpsilonPlus())),
    "epsilon-plus-flat": ("LRP, EpsilonPlusFlat preset", _lrp(lambda p: presets.EpsilonPlusFlat())),
    "epsilon-alpha2-beta1": ("LRP, EpsilonAlpha2Beta1 preset", _lrp(lambda p: presets.EpsilonAlpha2Beta1())),
    "epsilon-gamma-box": ("LRP, EpsilonGammaBox preset with the bounds of pixel values [0, 1]", _lrp(_box)),
    "transformer-attribution": ("Chefer et al. 2021, transformer attribution",
                                lambda m, p, s: methods.TransformerAttribution(m)),
    "partial-lrp": ("Voita et al. 2019, partial LRP (last block's heads)", lambda m, p, s: methods.PartialLRP(m)),
    "rollout": ("Abnar & Zuidema 2020, attention rollout", lambda m, p, s: methods.AttentionRollout(m)),
    "gradient-rollout": ("attention rollout weighted by gradients", lambda m, p, s: methods.GradientRollout(m)),
    "raw-attention": ("the last block's class-token attention", lambda m, p, s: methods.RawAttention(m)),
    "attention-gradcam": ("Grad-CAM on the last block's attention", lambda m, p, s: methods.AttentionGradCAM(m)),
    "generic-attention": ("Chefer et al. 2021b, generic attention explainability",
                          lambda m, p, s: methods.GenericAttention(m)),
    "gradient": ("the input gradient", lambda m, p, s: methods.Gradient(m)),
    "input-x-gradient": ("input × gradient", lambda m, p, s: methods.InputXGradient(m)),
    "smoothgrad": ("SmoothGrad, 16 noisy samples", lambda m, p, s: methods.SmoothGrad(m, n=16, seed=s)),
    "integrated-gradients": ("integrated gradients, 16 steps, zero baseline",
                             lambda m, p, s: methods.IntegratedGradients(m, steps=16)),
    "vitcx": ("ViT-CX, Xie et al. 2023", lambda m, p, s: methods.ViTCX(m, seed=s, progress=False)),
}


def make_method(name: str, model: nn.Module, prep: Preprocess, seed: int = 0) -> Callable:
    """The explainer called ``name`` in :data:`METHODS`, built for ``model``: ``explainer(x, target)`` returns an
    :class:`~lrpkit.Explanation` whose ``heatmap`` is (B, H, W)."""
    if name not in METHODS:
        like = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" (did you mean {', '.join(like)}?)" if like else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose from {', '.join(METHODS)}")
    try:
        return METHODS[name][1](model, prep, seed)
    except TypeError as err:  # a transformer-only method on a CNN
        raise ValueError(f"method {name!r} does not apply to {type(model).__name__}: {err}") from err
