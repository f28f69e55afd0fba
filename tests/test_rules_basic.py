"""The basic rules, derived by hand on tiny layers, their conservation, and their errors on incompatible layers.

The Linear of the hand-derived cases (fixture ``linear2``): ``z = W a + b``, ``W = [[2, -1], [1, 3]]`` (row j:
the weights of output j), ``b = [1, -2]``. Unless said otherwise ``a = [3, 1]`` and the output relevance is the
explicit ``R = [3, 2]``. Then ``z = [2·3 − 1 + 1, 3 + 3 − 2] = [6, 4]`` and ``Σ_i a_i w_ji = [5, 6]``.
"""

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import rules
from lrpkit.layers import Chain, SkipConnection, Sum

A = torch.tensor([[3.0, 1.0]])
R = torch.tensor([[3.0, 2.0]])


def close(x, expected, atol=1e-5):
    torch.testing.assert_close(x, torch.tensor([expected], dtype=x.dtype), rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# hand-derived cases on the 2x2 Linear
# --------------------------------------------------------------------------------------------------------------

def test_zero_rule_by_hand(linear2, rule_lrp):
    # s = R / z = [3/6, 2/4] = [1/2, 1/2]
    # c = Wᵀ s = [2·1/2 + 1·1/2, −1·1/2 + 3·1/2] = [3/2, 1]
    # R_in = a ⊙ c = [3·3/2, 1·1] = [4.5, 1]; the bias takes b·s = 1/2 − 1 = −1/2, and 4.5 + 1 − 1/2 = 5 = ΣR
    close(rule_lrp(linear2, rules.ZeroRule(), A, R), [4.5, 1.0])


def test_epsilon_rule_by_hand(linear2, rule_lrp):
    # ε = 2: s = R / (z + 2·sign z) = [3/8, 2/6] = [3/8, 1/3]
    # c = Wᵀ s = [2·3/8 + 1/3, −3/8 + 3·1/3] = [13/12, 5/8];  R_in = [3·13/12, 1·5/8] = [3.25, 0.625]
    close(rule_lrp(linear2, rules.EpsilonRule(epsilon=2.0), A, R), [3.25, 0.625])
    # the default ε = 1e-6 is LRP-0 up to 1e-6
    close(rule_lrp(linear2, rules.EpsilonRule(), A, R), [4.5, 1.0])
    assert rules.EpsilonRule().epsilon == 1e-6


def test_epsilon_sign_of_zero_is_positive(rule_lrp):
    # z = a·w = 0 exactly: stab(0) = 0 + ε·(+1) = ε, so R_in = a·w·R/ε = 0 (not NaN)
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    out = rule_lrp(layer, rules.EpsilonRule(0.5), torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    close(out, [0.0])
    # z = −1 (a = −0.5): stab(−1) = −1.5, R_in = −0.5·2·1/(−1.5) = 2/3
    out = rule_lrp(layer, rules.EpsilonRule(0.5), torch.tensor([[-0.5]]), torch.tensor([[1.0]]))
    close(out, [2.0 / 3.0])


def test_gamma_rule_by_hand(linear2, rule_lrp):
    # γ = 1: W' = W + W⁺ = [[4, −1], [2, 6]], b' = b + b⁺ = [2, −2]
    # z' = W'a + b' = [12 − 1 + 2, 6 + 6 − 2] = [13, 10];  s = R / z' = [3/13, 1/5]
    # c = W'ᵀ s = [4·3/13 + 2/5, −3/13 + 6/5] = [86/65, 63/65];  R_in = [3·86/65, 63/65]
    close(rule_lrp(linear2, rules.GammaRule(gamma=1.0), A, R), [258 / 65, 63 / 65])
    assert rules.GammaRule().gamma == 0.25


def test_wsquare_rule_by_hand(linear2, rule_lrp):
    # input replaced by ones, weight and bias squared (as in zennit):
    # z' = Σ_i w_ji² + b_j² = [4 + 1 + 1, 1 + 9 + 4] = [6, 14];  s = [3/6, 2/14] = [1/2, 1/7]
    # R_i = Σ_j w_ji² s_j: R_1 = 4/2 + 1/7 = 15/7, R_2 = 1/2 + 9/7 = 25/14  (independent of a)
    close(rule_lrp(linear2, rules.WSquareRule(), A, R), [15 / 7, 25 / 14])
    close(rule_lrp(linear2, rules.WSquareRule(), -5 * A, R), [15 / 7, 25 / 14])


def test_flat_rule_by_hand(linear2, rule_lrp):
    # input and weights replaced by ones, bias by zero: z' = [2, 2], s = [3/2, 1]
    # every input gets Σ_j s_j = 5/2: R_in = [2.5, 2.5] (exactly conservative: 5 = ΣR)
    close(rule_lrp(linear2, rules.FlatRule(), A, R), [2.5, 2.5])


def test_zplus_rule_by_hand(linear2, rule_lrp):
    # a = [3, 1] (non-negative): W⁺ = [[2, 0], [1, 3]], b⁺ = [1, 0]
    # z⁺ = W⁺a + b⁺ = [6 + 1, 3 + 3] = [7, 6];  s = [3/7, 1/3]
    # c = W⁺ᵀ s = [2·3/7 + 1/3, 3·1/3] = [25/21, 1];  R_in = [3·25/21, 1] = [25/7, 1]
    close(rule_lrp(linear2, rules.ZPlusRule(), A, R), [25 / 7, 1.0])
    # a = [3, −1]: the negative input pairs with the negative weights, a⁺W⁺ + a⁻W⁻ + b⁺ with W⁻ = [[0, −1], [0, 0]]:
    # z⁺ = [2·3 + (−1)(−1) + 1, 1·3 + 0 + 0] = [8, 3];  s = [3/8, 2/3]
    # R_1 = a⁺_1 (W⁺ᵀ s)_1 = 3·(2·3/8 + 1·2/3) = 17/4;  R_2 = a⁻_2 (W⁻ᵀ s)_2 = (−1)·(−1·3/8) = 3/8
    close(rule_lrp(linear2, rules.ZPlusRule(), torch.tensor([[3.0, -1.0]]), R), [17 / 4, 3 / 8])


def test_alphabeta_rule_by_hand(linear2, rule_lrp):
    # α = 2, β = 1, a = [3, 1]:
    # z⁺ = W⁺a + b⁺ = [6 + 1, 3 + 3 + 0] = [7, 6];  z⁻ = W⁻a + b⁻ = [−1 + 0, 0 − 2] = [−1, −2]
    # R_1 = a_1 [α (w⁺_11 R_1/z⁺_1 + w⁺_21 R_2/z⁺_2) − β (w⁻_11 R_1/z⁻_1 + w⁻_21 R_2/z⁻_2)]
    #     = 3 [2 (2·3/7 + 1·2/6) − 0] = 6·25/21 = 50/7
    # R_2 = 1 [2 (0·3/7 + 3·2/6) − ((−1)·3/(−1) + 0)] = 2 − 3 = −1
    close(rule_lrp(linear2, rules.AlphaBetaRule(alpha=2, beta=1), A, R), [50 / 7, -1.0])
    # α = 1, β = 0 is z⁺
    close(rule_lrp(linear2, rules.AlphaBetaRule(alpha=1, beta=0), A, R), [25 / 7, 1.0])


def test_alphabeta_rejects_bad_parameters():
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        rules.AlphaBetaRule(alpha=2, beta=2)
    with pytest.raises(ValueError, match=">= 0"):
        rules.AlphaBetaRule(alpha=-1, beta=-2)


def test_zbox_rule_by_hand(linear2, rule_lrp):
    # low = 0, high = 4, a = [3, 1]: R_i = Σ_j (a_i w_ji − l w⁺_ji − h w⁻_ji) / z^B_j · R_j, where the bias cancels:
    # z^B_j = (Σ_i a_i w_ji + b_j) − (Σ_i l w⁺_ji + b⁺_j) − (Σ_i h w⁻_ji + b⁻_j) = Σ_i a_i w_ji − l Σ w⁺ − h Σ w⁻
    # z^B = [5 − 0 − 4·(−1), 6 − 0 − 0] = [9, 6];  s = [3/9, 2/6] = [1/3, 1/3]
    # R_1 = (3·2)·1/3 + (3·1)·1/3 = 3;  R_2 = (1·(−1) − 4·(−1))·1/3 + (1·3)·1/3 = 2   (exactly ΣR = 5)
    # (low = 0 makes the l-term's input zero; its bias b⁺ must still enter z^B: this case checks that)
    close(rule_lrp(linear2, rules.ZBoxRule(low=0.0, high=4.0), A, R), [3.0, 2.0])
    # per-feature bounds as tensors: low = [−1, 0], high = [4, 2]
    # z^B_1 = 5 − (−1·2 + 0·0) − (4·0 + 2·(−1)) = 5 + 2 + 2 = 9;  z^B_2 = 6 − (−1·1 + 0·3) − 0 = 7
    # R_1 = (3·2 − (−1)·2)·3/9 + (3·1 − (−1)·1)·2/7 = 8/3 + 8/7;  R_2 = (−1 − 2·(−1))·3/9 + (3 − 0)·2/7 = 1/3 + 6/7
    out = rule_lrp(linear2, rules.ZBoxRule(low=torch.tensor([-1.0, 0.0]), high=torch.tensor([4.0, 2.0])), A, R)
    close(out, [8 / 3 + 8 / 7, 1 / 3 + 6 / 7])


def test_generalized_gamma_rule_by_hand(linear2, rule_lrp):
    # γ = 1, a = [3, −1]: z = Wa + b = [6 + 1 + 1, 3 − 3 − 2] = [8, −2]; a⁺ = [3, 0], a⁻ = [0, −1]
    # output 1 (z > 0): a⁺ with W + γW⁺ (row [4, −1]), a⁻ with W + γW⁻ (row [2, −2]), bias b + γb⁺ = 2:
    #   products [3·4, (−1)(−2)] = [12, 2], z↑ = 12 + 2 + 2 = 16, s = 3/16 -> [36/16, 6/16]
    # output 2 (z < 0): a⁺ with W + γW⁻ (row [1, 3]), a⁻ with W + γW⁺ (row [2, 6]), bias b + γb⁻ = −4:
    #   products [3·1, (−1)·6] = [3, −6], z↓ = 3 − 6 − 4 = −7, s = 2/(−7) -> [−6/7, 12/7]
    # R_in = [9/4 − 6/7, 3/8 + 12/7]
    out = rule_lrp(linear2, rules.GeneralizedGammaRule(gamma=1.0), torch.tensor([[3.0, -1.0]]), R)
    close(out, [9 / 4 - 6 / 7, 3 / 8 + 12 / 7])
    # on non-negative inputs with positive outputs it is the plain γ-rule
    x = torch.tensor([[3.0, 2.0]])  # z = [5, 7] > 0
    torch.testing.assert_close(rule_lrp(linear2, rules.GeneralizedGammaRule(gamma=1.0), x, R),
                               rule_lrp(linear2, rules.GammaRule(gamma=1.0), x, R))


def test_pass_rule_by_hand(rule_lrp):
    # ReLU: R_in = R, whatever the input (also where the ReLU is off)
    x, r = torch.tensor([[3.0, -1.0]]), torch.tensor([[3.0, 2.0]])
    close(rule_lrp(nn.ReLU(), rules.PassRule(), x, r), [3.0, 2.0])
    # Flatten: the relevance is reshaped back to the input's shape
    out = rule_lrp(nn.Flatten(), rules.PassRule(), torch.ones(1, 2, 2), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))


# --------------------------------------------------------------------------------------------------------------
# convolution and pooling
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def conv1d():
    """Conv1d, one channel, kernel [1, 2], no bias: on a = [1, 2, 3], z = [1·1 + 2·2, 1·2 + 2·3] = [5, 8]."""
    layer = nn.Conv1d(1, 1, kernel_size=2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, 2.0]]]))
    return layer


