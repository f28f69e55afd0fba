"""Gradient, Input × Gradient, SmoothGrad and Integrated Gradients: hand-derived cases on linear, quadratic and
cubic models, completeness of Integrated Gradients, and agreement with plain autograd on a ViT and a CNN."""

import pytest
import torch
from torch import nn

from lrpkit.methods.gradient import Gradient, InputXGradient, IntegratedGradients, SmoothGrad, integration_points
from helpers import tiny_vit


class Powers(nn.Module):
    """logits = [Σ_i x_i², Σ_i x_i³] — not canonizable (a custom leaf), so the explainers use a copy of it."""

    def forward(self, x):
        return torch.stack([(x ** 2).flatten(1).sum(1), (x ** 3).flatten(1).sum(1)], 1)


def linear():
    lin = nn.Linear(3, 2)
    lin.weight.data = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    lin.bias.data = torch.tensor([0.5, 0.0])
    return lin.eval()


XL = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])


def autograd_input_gradient(model, x, t):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, torch.as_tensor(t).view(-1, 1).expand(x.shape[0], 1)).sum().backward()
    return x.grad


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- hand cases
def test_gradient_and_input_x_gradient_of_a_linear_model_by_hand():
    # logits: sample 0 [1+2+3+.5, -1+0+1] = [6.5, 0]; sample 1 [2-3+.5, -2-1] = [-.5, -3]: argmax 0 for both
    # ∂y_0/∂x = W[0] = [1, 2, 3]; x ⊙ W[0] = [[1, 2, 3], [2, 0, -3]]
    e = Gradient(linear())(XL)
    assert e.target.tolist() == [0, 0] and torch.allclose(e.output, torch.tensor([[6.5, 0.0], [-0.5, -3.0]]))
    assert torch.equal(e.relevance, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(InputXGradient(linear())(XL).relevance, torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, -3.0]]))
    # per-sample targets [0, 1]: the rows W[0] and W[1]
    assert torch.equal(Gradient(linear())(XL, target=[0, 1]).relevance,
                       torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))


