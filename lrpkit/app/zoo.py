"""Models, preprocessing and explainers by name: what ``lrpkit explain`` and ``lrpkit evaluate`` build from their
options, usable from Python too.

- :func:`load_model` builds a model by name (a timm model, a supported torchvision CNN, or the bundled demo models
  ``demo_vit`` / ``demo_cnn``) with random weights, then loads a local weight file when given one (safetensors, or
  a state dict read with ``torch.load(weights_only=True)``, so no pickled code runs). Nothing is downloaded.
- :class:`Preprocess` turns an image file into the model's input exactly as timm's eval transform does, from the
  model's timm data config (torchvision: the ImageNet convention; demo models: 64×64 and
  :func:`lrpkit.data.normalize`).
- :data:`METHODS` and :func:`make_method` name every explainer of the library with a short command-line name.
- :func:`class_names` gives the class names of a model when they are known (demo classes, ImageNet).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import methods, presets
from ..analyzer import LRP

__all__ = ["DEMO_MODELS", "TORCHVISION_MODELS", "CROP_MODES", "METHODS", "Preprocess", "load_model",
           "make_method", "model_names_like", "class_names"]

#: The bundled demo models (:mod:`lrpkit.models`).
DEMO_MODELS = ("demo_vit", "demo_cnn")

#: The torchvision CNNs that :func:`lrpkit.canonize` supports.
TORCHVISION_MODELS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                      "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: The resize-and-crop modes of :class:`Preprocess` (timm's ``crop_mode``).
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: timm's evaluation transform, split in two steps.

    ``load(path)`` reads an image file as RGB and resizes and crops it to ``size`` (H, W), giving ``x01`` in
    [0, 1] of shape (3, H, W); ``normalize(x01) = (x01 - mean) / std`` per channel gives the model's input. The two
    steps are separate because perturbation metrics perturb in [0, 1] pixel space.

    The resize and crop follow ``crop_mode`` (timm's names), with ``resize`` an int s or a pair (s_h, s_w):

    - ``"center"`` (default): scale so that the image covers (s_h, s_w) keeping its aspect ratio (for an int s:
      shorter side → s), then center-crop ``size``;
    - ``"squash"``: scale to exactly (s_h, s_w), ignoring the aspect ratio, then center-crop ``size``;
    - ``"border"``: scale so that the image fits inside (s_h, s_w) keeping its aspect ratio, then center-crop or
      pad to ``size`` (padding with the colour ``round(255·mean)``).

    Resizing runs on the 8-bit image with Pillow (``interpolation``: ``"bicubic"``, ``"bilinear"``, ...) and
    ``x01 = uint8 / 255``, as timm's ``create_transform(**resolve_data_config({}, model=m))`` does, so that
    ``normalize(load(path))`` equals timm's eval transform of the same file (reference: timm
    ``transforms_imagenet_eval``).
    """

    size: tuple[int, int]
    resize: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_mode: str = "center"

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        from torchvision.transforms import InterpolationMode

        try:
            InterpolationMode(self.interpolation)
        except ValueError:
            names = ", ".join(m.value for m in InterpolationMode)
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose from {names}") from None

    def load(self, path: str | Path) -> torch.Tensor:
        """The image at ``path`` as a (3, H, W) float tensor in [0, 1], resized and cropped (see the class)."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        if not path.is_file():
            what = "is a folder, not an image file" if path.is_dir() else "not found"
            raise FileNotFoundError(f"image {what}: {path}")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} as an image ({err}); give a PNG, JPEG or other file "
                             f"that Pillow can open") from err
        return self.transform(image)

    def transform(self, image) -> torch.Tensor:
        """A PIL RGB image -> (3, H, W) float tensor in [0, 1], resized and cropped as :meth:`load` does."""
        from torchvision.transforms import functional as F

        return F.pil_to_tensor(self.resize_crop(image)).float().div(255)

    def resize_crop(self, image, interpolation: str | None = None, fill=None):
        """The geometric part of :meth:`load` alone: resize and crop (or pad) a PIL image or a tensor (..., h, w)
        to ``size``, with the same scale and offsets as the image. For a mask of the image, pass
        ``interpolation="nearest"`` and ``fill=0`` (the value of padded pixels in ``"border"`` mode; default the
        mean colour ``round(255·mean)``)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode(interpolation or self.interpolation)
        h, w = self.size
        scale = (self.resize, self.resize) if isinstance(self.resize, int) else tuple(self.resize)
        if self.crop_mode == "squash":
            image = F.resize(image, list(scale), interpolation=mode)
            return F.center_crop(image, [h, w])
        if self.crop_mode == "border":
            image = F.resize(image, _keep_ratio(image, scale, longest=True), interpolation=mode)
            if fill is None:
                fill = tuple(round(255 * m) for m in self.mean)
            return _center_crop_or_pad(image, (h, w), fill=fill)
        if scale[0] == scale[1]:  # shorter side -> s (torchvision's Resize with an int)
            image = F.resize(image, scale[0], interpolation=mode)
        else:
            image = F.resize(image, _keep_ratio(image, scale, longest=False), interpolation=mode)
        return F.center_crop(image, [h, w])

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(x01 - mean) / std over the channel dimension (dim -3)."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        return (x01 - mean) / std

    @classmethod
    def from_timm(cls, model: nn.Module) -> "Preprocess":
        """From timm's data config of ``model`` (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``,
        ``mean``, ``std``), as timm's eval transform uses it: scale ``s = floor(size / crop_pct)`` per side (an int
        for a square input), then crop to ``size`` by ``crop_mode``."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        size = tuple(int(s) for s in cfg["input_size"][1:])
        crop_pct = float(cfg.get("crop_pct") or 0.875)
        scale = tuple(math.floor(s / crop_pct) for s in size)
        crop_mode = cfg.get("crop_mode") or "center"
        return cls(size=size, resize=scale[0] if scale[0] == scale[1] else scale, mean=tuple(cfg["mean"]),
                   std=tuple(cfg["std"]), interpolation=cfg.get("interpolation") or "bicubic",
                   crop_mode=crop_mode if crop_mode in CROP_MODES else "center")


def _keep_ratio(image, scale: tuple[int, int], longest: bool) -> list[int]:
    """(h, w) after scaling ``image`` (PIL or tensor) by one factor so that it covers (longest=False) or fits
    inside (longest=True) ``scale`` = (s_h, s_w): timm's ``ResizeKeepRatio``."""
    from torchvision.transforms import functional as F

    h, w = F.get_dimensions(image)[1:]
    ratios = (h / scale[0], w / scale[1])
    ratio = max(ratios) if longest else min(ratios)
    return [round(h / ratio), round(w / ratio)]