def test_zero_rule_on_conv1d_by_hand(conv1d, rule_lrp):
    # R = [10, 16]: s = R / z = [2, 2]
    # a_1 is only in window 1 (weight 1): R_1 = 1·1·2 = 2
    # a_2 is in window 1 (weight 2) and window 2 (weight 1): R_2 = 2·(2·2 + 1·2) = 12
    # a_3 is only in window 2 (weight 2): R_3 = 3·2·2 = 12;   2 + 12 + 12 = 26 = 10 + 16
    out = rule_lrp(conv1d, rules.ZeroRule(), torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[10.0, 16.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[2.0, 12.0, 12.0]]]))


def test_flat_rule_on_conv1d_by_hand(conv1d, rule_lrp):
    # every window sums two ones: z' = [2, 2], s = [5, 8]; each input gets the s of the windows it lies in:
    # R = [5, 5 + 8, 8] = [5, 13, 8]  (the receptive fields, not the weights, decide)
    out = rule_lrp(conv1d, rules.FlatRule(), torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[10.0, 16.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[5.0, 13.0, 8.0]]]))


def test_alphabeta_on_conv2d_by_hand(rule_lrp):
    # Conv2d 1->1, kernel [[1, −1], [2, 0]], no bias, a = [[1, 2], [3, 4]] (one window): z⁺ = 1 + 6 = 7, z⁻ = −2
    # α=2, β=1, R = 1: R_in = 2·[1·1, 0, 3·2, 0]/7 − 1·[0, 2·(−1), 0, 0]/(−2) = [2/7, −1, 12/7, 0]
    layer = nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]]))
    out = rule_lrp(layer, rules.AlphaBetaRule(), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]),
                   torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(out, torch.tensor([[[[2 / 7, -1.0], [12 / 7, 0.0]]]]))