def test_smoothgrad_of_a_linear_model_is_its_gradient_and_sigma_follows_the_range():
    # the gradient is constant, so the mean over any noise is W[0] (a sum instead of a mean would give 7·W[0])
    e = SmoothGrad(linear(), n=7, noise_level=0.5, seed=0)(XL)
    assert torch.allclose(e.relevance, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    # σ = noise_level · (max - min) per sample: sample 0 range 0 -> 0; sample 1 range 2 - (-1) = 3 -> 1.5
    assert torch.allclose(e.extras["sigma"], torch.tensor([0.0, 1.5]))


def test_smoothgrad_of_a_quadratic_by_hand():
    # y_0 = Σ x²: ∂y_0/∂x (x + ε_k) = 2(x + ε_k), so SmoothGrad = 2x + 2·mean_k ε_k, ε_k = σ·(k-th draw of
    # a generator seeded with the seed, reseeded per sample), σ = .2·(max - min)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.5, -0.5, 3.0]])
    e = SmoothGrad(Powers().eval(), n=5, noise_level=0.2, seed=4, batch_size=3)(x, target=0)
    for b in range(2):
        gen = torch.Generator().manual_seed(4)
        sigma = 0.2 * (x[b].max() - x[b].min())
        eps = torch.stack([torch.randn(4, generator=gen) * sigma for _ in range(5)])
        assert torch.allclose(e.relevance[b], 2 * x[b] + 2 * eps.mean(0), atol=1e-6)
    assert not torch.allclose(e.relevance, 2 * x)  # the noise is there


def test_integration_points_by_hand():
    a, w = integration_points(3, "riemann_trapezoid")  # nodes 0, .5, 1; weights .25, .5, .25
    assert torch.allclose(a, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    a, w = integration_points(2, "gausslegendre")  # ±1/√3 on [-1, 1] -> (1 ∓ 1/√3)/2, weights 1/2
    assert torch.allclose(a, torch.tensor([(1 - 3 ** -0.5) / 2, (1 + 3 ** -0.5) / 2], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(integration_points(4, "riemann_middle")[0],
                          torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        integration_points(4, "simpson")
    with pytest.raises(ValueError, match="steps >= 2"):
        integration_points(1, "riemann_trapezoid")


X3 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -3.0, 2.0]])


@pytest.mark.parametrize("method, steps, factor", [
    # y_0 = Σ x², baseline 0: ∂y_0/∂x at αx is 2αx, R = x·Σ_k w_k 2α_k x = 2x²·Σ_k w_k α_k
    ("riemann_trapezoid", 5, 1.0),   # exact for a linear integrand: R = x²
    ("riemann_left", 4, 0.75),       # 2·(0 + 1 + 2 + 3)/16 = .75
    ("riemann_right", 4, 1.25),      # 2·(1 + 2 + 3 + 4)/16 = 1.25
    ("riemann_middle", 4, 1.0),      # 2·(.5 + 1.5 + 2.5 + 3.5)/16 = 1
    ("gausslegendre", 1, 1.0),       # one node α = .5, weight 1: exact for linear integrands
])
def test_integrated_gradients_of_a_quadratic_by_hand(method, steps, factor):
    e = IntegratedGradients(Powers().eval(), steps=steps, method=method, batch_size=4)(X3, target=0)
    assert torch.allclose(e.relevance, factor * X3 ** 2, atol=1e-6)


def test_integrated_gradients_of_a_cubic_by_hand():
    # y_1 = Σ x³, baseline 0: integrand 3α²x²·x; trapezoid with 3 nodes: 3x³(.5·.25 + .25·1) = 1.125x³
    e = IntegratedGradients(Powers().eval(), steps=3, method="riemann_trapezoid")(X3, target=1)
    assert torch.allclose(e.relevance, 1.125 * X3 ** 3, atol=1e-6)
    # the quadrature error shows in the completeness gap: Σ R − (f(x) − f(0)) = .125·Σ x³ (sample 0: 1+8-1 = 8)
    assert torch.allclose(e.extras["delta"], 0.125 * (X3 ** 3).sum(1), atol=1e-5)
    # 2-point Gauss-Legendre integrates cubics exactly
    e = IntegratedGradients(Powers().eval(), steps=2, method="gausslegendre")(X3, target=1)
    assert torch.allclose(e.relevance, X3 ** 3, atol=1e-5) and e.extras["delta"].abs().max() < 1e-5


def test_integrated_gradients_baselines():
    # baseline b: ∫ 2(b + α(x − b))(x − b) dα = (x − b)(x + b) = x² − b²
    # (the trapezoid rule is exact for linear integrands)
    b = torch.tensor([1.0, -1.0, 0.5])
    e = IntegratedGradients(Powers().eval(), steps=2, baseline=b)(X3, target=0)
    assert torch.allclose(e.relevance, X3 ** 2 - b ** 2, atol=1e-6)
    e = IntegratedGradients(Powers().eval(), steps=2, baseline=0.5)(X3, target=0)
    assert torch.allclose(e.relevance, X3 ** 2 - 0.25, atol=1e-6)
    assert torch.equal(IntegratedGradients(Powers().eval(), baseline=X3.clone())(X3).relevance, torch.zeros_like(X3))
    with pytest.raises(ValueError, match="does not broadcast"):
        IntegratedGradients(Powers().eval(), baseline=torch.zeros(2))(X3)
    with pytest.raises(TypeError, match="baseline"):
        IntegratedGradients(Powers().eval(), baseline="black")


# ------------------------------------------------------------------------------------------------ on models
def test_integrated_gradients_completeness_on_a_vit_tightens_with_more_steps():
    model = tiny_vit()
    gaps = {}
    for steps in (4, 64):
        e = IntegratedGradients(model, steps=steps, batch_size=64)(X, target=3)
        with torch.no_grad():
            gap = model(X)[:, 3] - model(torch.zeros_like(X))[:, 3]
        assert torch.allclose(e.extras["delta"], e.relevance.flatten(1).sum(1) - gap, atol=1e-5)
        gaps[steps] = e.extras["delta"].abs()
    assert (gaps[64] < gaps[4]).all()
    assert (gaps[64] < 0.02 * gap.abs() + 1e-4).all()  # Σ R ≈ f(x) − f(0) within the (small) Riemann error


def test_gradient_on_a_vit_and_a_cnn_equals_autograd():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    cnn[1].running_mean.uniform_(-1, 1)
    cnn[1].running_var.uniform_(0.5, 2)
    cnn.eval()
    for model in (tiny_vit(reg_tokens=1), cnn):
        e = Gradient(model)(X, target=2)
        assert torch.allclose(e.relevance, autograd_input_gradient(model, X, 2), atol=1e-5)
        assert torch.allclose(InputXGradient(model)(X, target=2).relevance, X * e.relevance, atol=1e-6)
        assert e.heatmap.shape == (2, 32, 32)


def test_smoothgrad_without_noise_equals_gradient():
    model = tiny_vit()
    g = Gradient(model)(X, target=1).relevance
    assert torch.allclose(SmoothGrad(model, n=3, noise_level=0.0)(X, target=1).relevance, g, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda m: Gradient(m), lambda m: InputXGradient(m),
    lambda m: SmoothGrad(m, n=4, seed=0, batch_size=3),
    lambda m: IntegratedGradients(m, steps=5, method="gausslegendre", batch_size=3),
])
def test_batch_equals_stacked_single_samples(make):
    method = make(tiny_vit(class_token=False, global_pool="avg"))
    whole = method(X, target=[4, 0])
    singles = torch.cat([method(X[i:i + 1], target=t).relevance for i, t in enumerate([4, 0])])
    assert torch.allclose(whole.relevance, singles, atol=1e-5)
    assert whole.target.tolist() == [4, 0]


def test_models_lrp_cannot_canonize_are_explained_through_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Softmax(dim=1)).eval()
    e = Gradient(model)(XL, target=1)  # the gradient of the probability (LRP would refuse the softmax)
    assert torch.allclose(e.relevance, autograd_input_gradient(model, XL, 1), atol=1e-6)
    assert torch.allclose(e.output, model(XL).detach())


def test_the_model_is_left_untouched_and_errors_are_clear():
    model = tiny_vit()
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        method = Gradient(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    assert torch.allclose(method(X).output, model(X), atol=1e-5)
    with pytest.raises(ValueError, match="n must be"):
        SmoothGrad(model, n=0)
    with pytest.raises(ValueError, match="batch_size"):
        IntegratedGradients(model, batch_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        Gradient(model)(X.long())
    with pytest.raises(ValueError, match="out of range"):
        Gradient(model)(X, target=9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    model = tiny_vit()
    gpu_model = tiny_vit().cuda()
    for make in (Gradient, InputXGradient, lambda m: IntegratedGradients(m, steps=8),
                 lambda m: SmoothGrad(m, n=4, noise_level=0.0)):
        cpu = make(model)(X, target=2).relevance
        gpu = make(gpu_model)(X.cuda(), target=2).relevance
        assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    e = SmoothGrad(gpu_model, n=4, seed=0)(X.cuda())
    assert torch.equal(e.relevance, SmoothGrad(gpu_model, n=4, seed=0)(X.cuda()).relevance)