def _center_crop_or_pad(image, size: tuple[int, int], fill):
    """Pad ``image`` (PIL or tensor) symmetrically with ``fill`` where it is smaller than ``size`` (h, w), then
    center-crop: timm's ``CenterCropOrPad``."""
    from torchvision.transforms import functional as F

    h, w = F.get_dimensions(image)[1:]
    ch, cw = size
    if cw > w or ch > h:
        pad = [max(cw - w, 0) // 2, max(ch - h, 0) // 2, (max(cw - w, 0) + 1) // 2, (max(ch - h, 0) + 1) // 2]
        image = F.pad(image, pad, fill=fill)
        h, w = F.get_dimensions(image)[1:]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return F.crop(image, top, left, ch, cw)


def model_names_like(name: str, n: int = 5) -> list[str]:
    """Up to ``n`` known model names close to ``name`` (for error messages)."""
    import timm

    known = list(DEMO_MODELS) + list(TORCHVISION_MODELS) + timm.list_models()
    return difflib.get_close_matches(name, known, n=n, cutoff=0.6)


def _classifier_key(model: nn.Module) -> str | None:
    """The state-dict key of the classifier's weight: timm's ``get_classifier()`` (the first head of a distilled
    model), else the last ``nn.Linear`` in module order (torchvision: ``fc``, ``classifier.6``)."""
    head = None
    if callable(getattr(model, "get_classifier", None)):
        try:
            head = model.get_classifier()
        except Exception:  # a model whose get_classifier needs more: fall back to the last Linear
            head = None
        if isinstance(head, (tuple, list)):
            head = head[0] if head else None
    last = None
    for name, module in model.named_modules():
        if head is not None and module is head and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{name}.weight"
        if isinstance(module, nn.Linear):
            last = f"{name}.weight"
    return last


def _num_classes_in(weights: Path, model: nn.Module) -> int | None:
    """The number of classes of the classifier stored in a weight file: the first dimension of the tensor under
    ``model``'s classifier key (:func:`_classifier_key`), or None when the file has no such tensor."""
    from .models import _read_state_dict

    key = _classifier_key(model)
    state = _read_state_dict(weights)
    if key is None or key not in state or state[key].ndim == 0:
        return None
    return int(state[key].shape[0])


def load_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
               ) -> tuple[nn.Module, Preprocess]:
    """Build the model called ``name`` in eval mode and its :class:`Preprocess`.

    ``name`` is ``demo_vit`` / ``demo_cnn`` (trained weights shipped with lrpkit), a torchvision CNN in
    :data:`TORCHVISION_MODELS`, or any timm model name (``timm.list_models()``, a pretrained tag such as
    ``vit_base_patch16_224.augreg_in21k`` selects that tag's preprocessing). Without ``weights`` the timm and
    torchvision models have random weights (from torch's global random state; nothing is downloaded).
    ``weights`` is a local file loaded with :func:`lrpkit.models.load_weights` (strict: names and shapes must fit;
    safetensors, or a state dict read with ``torch.load(weights_only=True)``, so no pickled code runs).
    ``num_classes`` defaults to the size of the classifier in the weight file (the tensor under the model's
    classifier key), else to the architecture's default; the demo models have their fixed 6 classes.
    """
    from . import data, models

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            what = "is a folder, not a file" if weights.is_dir() else "not found"
            raise FileNotFoundError(f"weights file {what}: {weights}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name in DEMO_MODELS:
        fixed = len(data.CLASS_NAMES)
        if num_classes is not None and num_classes != fixed:
            raise ValueError(f"{name} has {fixed} classes ({', '.join(data.CLASS_NAMES)}); it cannot be built with "
                             f"num_classes={num_classes}")
        model = models.load_demo_vit() if name == "demo_vit" else models.load_demo_cnn()
        prep = Preprocess(size=(64, 64), resize=64, mean=data.MEAN, std=data.STD, interpolation="bilinear")
    else:
        if name in TORCHVISION_MODELS:
            import torchvision

            def build(**kwargs):
                return torchvision.models.get_model(name, weights=None, **kwargs)

            prep = Preprocess(size=(224, 224), resize=256, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                              interpolation="bilinear")
        else:
            import timm

            if not timm.is_model(name):
                like = model_names_like(name)
                hint = f"; did you mean {', '.join(like)}?" if like else ""
                raise ValueError(f"unknown model name {name!r}: not a bundled demo model ({', '.join(DEMO_MODELS)}), "
                                 f"a supported torchvision CNN or a timm model{hint} (list timm's with "
                                 f"timm.list_models())")

            def build(**kwargs):
                return timm.create_model(name, pretrained=False, **kwargs)

            prep = None
        model = build() if num_classes is None else build(num_classes=num_classes)
        if num_classes is None and weights is not None:
            found = _num_classes_in(weights, model)
            key = _classifier_key(model)
            if found is not None and found != model.state_dict()[key].shape[0]:
                model = build(num_classes=found)
        if prep is None:
            prep = Preprocess.from_timm(model)
    if weights is not None:
        models.load_weights(model, weights)
    return model.eval(), prep


def class_names(name: str, model: nn.Module) -> list[str] | None:
    """Names of the classes of the model called ``name``: :data:`lrpkit.data.CLASS_NAMES` for the demo models,
    the ImageNet class descriptions shipped with timm for a classifier with 1000 (ImageNet-1k) or another ImageNet
    subset's number of outputs, else None (the command line then takes names from ``--labels``)."""
    from . import data

    if name in DEMO_MODELS:
        return list(data.CLASS_NAMES)
    key = _classifier_key(model)
    if key is None:
        return None
    n = int(model.state_dict()[key].shape[0])
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset({"num_classes": n})
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(n)]
    except Exception:  # an older timm without the bundled label files
        return None


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
    from ..canonize import CanonizationError
    from ..methods.base import NotApplicableError
    from ..rules import IncompatibleRuleError

    try:
        return METHODS[name][1](model, prep, seed)
    except (NotApplicableError, CanonizationError, IncompatibleRuleError) as err:  # e.g. attention on a CNN
        raise ValueError(f"method {name!r} does not apply to {type(model).__name__}: {err}") from err
