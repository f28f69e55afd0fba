"""Colour mapping centred at zero, overlays, token upsampling and PNG output."""

import pytest
import torch

from lrpkit.viz import (overlay, plot_grid, relevance_to_rgb, save_png, scale_relevance, to_heatmap,
                        upsample_tokens)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_zero_white_positive_red_negative_blue():
    r = torch.tensor([[[0.0, 2.0, -2.0, 1.0]]])  # (1, 1, 4): max |R| = 2
    rgb = relevance_to_rgb(r)
    assert rgb.shape == (1, 3, 1, 4)
    assert torch.equal(rgb[0, :, 0, 0], torch.ones(3))  # 0 -> white
    assert torch.equal(rgb[0, :, 0, 1], torch.tensor([1.0, 0, 0]))  # +max -> red
    assert torch.equal(rgb[0, :, 0, 2], torch.tensor([0.0, 0, 1]))  # -max -> blue
    half = rgb[0, :, 0, 3]  # +max/2 -> halfway between white and red: (1, ~0.5, ~0.5)
    assert half[0] == 1 and abs(half[1] - 0.5) < 0.01 and half[1] == half[2]


def test_scaling_symmetric_per_sample_and_percentile():
    r = torch.stack([torch.linspace(-1, 4, 100).view(10, 10), torch.zeros(10, 10)])
    s = scale_relevance(r)
    assert s.shape == r.shape and s[0].max() == 1 and s[0].min() == -0.25 and torch.equal(s[1], torch.zeros(10, 10))
    assert scale_relevance(r, percentile=50)[0].max() == 1  # clipped above the percentile
    assert relevance_to_rgb(r[1]).shape == (3, 10, 10) and torch.equal(relevance_to_rgb(r[1]), torch.ones(3, 10, 10))
    with pytest.raises(ValueError, match="percentile"):
        scale_relevance(r, percentile=0)


def test_overlay():
    img = torch.rand(2, 3, 8, 8)
    assert torch.equal(overlay(img, torch.zeros(2, 8, 8)), img)  # zero relevance leaves the image
    r = torch.zeros(2, 8, 8)
    r[:, 0, 0] = 1.0
    out = overlay(img, r, alpha=1.0)
    assert out.shape == img.shape and torch.equal(out[:, :, 0, 0], torch.tensor([[1.0, 0, 0]] * 2))
    assert overlay(img[0], r[0]).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="do not match"):
        overlay(img, torch.zeros(2, 4, 4))


def test_upsample_tokens_nearest():
    t = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    up = upsample_tokens(t, 4)
    assert up.shape == (1, 4, 4) and torch.equal(up[0, :2, :2], torch.ones(2, 2)) and up[0, 3, 3] == 4
    assert torch.equal(upsample_tokens(t.view(1, 4), (4, 4)), up)
    with pytest.raises(ValueError, match="square number"):
        upsample_tokens(torch.ones(1, 5), 4)


def test_to_heatmap():
    rel = torch.tensor([[[[1.0]], [[-3.0]], [[0.5]]]])  # (1, 3, 1, 1)
    assert to_heatmap(rel).item() == -1.5 and to_heatmap(rel, "abs").item() == 4.5
    with pytest.raises(ValueError, match="reduce"):
        to_heatmap(rel, "max")


def test_pngs_written(tmp_path):
    p = save_png(relevance_to_rgb(torch.randn(8, 8)), tmp_path / "one.png")
    assert p.read_bytes()[:8] == PNG_SIGNATURE
    imgs = torch.rand(2, 3, 16, 16)
    q = plot_grid(imgs, {"pixels": torch.randn(2, 16, 16), "channels": torch.randn(2, 3, 16, 16),
                         "tokens": torch.randn(2, 4, 4)}, tmp_path / "sub" / "grid.png", row_titles=["a", "b"])
    assert q.exists() and q.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="batch size"):
        plot_grid(imgs, {"bad": torch.randn(3, 16, 16)}, tmp_path / "bad.png")
