"""Every explainer works inside ``torch.inference_mode()``, built there or outside, with the same results as outside
it (``lrpkit._inference``). Without this, the explainers that need autograd failed with autograd's "element 0 of
tensors does not require grad"."""

import warnings

import pytest
import torch
from torch import nn

import lrpkit
from helpers import tiny_vit
from lrpkit import methods


def _cnn():
    torch.manual_seed(0)  # max pooling: LRP keeps an autograd graph for it
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 5)).eval()


VIT_METHODS = {
    "RawAttention": lambda m: methods.RawAttention(m),
    "AttentionGradCAM": lambda m: methods.AttentionGradCAM(m),
    "GenericAttention": lambda m: methods.GenericAttention(m),
    "AttentionRollout": lambda m: methods.AttentionRollout(m),
    "GradientRollout": lambda m: methods.GradientRollout(m),
    "TransformerAttribution": lambda m: methods.TransformerAttribution(m),
    "PartialLRP": lambda m: methods.PartialLRP(m),
    "ViTCX": lambda m: methods.ViTCX(m, seed=0, progress=False),
    "LRP on a ViT": lambda m: lrpkit.LRP(m),
}
CNN_METHODS = {
    "LRP with max pooling": lambda m: lrpkit.LRP(m),
    "Gradient": lambda m: methods.Gradient(m),
    "InputXGradient": lambda m: methods.InputXGradient(m),
    "SmoothGrad": lambda m: methods.SmoothGrad(m, n=3, seed=0),
    "IntegratedGradients": lambda m: methods.IntegratedGradients(m, steps=4),
}
CASES = [(name, make, "vit") for name, make in VIT_METHODS.items()] + \
    [(name, make, "cnn") for name, make in CNN_METHODS.items()]


def _tensors(explanation):
    out = {name: getattr(explanation, name) for name in ("relevance", "output", "target", "token_relevance")}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("built_inside", [False, True], ids=["built outside", "built inside"])
@pytest.mark.parametrize("name,make,kind", CASES, ids=[c[0] for c in CASES])
def test_inside_inference_mode_as_outside(name, make, kind, built_inside):
    model = tiny_vit() if kind == "vit" else _cnn()
    size = 32 if kind == "vit" else 16
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _tensors(make(model)(x))
        explainer = None if built_inside else make(model)
        with torch.inference_mode():
            x_inf = x.clone()  # an inference tensor, as a data loader under inference mode gives
            explainer = explainer or make(model)
            got = _tensors(explainer(x_inf))
    assert got.keys() == expected.keys() and "output" in got
    for key, value in got.items():
        assert not value.is_inference(), key  # ordinary tensors come back
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")
    assert torch.equal(x_inf, x)  # the caller's input untouched
