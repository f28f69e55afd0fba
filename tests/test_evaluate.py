"""Metrics on cases whose answers are derived by hand in the comments."""

import math

import pytest
import torch
from torch import nn

from lrpkit.evaluate import (chefer_perturbation, deletion_insertion, model_randomization, parameterized_layers,
                             perturbation_curves, pointing_game, rankdata, relevance_mass_accuracy,
                             relevance_rank_accuracy, spearman)


class PatchSum(nn.Module):
    """logits = [sum of the top-left 2x2 patch, constant c]; for 1-channel 4x4 images (patch grid 2x2)."""

    def __init__(self, c=0.0):
        super().__init__()
        self.c = c

    def forward(self, x):
        s = x[:, :, :2, :2].sum((1, 2, 3))
        return torch.stack([s, torch.full_like(s, self.c)], 1)


def true_heatmap(x):
    # gradient x input of logit 0: the pixel values inside the top-left patch, zero elsewhere
    h = torch.zeros_like(x[:, 0])
    h[:, :2, :2] = x[:, 0, :2, :2]
    return h


X = torch.ones(1, 1, 4, 4)


# ---------------------------------------------------------------- perturbation curves
def test_morf_lerf_abpc_by_hand():
    # 4 patches, relevance 4 (patch 0) and 0 (patches 1-3); target = argmax = class 0 (logit 4 > 0).
    # MoRF removes patch 0 first: [4, 0, 0, 0, 0]; LeRF removes 1, 2, 3 (ties by index), then 0: [4, 4, 4, 4, 0].
    # x-axis 0, .25, .5, .75, 1: AUC_MoRF = .25·(4+0)/2 = 0.5; AUC_LeRF = 3·.25·(4+4)/2 + .25·(4+0)/2 = 3.5
    r = perturbation_curves(PatchSum(), X, true_heatmap(X), patch_size=2)
    assert torch.allclose(r.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.equal(r.morf, torch.tensor([[4.0, 0, 0, 0, 0]]))
    assert torch.equal(r.lerf, torch.tensor([[4.0, 4, 4, 4, 0]]))
    assert torch.allclose(r.auc_morf, torch.tensor([0.5])) and torch.allclose(r.auc_lerf, torch.tensor([3.5]))
    assert torch.allclose(r.abpc, torch.tensor([3.0])) and r.target.tolist() == [0]


def test_patch_level_heatmap_and_baseline():
    # the same relevance given per patch (B, 2, 2); baseline 0.5: a removed patch-0 leaves 4·0.5 = 2
    grid = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]])
    r = perturbation_curves(PatchSum(), X, grid, patch_size=2, baseline=0.5, steps=2)
    # steps=2: removes round(k·4/2) = 0, 2, 4 patches -> MoRF [4, 2, 2], LeRF (1, 2 first) [4, 4, 2]
    assert torch.equal(r.morf, torch.tensor([[4.0, 2, 2]]))
    assert torch.equal(r.lerf, torch.tensor([[4.0, 4, 2]]))
    assert torch.allclose(r.abpc, torch.tensor([0.5 * (4 + 4) / 2 + 0.5 * (4 + 2) / 2 - 0.5 * (4 + 2) / 2 - 0.5 * 2]))


def test_true_heatmap_beats_random_and_batching_is_consistent():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g)
    model = lambda z: torch.stack([z[:, 0, :4, :4].sum((1, 2)), z[:, 0, 4:, 4:].sum((1, 2))], 1)
    h = torch.zeros(5, 8, 8)
    h[:, :4, :4] = x[:, 0, :4, :4]
    good = perturbation_curves(model, x, h, target=0, patch_size=2)
    rand = perturbation_curves(model, x, torch.rand(5, 8, 8, generator=g), target=0, patch_size=2)
    small = perturbation_curves(model, x, h, target=[0] * 5, patch_size=2, batch_size=7)
    assert (good.abpc > rand.abpc).all()
    assert torch.allclose(good.morf, small.morf) and torch.allclose(good.lerf, small.lerf)
    assert good.morf.shape == (5, 17)
    prob = perturbation_curves(model, x, h, target=0, patch_size=2, score="probability")
    assert torch.allclose(prob.morf[:, 0], model(x).softmax(1)[:, 0])


def test_region_size_not_dividing_the_image():
    # 5x5 image, regions of 2: a 3x3 grid with cut border regions; all removed at the end -> logit 0
    x = torch.ones(1, 1, 5, 5)
    model = lambda z: torch.stack([z.sum((1, 2, 3)), torch.zeros(len(z))], 1)
    r = perturbation_curves(model, x, torch.rand(1, 5, 5), patch_size=2)
    assert r.morf.shape == (1, 10) and r.morf[0, 0] == 25 and r.morf[0, -1] == 0


