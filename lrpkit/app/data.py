"""Synthetic images with a known ground truth: which pixels decide the class.

Every image contains exactly one object drawn in the *target colour* (a saturated red). Its shape is the class
(:data:`CLASS_NAMES`). Around it are distractor objects of every shape, drawn in non-red colours, on a cluttered
background (grey level, a striped texture, a colour tint and pixel noise). Only the target object decides the
label, so its pixel mask is the ground truth for localisation metrics (pointing game, relevance mass and rank
accuracy, see :mod:`lrpkit.evaluate`).

Every sample is drawn from its own random stream, seeded by ``(seed, index)``: image ``i`` of seed ``s`` is the
same whether it is made alone (:func:`make_sample`) or as part of a data set of any length (:func:`make_dataset`).

Model inputs: the demo models (:mod:`lrpkit.models`) take images in [0, 1] normalised by the fixed
:data:`MEAN` and :data:`STD` defined here, ``normalize(x) = (x - MEAN) / STD``; :func:`denormalize` undoes it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "MEAN",
    "STD",
    "TARGET_COLOR",
    "DISTRACTOR_COLORS",
    "Sample",
    "draw_shape",
    "make_sample",
    "make_dataset",
    "normalize",
    "denormalize",
]

#: Class names; the label of an image is the index of its target object's shape in this tuple.
CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "bar")

#: Per-channel mean of the fixed input normalisation of the demo models (inputs in [0, 1]).
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Per-channel standard deviation of the fixed input normalisation of the demo models.
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

#: Base RGB colour of the class-deciding object (each channel jittered by up to ±``COLOR_JITTER``).
TARGET_COLOR: tuple[float, float, float] = (0.95, 0.1, 0.1)
#: Base RGB colours of the distractor objects: none of them is red.
DISTRACTOR_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.15, 0.75, 0.2),  # green
    (0.15, 0.3, 0.95),  # blue
    (0.95, 0.9, 0.15),  # yellow
    (0.1, 0.8, 0.85),  # cyan
    (0.55, 0.2, 0.85),  # purple
    (0.92, 0.92, 0.92),  # white
)
COLOR_JITTER = 0.05

# Geometry, as fractions of the image size.
_TARGET_RADIUS = (0.16, 0.24)
_DISTRACTOR_RADIUS = (0.1, 0.17)
# Rotation period of each shape (its symmetry), radians; 0 means rotation invariant.
_PERIOD = {"disc": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3, "cross": math.pi / 2,
           "ring": 0.0, "bar": math.pi}


class Sample(NamedTuple):
    """One generated sample.

    image: float32 tensor (3, H, W) in [0, 1]; label: int; mask: bool tensor (H, W), True on the target object's
    pixels; meta: the drawing parameters (``shape``, ``center`` (x, y) in pixels, ``radius``, ``angle``,
    ``color``, and ``distractors``, a list of dicts with the same keys).
    """

    image: torch.Tensor
    label: int
    mask: torch.Tensor
    meta: dict


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel (row i, column j) has its centre at x = j + 0.5, y = i + 0.5.
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c, indexing="xy")


def draw_shape(shape: str, size: int, center: tuple[float, float], radius: float, angle: float = 0.0) -> np.ndarray:
    """Boolean mask (size, size) of one shape; a pixel belongs to it when its centre does.

    Pixel (i, j) has centre (x, y) = (j + 0.5, i + 0.5). With (u, v) = rotation by ``-angle`` of
    (x - cx, y - cy) and r = ``radius``:

    - disc:     u² + v² ≤ r²
    - ring:     (r/2)² < u² + v² ≤ r²
    - square:   |u| ≤ 0.8 r and |v| ≤ 0.8 r
    - triangle: equilateral, circumradius r: u·cos φ_k + v·sin φ_k ≤ r/2 for φ_k = π/2 + 2πk/3, k = 0, 1, 2
    - cross:    (|u| ≤ 0.3 r and |v| ≤ r) or (|v| ≤ 0.3 r and |u| ≤ r)
    - bar:      |u| ≤ r and |v| ≤ 0.3 r

    Example: ``draw_shape("square", 64, (32, 32), 10)`` is True exactly on rows and columns 24..39
    (|j + 0.5 - 32| ≤ 8).
    """
    if shape not in CLASS_NAMES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {CLASS_NAMES}")
    xx, yy = _grid(int(size))
    dx, dy = xx - center[0], yy - center[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = float(radius)
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 > 0.25 * r * r)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(phi) + v * math.sin(phi) <= 0.5 * r
        return inside
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    # bar
    return (np.abs(u) <= r) & (np.abs(v) <= 0.3 * r)


def _jitter(rng: np.random.Generator, base) -> tuple[float, float, float]:
    col = np.clip(np.asarray(base) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0.0, 1.0)
    return tuple(float(c) for c in col)


def _background(rng: np.random.Generator, size: int, noise: float) -> np.ndarray:
    xx, yy = _grid(size)
    level = rng.uniform(0.25, 0.65)
    amp = rng.uniform(0.03, 0.12)
    freq = rng.uniform(2.0, 8.0) / size  # cycles per pixel
    psi, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    stripes = amp * np.sin(2 * math.pi * freq * (xx * math.cos(psi) + yy * math.sin(psi)) + phase)
    tint = rng.uniform(-0.04, 0.04, size=(3, 1, 1))
    img = level + stripes[None] + tint + noise * rng.standard_normal((3, size, size))
    return img


def _place(rng, size, radius, others, margin=2.0, tries=50):
    """A centre for a circle of ``radius`` inside the image that keeps clear of the circles in ``others``."""
    for _ in range(tries):
        cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
        if all((cx - ox) ** 2 + (cy - oy) ** 2 >= (radius + orad + margin) ** 2 for ox, oy, orad in others):
            return float(cx), float(cy)
    return None


def make_sample(index: int, seed: int = 0, size: int = 64, distractors: tuple[int, int] = (1, 3),
                noise: float = 0.03, label: int | None = None) -> Sample:
    """Generate sample number ``index`` of the stream ``seed``; reproducible on its own.

    Generative process (all random draws from ``numpy.random.default_rng([seed, index])``):

    1. label y ~ Uniform{0, …, len(CLASS_NAMES) - 1} (or the given ``label``); shape = CLASS_NAMES[y].
    2. Background: grey level g ~ U(0.25, 0.65) plus a sinusoidal stripe texture (amplitude U(0.03, 0.12),
       U(2, 8) cycles per image, random orientation and phase), a per-channel tint U(-0.04, 0.04) and Gaussian
       pixel noise N(0, ``noise``²).
    3. Target object: radius r ~ U(0.16, 0.24)·size, centre uniform with the object inside the image, angle
       uniform over the shape's symmetry period, colour TARGET_COLOR + U(-0.05, 0.05) per channel.
    4. k ~ Uniform{distractors[0], …, distractors[1]} distractor objects: shape uniform over all classes,
       radius U(0.1, 0.17)·size, colour from DISTRACTOR_COLORS (jittered), bounding circle kept 2 px clear of
       the target's (a distractor that cannot be placed in 50 tries is dropped). Distractors may overlap each
       other.
    5. Paint background, then distractors, then the target (flat colours, no noise on objects); clip to [0, 1].

    The mask is exactly the target object's pixels (:func:`draw_shape` of its parameters), every masked pixel
    has the target colour, and no other pixel does.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    lo, hi = distractors
    if not 0 <= lo <= hi:
        raise ValueError(f"distractors must be a range (lo, hi) with 0 <= lo <= hi, got {distractors}")
    rng = np.random.default_rng([int(seed), int(index)])
    y = int(rng.integers(len(CLASS_NAMES))) if label is None else int(label)
    if not 0 <= y < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    img = _background(rng, size, noise)

    shape = CLASS_NAMES[y]
    r = rng.uniform(*_TARGET_RADIUS) * size
    center = _place(rng, size, r, [])
    angle = float(rng.uniform(0, _PERIOD[shape])) if _PERIOD[shape] else 0.0
    color = _jitter(rng, TARGET_COLOR)
    meta = {"shape": shape, "center": center, "radius": float(r), "angle": angle, "color": color,
            "distractors": []}

    for _ in range(int(rng.integers(lo, hi + 1))):
        d_shape = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        d_r = rng.uniform(*_DISTRACTOR_RADIUS) * size
        d_center = _place(rng, size, d_r, [(center[0], center[1], r)])
        d_angle = float(rng.uniform(0, _PERIOD[d_shape])) if _PERIOD[d_shape] else 0.0
        d_color = _jitter(rng, DISTRACTOR_COLORS[int(rng.integers(len(DISTRACTOR_COLORS)))])
        if d_center is None:
            continue
        m = draw_shape(d_shape, size, d_center, d_r, d_angle)
        img[:, m] = np.asarray(d_color)[:, None]
        meta["distractors"].append({"shape": d_shape, "center": d_center, "radius": float(d_r),
                                    "angle": d_angle, "color": d_color})

    mask = draw_shape(shape, size, center, r, angle)
    img = np.clip(img, 0.0, 1.0)
    img[:, mask] = np.asarray(color)[:, None]
    return Sample(torch.from_numpy(img.astype(np.float32)), y, torch.from_numpy(mask), meta)


def make_dataset(n: int, seed: int = 0, size: int = 64, start: int = 0, **kwargs
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples ``start, …, start + n - 1`` of stream ``seed`` (see :func:`make_sample`), stacked.

    Returns ``(images, labels, masks)``: float32 (n, 3, size, size) in [0, 1], int64 (n,), bool (n, size, size).
    Sample i does not depend on n: ``make_dataset(n, seed)[0][i] == make_sample(start + i, seed).image``.
    Extra keyword arguments go to :func:`make_sample` (``distractors``, ``noise``).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    images = torch.empty(n, 3, size, size)
    labels = torch.empty(n, dtype=torch.int64)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    for k in range(n):
        s = make_sample(start + k, seed=seed, size=size, **kwargs)
        images[k], labels[k], masks[k] = s.image, s.label, s.mask
    return images, labels, masks


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected images (..., 3, H, W), got shape {tuple(x.shape)}")
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the demo models' input space: (x - MEAN) / STD, per channel (dim -3)."""
    mean, std = _stats(x)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: x · STD + MEAN, per channel (dim -3)."""
    mean, std = _stats(x)
    return x * std + mean
