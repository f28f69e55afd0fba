"""Weights loaded through timm's normal paths reach the canonized model.

There is no network here, so "pretrained" weights are a random model's state dict saved to a local file
(safetensors and .pth) and loaded with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=path))`` or ``model.load_state_dict``. The loaded model is then canonized: same
logits as the model the weights came from, and LRP runs on it.
"""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import lrpkit


IMG = 64
NAMES = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]


def image(size=IMG, seed=1):
    torch.manual_seed(seed)
    return torch.randn(1, 3, size, size)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """For each model name: (source model, {"safetensors": path, "pth": path}) with perturbed random weights."""
    out = {}
    for name in NAMES:
        torch.manual_seed(0)
        source = timm.create_model(name, pretrained=False, img_size=IMG).eval()
        with torch.no_grad():
            for p in source.parameters():  # biases, tokens and LayerNorms away from timm's init values
                p.add_(0.05 * torch.randn_like(p))
        state = {k: v.contiguous() for k, v in source.state_dict().items()}
        folder = tmp_path_factory.mktemp(name)
        paths = {"safetensors": folder / "model.safetensors", "pth": folder / "model.pth"}
        save_file(state, str(paths["safetensors"]))
        torch.save(state, paths["pth"])
        out[name] = (source, paths)
    return out


def assert_same_logits(reference, chain, x):
    with torch.no_grad():
        expected, got = reference(x), chain(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_file_through_create_model(name, fmt, checkpoints):
    source, paths = checkpoints[name]
    torch.manual_seed(123)  # were the file ignored, this model's random weights would differ from the source's
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(paths[fmt])),
                              img_size=IMG).eval()
    state = source.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = image()
    assert_same_logits(source, lrpkit.canonize(model), x)
    e = lrpkit.analyze(model, x)
    assert torch.isfinite(e.relevance).all() and e.relevance.shape == x.shape
    assert torch.allclose(e.accounting.total(), e.accounting.output, atol=1e-4)
    assert torch.allclose(e.relevance, lrpkit.analyze(source, x).relevance)  # same weights, same explanation


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_state_dict(fmt, checkpoints):
    source, paths = checkpoints["vit_tiny_patch16_224"]
    path = paths[fmt]
    state = load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG).eval()
    before = lrpkit.LRP(model)  # built from the random weights: a snapshot, unaffected by what follows
    x = image()
    old = before(x)
    model.load_state_dict(state)
    assert_same_logits(source, lrpkit.canonize(model), x)
    after = lrpkit.LRP(model, lrpkit.presets.AttnLRP())(x)
    assert torch.isfinite(after.relevance).all()
    again = before(x)
    assert torch.equal(again.relevance, old.relevance) and torch.equal(again.output, old.output)
    with torch.no_grad():
        assert not torch.allclose(old.output, model(x))


def test_pretrained_file_at_another_image_size(checkpoints):
    # a checkpoint for a 4x4 grid loaded into a 96x96 model: timm resamples the positional embedding on load;
    # the canonized model follows the loaded model, and LRP explains it patch by patch
    _, paths = checkpoints["deit_tiny_distilled_patch16_224"]
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=True, img_size=96,
                              pretrained_cfg_overlay=dict(file=str(paths["safetensors"]))).eval()
    assert model.pos_embed.shape[1] == 2 + 6 * 6
    x = image(96)
    assert_same_logits(model, lrpkit.canonize(model), x)
    e = lrpkit.analyze(model, x)
    assert e.patch_relevance.shape == (1, 6, 6)
    assert torch.allclose(e.patch_relevance.sum(), e.relevance.sum(), atol=1e-5)