def test_perturbation_input_errors():
    with pytest.raises(ValueError, match=r"\(B, H, W\).*relevance.sum\(1\)"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 1, 4, 4), patch_size=2)
    with pytest.raises(ValueError, match="spatial shape"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 3, 3), patch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        perturbation_curves(PatchSum(), X, torch.ones(2, 4, 4), patch_size=2)
    with pytest.raises(TypeError, match="floating"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 4, 4, dtype=torch.long), patch_size=2)
    with pytest.raises(ValueError, match="steps"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 4, 4), patch_size=2, steps=5)
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 4, 4), patch_size=2, baseline=torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="score"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 4, 4), patch_size=2, score="loss")
    with pytest.raises(ValueError, match="target"):
        perturbation_curves(PatchSum(), X, torch.ones(1, 4, 4), patch_size=2, target=[0, 1])
    with pytest.raises(ValueError, match="NaN"):
        perturbation_curves(PatchSum(), X, torch.full((1, 4, 4), math.nan), patch_size=2)


# ---------------------------------------------------------------- deletion / insertion
def test_deletion_insertion_by_hand():
    # pixel level, 16 steps (one pixel each); the 4 patch-0 pixels (relevance 1) go first.
    # deletion: 4, 3, 2, 1, 0, ... (17 points): AUC = (1/16)·(3.5 + 2.5 + 1.5 + 0.5) = 0.5
    # insertion into an all-zero "blurred" image: 0, 1, 2, 3, 4, 4, ...: AUC = (1/16)·(0.5+1.5+2.5+3.5 + 12·4) = 3.5
    r = deletion_insertion(PatchSum(), X, true_heatmap(X), steps=16, score="logit", blurred=torch.zeros_like(X))
    assert torch.equal(r.deletion[0, :6], torch.tensor([4.0, 3, 2, 1, 0, 0]))
    assert torch.equal(r.insertion[0, :6], torch.tensor([0.0, 1, 2, 3, 4, 4]))
    assert torch.allclose(r.auc_deletion, torch.tensor([0.5])) and torch.allclose(r.auc_insertion, torch.tensor([3.5]))


def test_deletion_probability_and_blur():
    # default score: softmax probability; blur of a constant image is the same constant (kernel sums to 1)
    r = deletion_insertion(PatchSum(), X, true_heatmap(X), steps=4)
    assert torch.allclose(r.deletion[0, 0], torch.sigmoid(torch.tensor(4.0)))
    assert torch.allclose(r.insertion, torch.full_like(r.insertion, torch.sigmoid(torch.tensor(4.0)).item()))
    assert r.fractions.shape == (5,) and r.deletion.shape == (1, 5)


# ---------------------------------------------------------------- Chefer's protocol
def test_chefer_by_hand():
    # logits [patch-0 sum, 2.5]; 16 pixels, removed counts floor(16·φ) = 0, 1, 3, 4, 6, 8, 9, 11, 12, 14.
    # positive (most relevant first): patch sum 4, 3, 1, 0, ... -> correct 1, 1, 0, ...: AUC = .1 + .05 = 0.15
    # negative: the 12 zero-relevance pixels go first; only at 14 two patch pixels are gone (sum 2 < 2.5):
    # correct 1 (x9), 0 -> AUC = 8·0.1 + 0.05 = 0.85
    m = PatchSum(2.5)
    pos = chefer_perturbation(m, X, true_heatmap(X), mode="positive")
    neg = chefer_perturbation(m, X, true_heatmap(X), mode="negative")
    assert pos.correct[0].tolist() == [1, 1] + [0] * 8
    assert neg.correct[0].tolist() == [1] * 9 + [0]
    assert torch.allclose(pos.auc, torch.tensor(0.15)) and torch.allclose(neg.auc, torch.tensor(0.85))
    with pytest.raises(ValueError, match="mode"):
        chefer_perturbation(m, X, true_heatmap(X), mode="both")


def test_chefer_preprocess_baseline():
    # with preprocess z -> z - 1 (0 in the raw space is -1 for the model), removing a pixel subtracts 1
    m = lambda z: torch.stack([z[:, :, :2, :2].sum((1, 2, 3)), torch.full((len(z),), -0.5)], 1)
    r = chefer_perturbation(m, X, true_heatmap(X), preprocess=lambda z: z - 1, target=0, fractions=[0.0, 0.1])
    # raw x = 1 -> model sees 0 (sum 0 > -0.5, correct); one pixel removed -> sum -1 < -0.5 (wrong)
    assert r.correct[0].tolist() == [1, 0]


# ---------------------------------------------------------------- localisation
def _square_mask(b=1, size=16, lo=4, hi=8):
    m = torch.zeros(b, size, size, dtype=torch.bool)
    m[:, lo:hi, lo:hi] = True
    return m


def test_localisation_perfect_and_inverted():
    mask = _square_mask(2)  # 16 of 256 pixels
    perfect, inverted = mask.float(), (~mask).float()
    for f in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy):
        assert torch.equal(f(perfect, mask), torch.ones(2))
        assert torch.equal(f(inverted, mask), torch.zeros(2))


def test_localisation_by_hand():
    h = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
    m = torch.tensor([[[True, False], [True, False]]])
    # maximum 3 inside; positive mass 3 of 3 + 1 = 4; K = 2, top-2 = {3 (in), 1 (out)}
    assert pointing_game(h, m).item() == 1.0
    assert relevance_mass_accuracy(h, m).item() == 0.75
    assert relevance_rank_accuracy(h, m).item() == 0.5


