"""The images of :func:`~lrpkit.evaluate.runner.run_evaluation`: :class:`GeneratedImages` (the generated stream
of :mod:`lrpkit.data`) and :class:`ImageFolder` (the user's images with optional ground-truth masks, checked when
made), both loading a :class:`Batch` of images in [0, 1] with their masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Batch", "GeneratedImages", "ImageFolder"]


@dataclass
class Batch:
    """Images ready for scoring: ``x01`` (B, 3, H, W) in [0, 1]; ``masks`` (B, H, W) bool (all False where
    ``has_mask`` is False); ``labels`` (int or None per image)."""

    x01: torch.Tensor
    masks: torch.Tensor
    has_mask: list[bool]
    labels: list[int | None]


class GeneratedImages:
    """``n`` images of :func:`lrpkit.data.make_sample` (stream ``seed``, ``size`` pixels) with their masks.

    Image ``i`` (id ``str(i)``) is the same for every n, so a rerun with a larger n reuses the rows of the first
    images.
    """

    def __init__(self, n: int, seed: int, size: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of generated images) must be a positive int, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n, self.seed, self.size = n, seed, size
        self.ids = [str(i) for i in range(n)]

    @property
    def identity(self) -> dict:
        return {"source": "generated", "seed": self.seed, "size": self.size}

    def load(self, indices: list[int]) -> Batch:
        from ..app import data

        samples = [data.make_sample(i, seed=self.seed, size=self.size) for i in indices]
        return Batch(torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples]),
                     [True] * len(samples), [s.label for s in samples])


def _read_mask(path: Path) -> torch.Tensor:
    """A mask file as a bool (H, W) tensor: True where any colour channel is nonzero (alpha is ignored; a palette
    image's index 0 is background)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "L", "P", "I", "I;16", "F"):
            arr = np.asarray(im)
        elif im.mode == "LA":
            arr = np.asarray(im.getchannel("L"))
        else:
            arr = np.asarray(im.convert("RGB"))
    arr = arr != 0
    if arr.ndim == 3:
        arr = arr.any(-1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) of an image file, after checking that Pillow can read it: ``verify`` checks the structure
    (a PNG's checksums), a full decode finds data cut short (which ``verify`` does not see in a JPEG), so that a
    broken file stops the run before it starts rather than when the run reaches it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path} as an image ({err}); give a PNG, JPEG or other file Pillow "
                         f"can open, or remove it from the folder") from None
    return size


class ImageFolder:
    """Images with optional ground-truth masks, laid out as::

        DIR/images/NAME.EXT    the images (any format Pillow reads), processed in the order of their file names
        DIR/masks/NAME.EXT     optional: the mask of images/NAME.*, same width and height; nonzero = object

    Each image is read as RGB and brought to the model's input size by ``preprocess`` (``Preprocess.load``:
    resize and crop as timm's eval transform); its mask goes through the same resize (nearest neighbour) and crop.
    Images without a mask get the perturbation metrics only. The folder is checked when this object is made:
    no images, an unreadable file, a mask whose size differs from its image's, two files with one NAME, or a
    mask without an image are errors that name the file.
    """

    def __init__(self, root: str | Path, preprocess):
        root = Path(root)
        layout = "DIR/images/NAME.png (and optionally DIR/masks/NAME.png, nonzero = object)"
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root} (expected the layout {layout})")
        image_dir, mask_dir = root / "images", root / "masks"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no images/ folder in {root}; expected the layout {layout}")
        self.root, self.preprocess = root.resolve(), preprocess
        images = self._files(image_dir, "image")
        if not images:
            raise ValueError(f"no images in {image_dir}; put the images there as NAME.png / NAME.jpg ({layout})")
        masks = self._files(mask_dir, "mask") if mask_dir.is_dir() else {}
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(f"mask {masks[orphans[0]]} has no image {image_dir}/{orphans[0]}.*; rename it to the "
                             f"name of its image or remove it")
        self.paths = [images[stem] for stem in sorted(images, key=lambda s: images[s].name)]
        self.mask_paths = {}
        for path in self.paths:
            size = _image_size(path, "image")
            mask = masks.get(path.stem)
            if mask is not None:
                mask_size = _image_size(mask, "mask")
                if mask_size != size:
                    raise ValueError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} pixels but its image {path} is "
                                     f"{size[0]}x{size[1]}; a mask must have its image's width and height")
                self.mask_paths[path.name] = mask
        self.ids = [p.name for p in self.paths]

    @staticmethod
    def _files(folder: Path, what: str) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.stem in files:
                raise ValueError(f"two {what} files named {p.stem!r} in {folder}: {files[p.stem].name} and {p.name}; "
                                 f"masks are matched to images by name, so rename one")
            files[p.stem] = p
        return files

    @property
    def identity(self) -> dict:
        return {"source": "folder", "data": str(self.root)}

    def load_mask(self, name: str) -> torch.Tensor | None:
        """The mask of image ``name`` at the model's input size (bool (H, W)), or None: the image's resize and crop
        (``Preprocess.resize_crop``) with nearest-neighbour interpolation, padding (if any) as background."""
        path = self.mask_paths.get(name)
        if path is None:
            return None
        m = _read_mask(path)[None].to(torch.uint8)
        if hasattr(self.preprocess, "resize_crop"):
            m = self.preprocess.resize_crop(m, interpolation="nearest", fill=0)
        else:  # a preprocess without resize_crop: shorter side to ``resize``, then center crop
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as F

            m = F.resize(m, self.preprocess.resize, interpolation=InterpolationMode.NEAREST)
            m = F.center_crop(m, list(self.preprocess.size))
        return m[0] > 0

    def load(self, indices: list[int]) -> Batch:
        x = torch.stack([self.preprocess.load(self.paths[i]) for i in indices])
        masks, has = [], []
        for i in indices:
            m = self.load_mask(self.ids[i])
            has.append(m is not None)
            masks.append(m if m is not None else torch.zeros(x.shape[-2:], dtype=torch.bool))
        return Batch(x, torch.stack(masks), has, [None] * len(indices))