def test_zero_rule_on_pooling_by_hand(rule_lrp):
    # AvgPool1d(2) on a = [1, 3]: z = 2; R_in = a ⊙ (1/2)·R/z = [1·1/2·1/2, 3·1/2·1/2] = [1/4, 3/4]
    out = rule_lrp(nn.AvgPool1d(2), rules.ZeroRule(), torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[1.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.25, 0.75]]]))
    # MaxPool1d(2) on a = [1, 3]: all relevance to the maximum
    out = rule_lrp(nn.MaxPool1d(2), rules.ZeroRule(), torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[1.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]]]))


# --------------------------------------------------------------------------------------------------------------
# skip connection and parallel sum, by hand
# --------------------------------------------------------------------------------------------------------------

def _scalar_linear(w):
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(w)
    return layer


def test_skip_connection_split_by_hand():
    # y = a + 3a with a = 2: y = 8; R = 1 splits into R_a = 2/8 = 1/4 and R_f = 6/8 = 3/4, and R_f passes the
    # linear branch unchanged (LRP-0 on one weight): R_in = 1/4 + 3/4 = 1
    chain = Chain([SkipConnection(Chain([_scalar_linear(3.0)]))]).eval()
    lrp = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))
    expl = lrp(torch.tensor([[2.0]]), layerwise=True)
    close(expl.relevance, [1.0])
    # with ε = 8 on the split: s = 1/(8 + 8) -> R_a = 2/16, R_f = 6/16, R_in = 1/2; the other half is "stabilizer"
    lrp = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule()),
                                             lrpkit.GlobalTypeMap({SkipConnection: rules.SkipConnectionRule(8.0)})))
    expl = lrp(torch.tensor([[2.0]]))
    close(expl.relevance, [0.5])
    torch.testing.assert_close(expl.accounting.parts["stabilizer"], torch.tensor([0.5]), rtol=0, atol=1e-6)


