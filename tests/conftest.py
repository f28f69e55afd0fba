"""Shared fixtures: the 2-input/2-output Linear of the hand-derived rule cases and a one-layer LRP helper."""

import pytest
import torch
from torch import nn

import lrpkit


@pytest.fixture
def linear2():
    """``z = W a + b`` with ``W = [[2, -1], [1, 3]]`` (rows: outputs) and ``b = [1, -2]``."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0], [1.0, 3.0]]))
        layer.bias.copy_(torch.tensor([1.0, -2.0]))
    return layer


@pytest.fixture
def rule_lrp():
    """``rule_lrp(layer, rule, x, R)``: the input relevance of one layer under ``rule`` for output relevance ``R``."""

    def run(layer, rule, x, R):
        model = nn.Sequential(layer).eval()
        composite = lrpkit.Composite(lrpkit.GlobalTypeMap({type(layer): rule}))
        return lrpkit.LRP(model, composite)(x, R=R).relevance

    return run


@pytest.fixture(scope="session")
def randomize_bn():
    """``randomize_bn(model, generator)``: non-trivial running statistics and affine parameters for every BatchNorm,
    so that BatchNorm fusion is really exercised (default statistics are the identity)."""

    def run(model, seed=0):
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

    return run


# One intra-op thread: the test models are tiny, and on a shared machine with few cores torch's thread pool spends
# far more time synchronising than computing (measured: LRP + zennit on VGG16-BN ~10x less CPU time).
torch.set_num_threads(1)
