"""Writing a rule, and teaching lrpkit a layer, in a few lines (the examples of the documentation).

The Linear of the hand-derived cases: ``z = W a + b``, ``W = [[2, -1], [1, 3]]``, ``b = [1, -2]``, ``a = [3, 1]``,
output relevance ``R = [3, 2]``; then ``z = [6, 4]``.
"""

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit.rules import Rule, stabilize

A = torch.tensor([[3.0, 1.0]])
R = torch.tensor([[3.0, 2.0]])


# ---- a rule is what it changes in the layer's forward computation ---------------------------------------------

class StdEpsilonRule(Rule):
    """LRP-ε with ε = factor · std(z), the (population) standard deviation of the layer's output per sample."""

    def __init__(self, factor=0.25):
        self.factor = factor

    def modify_denominator(self, z):
        return stabilize(z, self.factor * z.flatten(1).std(1, unbiased=False).view(-1, *[1] * (z.ndim - 1)))


class NegativeGammaRule(Rule):
    """LRP-γ on the negative weights: W + γW⁻ and b + γb⁻ (favours the negative contributions)."""

    def __init__(self, gamma=0.25):
        self.gamma = gamma

    def modify_param(self, p, name):
        return p + self.gamma * p.clamp(max=0)


def test_std_epsilon_rule_by_hand(linear2, rule_lrp):
    # z = [6, 4]: std = 1, so with factor 2, ε = 2 and this is LRP-ε(2):
    # s = R / (z + 2) = [3/8, 1/3];  c = Wᵀ s = [2·3/8 + 1/3, −3/8 + 3·1/3] = [13/12, 5/8];  R_in = [13/4, 5/8]
    out = rule_lrp(linear2, StdEpsilonRule(factor=2.0), A, R)
    torch.testing.assert_close(out, torch.tensor([[13 / 4, 5 / 8]]))
    # ε is per sample: a second sample with a larger spread of z leaves the first one's relevance unchanged
    out = rule_lrp(linear2, StdEpsilonRule(factor=2.0), torch.cat([A, 10 * A]), torch.cat([R, R]))
    torch.testing.assert_close(out[:1], torch.tensor([[13 / 4, 5 / 8]]))


def test_negative_gamma_rule_by_hand(linear2, rule_lrp):
    # γ = 1: W' = W + W⁻ = [[2, −2], [1, 3]], b' = b + b⁻ = [1, −4]
    # z' = [6 − 2 + 1, 3 + 3 − 4] = [5, 2];  s = R / z' = [3/5, 1]
    # c = W'ᵀ s = [2·3/5 + 1, −2·3/5 + 3] = [11/5, 9/5];  R_in = [3·11/5, 9/5] = [33/5, 9/5]
    out = rule_lrp(linear2, NegativeGammaRule(gamma=1.0), A, R)
    torch.testing.assert_close(out, torch.tensor([[33 / 5, 9 / 5]]))


def test_custom_rules_in_a_composite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    composite = lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Conv2d: NegativeGammaRule(), nn.Linear: StdEpsilonRule()}))
    assert "NegativeGammaRule(gamma=0.25)" in lrpkit.LRP(model, composite).table()
    expl = lrpkit.analyze(model, torch.rand(2, 3, 8, 8), composite)
    assert expl.relevance.shape == (2, 3, 8, 8) and torch.isfinite(expl.relevance).all()


# ---- a layer lrpkit does not know -----------------------------------------------------------------------------

class Mix(nn.Module):
    """``y = x M``: a linear map that is not an nn.Linear."""

    def __init__(self, M):
        super().__init__()
        self.M = nn.Parameter(M)

    def forward(self, x):
        return x @ self.M


def test_custom_layer_register_rule():
    # process-wide registration (the autouse fixture of conftest.py restores the registries after the test)
    M = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])  # y_j = Σ_i x_i M_ij, i.e. M = Wᵀ: y = [5, 6] for x = [3, 1]
    model = nn.Sequential(Mix(M)).eval()
    with pytest.raises(lrpkit.CanonizationError, match=r"0: .*Mix[\s\S]*register_rule"):
        lrpkit.canonize(model)

    lrpkit.register_rule(Mix, lrpkit.rules.EpsilonRule(epsilon=1e-9))

    chain = lrpkit.canonize(model)
    assert isinstance(chain[0], Mix)
    # LRP-0 through the generic rule: s = R / y = [5, 12] / [5, 6] = [1, 2];  c = M s = [2 + 2, −1 + 6] = [4, 5];
    # R_in = x ⊙ c = [12, 5]  (17 = 5 + 12)
    expl = lrpkit.analyze(model, A, R=torch.tensor([[5.0, 12.0]]))
    torch.testing.assert_close(expl.relevance, torch.tensor([[12.0, 5.0]]))
    # a composite may map another rule of the registered class onto it: ε = 1 gives s = [5/6, 12/7]
    composite = lrpkit.Composite(lrpkit.GlobalTypeMap({Mix: lrpkit.rules.EpsilonRule(1.0)}))
    expl = lrpkit.analyze(model, A, composite, R=torch.tensor([[5.0, 12.0]]))
    torch.testing.assert_close(expl.relevance, torch.tensor([[3 * (2 * 5 / 6 + 12 / 7), -5 / 6 + 3 * 12 / 7]]))


def test_custom_layer_inside_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), Mix(torch.randn(2, 2)), nn.Linear(2, 3)).eval()
    with lrpkit.Registry().rule(Mix, lrpkit.rules.EpsilonRule(epsilon=1e-9)):
        expl = lrpkit.analyze(model, torch.rand(2, 4), lrpkit.Composite(lrpkit.GlobalMap(lrpkit.rules.ZeroRule())))
    assert expl.relevance.shape == (2, 4) and torch.isfinite(expl.relevance).all()
    with pytest.raises(lrpkit.CanonizationError, match="Mix"):  # the registration ended with the block
        lrpkit.canonize(model)


class Softsign2(nn.Module):
    """A custom element-wise activation: x / (1 + |x|)."""

    def forward(self, x):
        return x / (1 + x.abs())


def test_registered_pass_rule_may_be_mapped_by_a_composite():
    # PassRule on a custom layer: registered as its default, a composite may map another PassRule onto it too
    model = nn.Sequential(Softsign2()).eval()
    composite = lrpkit.Composite(lrpkit.GlobalTypeMap({Softsign2: lrpkit.rules.PassRule()}))
    with lrpkit.registered(rules={Softsign2: lrpkit.rules.PassRule()}):
        # an element-wise activation: R = [5, 12] passes through unchanged, R_in = [5, 12]
        expl = lrpkit.analyze(model, A, composite, R=torch.tensor([[5.0, 12.0]]))
    torch.testing.assert_close(expl.relevance, torch.tensor([[5.0, 12.0]]))
    # outside the block the layer is unknown again, and PassRule no longer accepts it
    assert not lrpkit.rules.PassRule().accepts(Softsign2())
    # an unregistered layer type is refused, and the message lists what PassRule handles (not Linear)
    with pytest.raises(lrpkit.rules.IncompatibleRuleError, match="PassRule.*ReLU") as err:
        lrpkit.rules.PassRule().check(nn.Linear(2, 2))
    assert "Linear" not in str(err.value).split("handles")[1]