def test_sum_split_by_hand():
    # y = 3a + (−1)a with a = 2: y = 6 − 2 = 4; R = 1 splits into 6/4 = 3/2 and −2/4 = −1/2, each passed through its
    # branch: R_in = 3/2 − 1/2 = 1
    chain = Chain([Sum(Chain([_scalar_linear(3.0)]), Chain([_scalar_linear(-1.0)]))]).eval()
    expl = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(torch.tensor([[2.0]]))
    close(expl.relevance, [1.0])
    # the branch shares: inspect the layerwise relevance of a two-layer chain (Sum, then a final Linear w = 1)
    chain = Chain([Sum(Chain([_scalar_linear(3.0)]), Chain([_scalar_linear(-1.0)])), _scalar_linear(1.0)]).eval()
    expl = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(torch.tensor([[2.0]]),
                                                                                   layerwise=True)
    close(expl.layerwise[1], [1.0])


# --------------------------------------------------------------------------------------------------------------
# conservation on bias-free networks
# --------------------------------------------------------------------------------------------------------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 5, bias=False)).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    # no pooling: a rule that multiplies by the input (LRP-0 on AvgPool) loses the relevance that LRP-flat / w² put
    # on switched-off units, so Flat and w² conserve only in nets where every layer has the rule under test or Pass
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4, bias=False)).eval()


