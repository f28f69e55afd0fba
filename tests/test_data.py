"""The synthetic data: deterministic, per-sample reproducible, and its mask is exactly the class object."""

import numpy as np
import pytest
import torch

from lrpkit.data import (CLASS_NAMES, MEAN, STD, TARGET_COLOR, denormalize, draw_shape, make_dataset,
                         make_sample, normalize)


def test_same_seed_same_images_different_seed_differs():
    a = make_dataset(6, seed=3)
    b = make_dataset(6, seed=3)
    c = make_dataset(6, seed=4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_sample_independent_of_n_and_start():
    images, labels, masks = make_dataset(5, seed=1)
    more = make_dataset(3, seed=1, start=2)
    for i in range(3):
        s = make_sample(2 + i, seed=1)
        assert torch.equal(images[2 + i], s.image) and torch.equal(more[0][i], s.image)
        assert labels[2 + i].item() == s.label == more[1][i].item()
        assert torch.equal(masks[2 + i], s.mask)


def test_shapes_dtypes_ranges():
    images, labels, masks = make_dataset(4, seed=0, size=96)
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert masks.shape == (4, 96, 96) and masks.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 1
    assert ((labels >= 0) & (labels < len(CLASS_NAMES))).all()
    assert masks.flatten(1).any(1).all()  # every image has its object


def test_square_mask_by_hand():
    # half side 0.8·10 = 8 around 32: pixel centres j + 0.5 in [24, 40] -> j = 24..39 (16 pixels per axis)
    m = draw_shape("square", 64, (32.0, 32.0), 10.0)
    assert m.sum() == 16 * 16
    assert m[24:40, 24:40].all() and not m[23, 30] and not m[40, 30] and not m[30, 23] and not m[30, 40]


def test_disc_and_ring_by_hand():
    # disc of radius 2 around (4, 4): centres (x, y) with (x-4)² + (y-4)² <= 4; x = j + 0.5 -> offsets ±0.5, ±1.5
    # offsets (±0.5, ±0.5), (±0.5, ±1.5), (±1.5, ±0.5) qualify (0.5, 2.5, 2.5); (±1.5, ±1.5) = 4.5 does not -> 12
    assert draw_shape("disc", 8, (4.0, 4.0), 2.0).sum() == 12
    # the ring removes d² <= r²/4 = 1: the 4 centre pixels (d² = 0.5) -> 8 remain
    ring = draw_shape("ring", 8, (4.0, 4.0), 2.0)
    assert ring.sum() == 8 and not ring[3:5, 3:5].any()


def test_bar_rotation():
    # |u| <= 10, |v| <= 3 around (32, 32): 20 columns x 6 rows; rotated by 90 degrees: 6 columns x 20 rows
    flat = draw_shape("bar", 64, (32.0, 32.0), 10.0)
    upright = draw_shape("bar", 64, (32.0, 32.0), 10.0, angle=np.pi / 2)
    assert flat.sum() == 20 * 6 and np.array_equal(upright, flat.T)


def test_mask_is_the_target_object():
    for i in range(30):
        s = make_sample(i, seed=5)
        m = s.meta
        assert m["shape"] == CLASS_NAMES[s.label]
        expected = draw_shape(m["shape"], 64, m["center"], m["radius"], m["angle"])
        assert np.array_equal(s.mask.numpy(), expected)
        color = torch.tensor(m["color"], dtype=torch.float32)
        # every masked pixel has the target colour, and no other pixel does
        assert torch.equal(s.image[:, s.mask], color[:, None].expand(3, int(s.mask.sum())))
        same = (s.image == color[:, None, None]).all(0)
        assert torch.equal(same, s.mask)
        assert np.allclose(m["color"], TARGET_COLOR, atol=0.05 + 1e-6)
        assert all(abs(d["color"][1] - TARGET_COLOR[1]) > 0.05 or abs(d["color"][2] - TARGET_COLOR[2]) > 0.05
                   for d in m["distractors"])


def test_labels_cover_all_classes_and_forced_label():
    _, labels, _ = make_dataset(120, seed=2)
    assert set(labels.tolist()) == set(range(len(CLASS_NAMES)))
    s = make_sample(0, seed=0, label=3)
    assert s.label == 3 and s.meta["shape"] == CLASS_NAMES[3]


def test_normalize_roundtrip():
    x = torch.rand(2, 3, 8, 8)
    z = normalize(x)
    assert torch.allclose(z[:, 0], (x[:, 0] - MEAN[0]) / STD[0])
    assert torch.allclose(denormalize(z), x, atol=1e-6)
    with pytest.raises(ValueError, match="3, H, W"):
        normalize(torch.rand(2, 4, 8, 8))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_sample(-1)
    with pytest.raises(ValueError):
        draw_shape("hexagon", 8, (4, 4), 2)
    with pytest.raises(ValueError):
        make_sample(0, label=len(CLASS_NAMES))