def test_constant_and_random_heatmaps_score_the_area_fraction():
    mask = _square_mask(400)  # area fraction 16 / 256 = 0.0625
    const = torch.ones(400, 16, 16)
    # ties are shared out in proportion: exactly the area fraction
    assert torch.allclose(pointing_game(const, mask), torch.full((400,), 0.0625))
    assert torch.allclose(relevance_rank_accuracy(const, mask), torch.full((400,), 0.0625))
    assert pointing_game(const, mask, ties="any").eq(1).all() and pointing_game(const, mask, ties="all").eq(0).all()
    rnd = torch.rand(400, 16, 16, generator=torch.Generator().manual_seed(0))
    for f in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy):
        assert abs(f(rnd, mask).mean().item() - 0.0625) < 0.04


def test_pointing_game_tolerance_and_nan_cases():
    h = torch.zeros(1, 16, 16)
    h[0, 10, 10] = 1.0  # distance to the mask (rows/cols 4..7) corner (7, 7): sqrt(9 + 9) = 4.24
    mask = _square_mask()
    assert pointing_game(h, mask).item() == 0
    assert pointing_game(h, mask, tolerance=4).item() == 0 and pointing_game(h, mask, tolerance=5).item() == 1
    assert math.isnan(relevance_mass_accuracy(-torch.ones(1, 16, 16), mask).item())
    assert math.isnan(relevance_rank_accuracy(h, torch.zeros_like(mask)).item())


def test_localisation_input_errors():
    mask = _square_mask()
    with pytest.raises(TypeError, match="bool"):
        pointing_game(torch.ones(1, 16, 16), mask.float())
    with pytest.raises(ValueError, match="does not match"):
        relevance_mass_accuracy(torch.ones(1, 16, 16), _square_mask(size=8))
    with pytest.raises(ValueError, match=r"relevance.sum\(1\)"):
        relevance_rank_accuracy(torch.ones(1, 3, 16, 16), mask)


# ---------------------------------------------------------------- rank correlation
def test_spearman_and_ranks():
    assert rankdata(torch.tensor([[10.0, 20.0, 20.0, 5.0]])).tolist() == [[2.0, 3.5, 3.5, 1.0]]
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert spearman(a, a ** 3).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) vs (2, 1, 4, 3): 1 - 6·Σd² / (n(n²-1)) = 1 - 6·4 / 60 = 0.6
    assert spearman(a, torch.tensor([[2.0, 1.0, 4.0, 3.0]])).item() == pytest.approx(0.6)
    assert math.isnan(spearman(a, torch.ones(1, 4)).item())


# ---------------------------------------------------------------- randomisation
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()


def _grad_x_input(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    return (g * x).sum(1)


def test_randomisation_weight_independent_heatmap_stays_correlated():
    model, x = _cnn(), torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = model_randomization(model, lambda m, z: z.sum(1), x)
    assert r.layers == ["6", "2", "0"] == list(reversed(parameterized_layers(model)))
    assert r.correlation.shape == (3, 3) and torch.allclose(r.correlation, torch.ones(3, 3))


def test_randomisation_gradient_x_input_decorrelates_and_leaves_model_alone():
    model, x = _cnn(), torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    r = model_randomization(model, _grad_x_input, x, seed=0, keep_heatmaps=True)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.heatmaps.shape == (3, 4, 8, 8) and torch.allclose(r.original, _grad_x_input(model, x))
    # a fresh head alone already scrambles the class-0 gradient (measured: mean rho within +-0.25 at every step)
    assert (r.correlation.mean(1).abs() < 0.5).all()
    again = model_randomization(model, _grad_x_input, x, seed=0)
    assert torch.equal(again.correlation, r.correlation)  # seeded


def test_randomisation_errors():
    with pytest.raises(ValueError, match="no layer named"):
        model_randomization(_cnn(), lambda m, z: z.sum(1), torch.rand(1, 3, 8, 8), layers=["fc"])
    with pytest.raises(ValueError, match="no parameters"):
        model_randomization(_cnn(), lambda m, z: z.sum(1), torch.rand(1, 3, 8, 8), layers=["1"])
    with pytest.raises(ValueError, match="batch size"):
        model_randomization(_cnn(), lambda m, z: z.sum(), torch.rand(1, 3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_run_on_cuda():
    dev = torch.device("cuda")
    x = X.to(dev)
    r = perturbation_curves(PatchSum().to(dev), x, true_heatmap(x), patch_size=2)
    assert r.abpc.device.type == "cuda" and torch.allclose(r.abpc.cpu(), torch.tensor([3.0]))
    d = deletion_insertion(PatchSum(), x, true_heatmap(x), steps=4)
    assert d.auc_deletion.device.type == "cuda"
    mask = _square_mask().to(dev)
    assert pointing_game(mask.float(), mask, tolerance=1).device.type == "cuda"
    assert relevance_rank_accuracy(mask.float(), mask).item() == 1.0
    assert spearman(torch.rand(2, 5, device=dev), torch.rand(2, 5, device=dev)).device.type == "cuda"