CONSERVING = {
    "zero": rules.ZeroRule(),
    "epsilon-tiny": rules.EpsilonRule(1e-9),
    "zplus": rules.ZPlusRule(stabilizer=1e-9),
    "alpha2beta1": rules.AlphaBetaRule(2, 1, stabilizer=1e-9),
    "alpha3beta2": rules.AlphaBetaRule(3, 2, stabilizer=1e-9),
    "flat": rules.FlatRule(epsilon=1e-9),
    "wsquare": rules.WSquareRule(epsilon=1e-9),
    "gamma": rules.GammaRule(0.25, epsilon=1e-9),
    "generalized-gamma": rules.GeneralizedGammaRule(0.25, stabilizer=1e-9),
    "zbox": rules.ZBoxRule(0.0, 1.0, stabilizer=1e-9),
}


@pytest.mark.parametrize("name", sorted(CONSERVING))
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_conservation_bias_free(name, make):
    # positive inputs in [0, 1] (z⁺-type rules conserve on them; z^B needs them inside its box); Σ R_in = Σ R_out.
    # (αβ conserves only where every output has positive and negative contributions: the layers are wide enough.)
    model = make()
    x = torch.rand(3, 8) if make is _mlp else torch.rand(3, 3, 10, 10)
    lrp = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalTypeMap({(nn.Linear, nn.Conv2d): CONSERVING[name]})))
    expl = lrp(x, target=[0, 1, 2], normalize_output=False)
    acc = expl.accounting
    torch.testing.assert_close(expl.relevance.flatten(1).sum(1), acc.output, rtol=1e-4, atol=1e-6)
    assert acc.output.abs().min() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(acc.total(), acc.output, rtol=1e-5, atol=1e-6)
    for part in acc.parts.values():
        assert part.abs().max() < 1e-4 * acc.output.abs().max()


def test_pass_and_skip_conserve():
    # a residual net of Linear layers (LRP-0), ReLU (Pass) and skip / sum splits: everything conserves
    torch.manual_seed(1)
    inner = Chain([nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False)])
    chain = Chain([nn.Linear(4, 6, bias=False), nn.ReLU(), SkipConnection(inner), nn.ReLU(),
                   Sum(Chain([nn.Linear(6, 6, bias=False)]), Chain([nn.Linear(6, 6, bias=False), nn.ReLU()])),
                   nn.Linear(6, 3, bias=False)]).eval()
    x = torch.rand(4, 4)
    expl = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(x, target=0)
    torch.testing.assert_close(expl.relevance.sum(1), torch.ones(4), rtol=1e-4, atol=1e-5)


