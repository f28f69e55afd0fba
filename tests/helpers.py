"""Small models shared by the method tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(seed=0, **kw):
    """A seeded 2-block timm ViT on 32x32 images, patch 8, width 32, 5 classes, in eval mode."""
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()


def image(batch=2, size=32, dtype=torch.float32, seed=1):
    """A batch (batch, 3, H, W) of standard normal values, drawn after ``torch.manual_seed(seed)``; ``size`` is an
    int or (H, W). (The family tests' input images.)"""
    torch.manual_seed(seed)
    size = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, *size, dtype=dtype)


def relative(a, b):
    """``max |a − b| / max |b|``: the error of ``a`` relative to the scale of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


# -- shared by the CNN family tests (tests/test_family_timm_*.py, tests/test_reference_cnn.py) --------------------

def randomize_bn(model, seed=0):
    """Non-trivial running statistics and affine parameters for every BatchNorm (timm's BatchNormAct2d included),
    so that BatchNorm fusion is really exercised (default statistics are the identity). Returns ``model``.
    (Also the ``randomize_bn`` fixture of conftest.py, and what benchmarks/check_equal.py uses.)"""
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def cnn_presets(low=-3.0, high=3.0):
    """The CNN presets by name, as the family tests run them (``EpsilonGammaBox`` with the bounds ``low``,
    ``high``): {name: fn() -> Composite}."""
    from lrpkit import presets

    return {"EpsilonPlus": presets.EpsilonPlus, "EpsilonPlusFlat": presets.EpsilonPlusFlat,
            "EpsilonAlpha2Beta1": presets.EpsilonAlpha2Beta1,
            "EpsilonAlpha2Beta1Flat": presets.EpsilonAlpha2Beta1Flat,
            "EpsilonGammaBox": lambda: presets.EpsilonGammaBox(low, high)}


def epsilon_everywhere(epsilon):
    """LRP-ε on every layer with parameters or pooling, and every stabiliser of the containers and norms at ε (the
    gates held constant): with ε → 0, gradient × input of the model with its norms' σ, GRN's response and its gates
    detached (the family tests' reference)."""
    import lrpkit
    from lrpkit import layers, rules

    return lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule(epsilon)), lrpkit.GlobalTypeMap({
        layers.SkipConnection: rules.SkipConnectionRule(epsilon), layers.Sum: rules.SumRule(epsilon),
        layers.Multiply: rules.ProductRule("gate"), layers.LayerNormalize: rules.LayerNormRule(epsilon),
        layers.GlobalResponseNormalize: rules.GlobalResponseNormRule(epsilon)}))


def edge_inputs(x):
    """A batch of edge cases from one image ``x`` (1, C, H, W): zeros, a constant, ``x`` times 1e4 and 1e-6, ``x``."""
    return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7), x * 1e4, x * 1e-6, x])


def assert_finite(explanation):
    """The relevance and every part of the accounting are finite."""
    assert torch.isfinite(explanation.relevance).all()
    assert all(torch.isfinite(v).all() for v in explanation.accounting.parts.values())


def assert_batch_independent(lrp, x, target=None):
    """``lrp`` on the batch ``x`` equals ``lrp`` on each sample alone (to float32 summation order: a batched
    convolution may sum in another order than a single sample's, which moves values 10⁵ times below the map's
    largest by a relative 10⁻⁴; hence the absolute tolerance of 10⁻⁵ of the largest. Relevance leaking between
    samples would move values of the map's own size.)"""
    batch = lrp(x, target=target).relevance
    for i in range(x.shape[0]):
        single = lrp(x[i:i + 1], target=None if target is None else target[i:i + 1]).relevance
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-4, atol=1e-5 * single.abs().max().item())
