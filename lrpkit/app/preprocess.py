"""How an image file becomes a model's input: :class:`Preprocess`, timm's evaluation transform in two steps (load,
resize and crop to [0, 1]; then normalise), with timm's crop modes (:data:`CROP_MODES`).

:func:`lrpkit.app.zoo.load_model` gives each model its :class:`Preprocess`: from the model's timm data config
(:meth:`Preprocess.from_timm`), the ImageNet convention for torchvision, 64×64 and :func:`lrpkit.data.normalize`
for the demo models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["CROP_MODES", "Preprocess"]

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
