"""The product of two branches (``lrpkit.layers.Multiply``) and its rule (``lrpkit.rules.ProductRule``): a
squeeze-excitation gate by hand in both modes, conservation, and the forward."""

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit.layers import Chain, Multiply
from lrpkit.rules import ProductRule, ZeroRule


def se_net():
    """y = x ⊙ g, g_c = w_c · mean_hw(x_c) with w = (0.5, 1); then Flatten and a Linear of ones."""
    conv = nn.Conv2d(2, 2, 1, bias=False).double()
    linear = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.tensor([0.5, 1.0])).view(2, 2, 1, 1))
        linear.weight.fill_(1.0)
    gate = Chain([nn.AdaptiveAvgPool2d(1), conv])
    return Chain([Multiply(Chain([]), gate), nn.Flatten(), linear]).eval()


X = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]], dtype=torch.float64)  # (1, 2, 1, 2): channel means (2, 2)


def explain(mode):
    composite = lrpkit.Composite(lrpkit.GlobalMap(ZeroRule()), lrpkit.GlobalTypeMap({Multiply: ProductRule(mode)}))
    return lrpkit.analyze(se_net(), X, composite)


def test_the_forward_is_the_product():
    # g = (0.5·2, 1·2) = (1, 2): y = ((1, 3), (4, 4)), output 12
    assert torch.equal(se_net()(X), torch.tensor([[12.0]], dtype=torch.float64))


def test_gate_mode_by_hand():
    # R_y = y / 12 = (1, 3, 4, 4) / 12; the gate is constant: R_x = R_y, the squeeze branch gets nothing
    expl = explain("gate")
    expected = torch.tensor([[[[1.0, 3.0]], [[4.0, 4.0]]]], dtype=torch.float64) / 12
    torch.testing.assert_close(expl.relevance, expected, rtol=1e-8, atol=0)


def test_uniform_mode_by_hand():
    # half to each factor: R_s = R_y / 2 = (1, 3, 4, 4) / 24; R_g per channel = Σ_hw R_y / 2 = (4/24, 8/24);
    # the 1x1 conv is diagonal: R_mean = R_g; the mean spreads R_mean_c in proportion x_cj / Σ_j x_cj:
    # channel 0 (1, 3): (1/24, 3/24), channel 1 (2, 2): (4/24, 4/24); R_x = R_s + that = (2, 6, 8, 8) / 24
    expl = explain("uniform")
    expected = torch.tensor([[[[2.0, 6.0]], [[8.0, 8.0]]]], dtype=torch.float64) / 24
    torch.testing.assert_close(expl.relevance, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("mode", ["gate", "uniform"])
def test_both_modes_conserve(mode):
    torch.manual_seed(0)
    gate = Chain([nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, 4, 1, bias=False),
                  nn.Sigmoid()])
    net = Chain([nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), Multiply(Chain([]), gate), nn.Flatten(),
                 nn.Linear(4 * 6 * 6, 5, bias=False)]).double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    composite = lrpkit.Composite(lrpkit.GlobalMap(ZeroRule(1e-12)),
                                 lrpkit.GlobalTypeMap({Multiply: ProductRule(mode)}))
    expl = lrpkit.analyze(net, x, composite)
    torch.testing.assert_close(expl.relevance.flatten(1).sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-6,
                               atol=0)


def test_the_mode_is_checked():
    with pytest.raises(ValueError, match="'gate' or 'uniform'"):
        ProductRule("half")