def test_epsilon_absorbs_and_alphabeta_does_not_conserve_without_negative_part(linear2, rule_lrp):
    # the checks above can fail: a large ε absorbs relevance (R_in = [3.25, 0.625] sums to 3.875 < 5) ...
    assert rule_lrp(linear2, rules.EpsilonRule(2.0), A, R).sum() < 4.0
    # ... and α2β1 on an output without negative contributions gives α·R: W = [[1, 2], [1, 1]], a = [3, 1],
    # R = [3, 0]: z⁺_1 = 3 + 2 = 5, z⁻_1 = 0 (the β-term has nothing to take), R_in = 2·[3, 2]·3/5 = [18/5, 12/5]
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [1.0, 1.0]]))
    close(rule_lrp(layer, rules.AlphaBetaRule(), A, torch.tensor([[3.0, 0.0]])), [18 / 5, 12 / 5])


# --------------------------------------------------------------------------------------------------------------
# incompatible layers
# --------------------------------------------------------------------------------------------------------------

def test_gamma_on_relu_is_a_clear_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with pytest.raises(rules.IncompatibleRuleError) as err:
        lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalTypeMap({nn.ReLU: rules.GammaRule()})))
    msg = str(err.value)
    assert "GammaRule" in msg and "ReLU" in msg and "layer 1" in msg and "GlobalTypeMap" in msg


def test_flat_on_maxpool_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)).eval()
    with pytest.raises(rules.IncompatibleRuleError) as err:
        lrpkit.LRP(model, lrpkit.Composite(lrpkit.NameMap({"2": rules.FlatRule()})))
    msg = str(err.value)
    assert "FlatRule" in msg and "MaxPool2d" in msg and "layer 2" in msg


def test_pass_on_linear_is_a_clear_error():
    model = nn.Sequential(nn.Linear(2, 2)).eval()
    with pytest.raises(rules.IncompatibleRuleError, match=r"PassRule.*Linear.*layer 0"):
        lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Linear: rules.PassRule()})))


def test_every_rule_has_a_docstring_with_a_formula():
    for cls in (rules.ZeroRule, rules.EpsilonRule, rules.GammaRule, rules.WSquareRule, rules.FlatRule,
                rules.ZBoxRule, rules.AlphaBetaRule, rules.ZPlusRule, rules.PassRule, rules.GeneralizedGammaRule,
                rules.SkipConnectionRule, rules.SumRule):
        assert cls.__doc__ and "R" in cls.__doc__, cls


class _GenericFlat(rules.FlatRule):
    """LRP-flat through the generic rule: ones as input and weights, a full forward and transposed convolution."""

    prepare = rules.Rule.prepare
    lrp = rules.Rule.lrp


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 8)),
    (nn.Conv2d(3, 4, 7, stride=2, padding=3), (2, 3, 16, 15)),  # ResNet's stem: padding, stride, odd sizes
    (nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=2), (2, 2, 20)),
    (nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 5, 3)),
    (nn.Linear(6, 4), (3, 6)),
    (nn.Linear(6, 4), (2, 5, 6)),  # tokens
    (nn.Conv2d(4, 4, 3, groups=2), (2, 4, 6, 6)),  # grouped: the generic path itself
], ids=["conv2d", "conv2d-stem", "conv1d-dilated", "conv3d", "linear", "linear-tokens", "conv2d-groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_closed_form_equals_the_generic_rule(layer, shape, dtype):
    # the single-channel closed form must give what ones-input, ones-weight LRP gives through the generic rule
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    R = torch.rand_like(model(x))
    fast = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.FlatRule())))(x, R=R).relevance
    slow = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(_GenericFlat())))(x, R=R).relevance
    assert fast.dtype == dtype and fast.shape == x.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-12)
    assert (fast.sum() - R.sum()).abs() < 1e-4 * R.sum()  # flat conserves (zero bias, no sign flips)
