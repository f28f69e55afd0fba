"""``LRP`` / ``analyze``: targets, explicit output relevance, normalisation, layerwise relevance, accounting,
batches, input errors, training mode and threads."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import presets, rules


def _cnn(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, bias=bias),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16, bias=bias), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(16, 5, bias=bias)).eval()


@pytest.fixture(scope="module")
def cnn():
    return _cnn()


@pytest.fixture(scope="module")
def lrp(cnn):
    return lrpkit.LRP(cnn, presets.EpsilonPlusFlat())


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------------------
# targets and output relevance
# --------------------------------------------------------------------------------------------------------------

def test_default_target_is_argmax(lrp, cnn, x):
    expl = lrp(x)
    assert torch.equal(expl.target, cnn(x).argmax(1))
    torch.testing.assert_close(expl.output, cnn(x), rtol=1e-5, atol=1e-6)
    assert expl.relevance.shape == x.shape and expl.method == "LRP"


def test_int_list_and_tensor_targets(lrp, x):
    per_sample = torch.stack([lrp(x, target=t).relevance for t in range(5)])  # (class, B, ...)
    expl = lrp(x, target=2)
    assert expl.target.tolist() == [2, 2, 2]
    torch.testing.assert_close(expl.relevance, per_sample[2])
    for target in ([4, 0, 3], torch.tensor([4, 0, 3]), (4, 0, 3)):
        expl = lrp(x, target=target)
        assert expl.target.tolist() == [4, 0, 3]
        torch.testing.assert_close(expl.relevance, torch.stack([per_sample[4, 0], per_sample[0, 1], per_sample[3, 2]]))


def test_explicit_R_equals_one_hot_target(lrp, x):
    one_hot = torch.zeros(3, 5)
    one_hot[:, 1] = 1.0
    torch.testing.assert_close(lrp(x, R=one_hot).relevance, lrp(x, target=1).relevance)
    assert lrp(x, R=one_hot).target is None
    # R is linear: R = 2·e_1 − e_3 gives 2·R(e_1) − R(e_3)
    R = torch.zeros(3, 5)
    R[:, 1], R[:, 3] = 2.0, -1.0
    torch.testing.assert_close(lrp(x, R=R).relevance, 2 * lrp(x, target=1).relevance - lrp(x, target=3).relevance,
                               rtol=1e-4, atol=1e-6)


def test_normalize_output_false_scales_by_the_logit(lrp, x):
    # every rule is linear in the relevance it receives: starting from the logit f_t(x) instead of 1 multiplies
    # the whole explanation by f_t(x)
    ones = lrp(x, target=[0, 1, 2])
    logit = lrp(x, target=[0, 1, 2], normalize_output=False)
    f = ones.output[torch.arange(3), torch.tensor([0, 1, 2])]
    assert (f.abs() > 1e-3).all()
    torch.testing.assert_close(logit.relevance, ones.relevance * f.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(logit.accounting.output, f)
    torch.testing.assert_close(ones.accounting.output, torch.ones(3))


def test_layerwise(lrp, x):
    expl = lrp(x, target=0, layerwise=True)
    chain = lrp.chain
    assert len(expl.layerwise) == len(chain) + 1
    torch.testing.assert_close(expl.layerwise[0], expl.relevance)
    one_hot = torch.zeros(3, 5)
    one_hot[:, 0] = 1
    torch.testing.assert_close(expl.layerwise[-1], one_hot)
    a = x
    for k, layer in enumerate(chain):  # layerwise[k] has the shape of layer k's input
        assert expl.layerwise[k].shape == a.shape, k
        a = layer(a)
    assert lrp(x).layerwise is None


def test_accounting_adds_up(lrp, x):
    acc = lrp(x, target=[0, 1, 2]).accounting
    torch.testing.assert_close(acc.total(), acc.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.input, lrp(x, target=[0, 1, 2]).relevance.flatten(1).sum(1))
    assert set(acc.parts) >= {"bias"} and acc.parts["bias"].abs().max() > 1e-4  # this net has biases
    assert "output" in str(acc)
    # per layer: the parts of all layers sum to the totals
    per_layer = {}
    for _, _, parts in acc.layers:
        for key, value in parts.items():
            per_layer[key] = per_layer.get(key, 0) + value
    for key in acc.parts:
        torch.testing.assert_close(per_layer[key], acc.parts[key])


def test_accounting_of_a_bias_free_net(x):
    # LRP-0 everywhere on a bias-free net: nothing is absorbed
    model = _cnn(bias=False)
    acc = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(x).accounting
    torch.testing.assert_close(acc.input, acc.output, rtol=1e-4, atol=1e-6)
    assert acc.parts.get("bias", torch.zeros(3)).abs().max() < 1e-5
    assert acc.parts.get("stabilizer", torch.zeros(3)).abs().max() < 1e-4


def test_accounting_bias_part_by_hand(linear2):
    # LRP-0 on z = Wa + b (W = [[2, −1], [1, 3]], b = [1, −2]), a = [3, 1], R = [3, 2]: s = R/z = [1/2, 1/2];
    # the bias takes b·s = 1/2 − 1 = −1/2, the input 5.5, output 5 = 5.5 − 1/2
    acc = lrpkit.LRP(nn.Sequential(linear2).eval(), lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(
        torch.tensor([[3.0, 1.0]]), R=torch.tensor([[3.0, 2.0]])).accounting
    torch.testing.assert_close(acc.output, torch.tensor([5.0]))
    torch.testing.assert_close(acc.input, torch.tensor([5.5]))
    torch.testing.assert_close(acc.parts["bias"], torch.tensor([-0.5]))
    assert acc.parts.get("stabilizer", torch.zeros(1)).abs().max() < 1e-6


def test_accounting_bias_part_of_a_token_wise_linear_by_hand():
    # LRP-0 on z = W a + b per token, W = identity, b = [1, 1], two tokens a₁ = [1, 3], a₂ = [3, 5]:
    # z₁ = [2, 4], z₂ = [4, 6]; R = 1 everywhere (Σ R = 4), so s = R / z: s₁ = [1/2, 1/4], s₂ = [1/4, 1/6].
    # The bias takes Σ_tokens b·s = 1/2 + 1/4 + 1/4 + 1/6 = 7/6; the input R_a = a ⊙ s: 1/2 + 3/4 + 3/4 + 5/6 = 17/6;
    # 17/6 + 7/6 = 4.
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.copy_(torch.tensor([1.0, 1.0]))
    model = nn.Sequential(linear).eval()
    x = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])  # (batch 1, 2 tokens, 2 features)
    acc = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.ZeroRule())))(x, R=torch.ones(1, 2, 2)).accounting
    torch.testing.assert_close(acc.output, torch.tensor([4.0]))
    torch.testing.assert_close(acc.parts["bias"], torch.tensor([7 / 6]))
    torch.testing.assert_close(acc.input, torch.tensor([17 / 6]))


def test_accounting_is_worked_out_when_first_read(lrp, x, monkeypatch):
    # the reverse loop only sums; each layer's split into sinks runs on the first read, and gives what an eager
    # accounting gives (the sums are the same tensors, the arithmetic the same in the same order)
    import copy
    import pickle

    from lrpkit import accounting

    calls = []
    split = accounting._split_loss
    monkeypatch.setattr(accounting, "_split_loss", lambda *a: calls.append(1) or split(*a))
    expl = lrp(x, target=[0, 1, 2])
    assert calls == []
    acc = expl.accounting
    assert isinstance(acc, lrpkit.Accounting) and calls == []
    layers = acc.layers
    assert len(calls) > 0 and len(layers) > 0
    n = len(calls)
    torch.testing.assert_close(acc.total(), acc.output, rtol=1e-5, atol=1e-6)
    assert len(calls) == n  # once: the fields stay
    for deferred in (lrp(x, target=[0, 1, 2]).accounting, lrp(x, target=[0, 1, 2]).accounting):
        for other in (copy.deepcopy(deferred), pickle.loads(pickle.dumps(deferred))):
            for name in ("output", "input"):
                assert torch.equal(getattr(other, name), getattr(acc, name))
            assert other.parts.keys() == acc.parts.keys()
            assert all(torch.equal(other.parts[k], acc.parts[k]) for k in acc.parts)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lrp(x).accounting.nothing


def test_batch_equals_single_samples(lrp, x):
    batch = lrp(x, target=[1, 3, 0])
    for b, t in enumerate([1, 3, 0]):
        single = lrp(x[b:b + 1], target=t)
        torch.testing.assert_close(batch.relevance[b:b + 1], single.relevance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(batch.accounting.input[b:b + 1], single.accounting.input, rtol=1e-5, atol=1e-7)


def test_batch_equals_single_samples_with_term_rules(x):
    # z^B / α2β1 / generalized γ skip terms whose input is zero over the whole batch: a batch mixing positive and
    # negative inputs must still give every sample its own result
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    torch.manual_seed(3)
    xs = torch.cat([torch.rand(1, 4), -torch.rand(1, 4)])
    for rule in (rules.ZBoxRule(-1.0, 1.0), rules.AlphaBetaRule(), rules.GeneralizedGammaRule(), rules.ZPlusRule()):
        lrp = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rule)))
        batch = lrp(xs, target=0).relevance
        for b in range(2):
            torch.testing.assert_close(batch[b:b + 1], lrp(xs[b:b + 1], target=0).relevance, rtol=1e-5, atol=1e-7)


def test_analyzer_is_reusable_and_analyze_agrees(lrp, cnn, x):
    first = lrp(x[:1]).relevance
    lrp(x[1:])
    torch.testing.assert_close(lrp(x[:1]).relevance, first)  # no state left behind between calls
    torch.testing.assert_close(lrpkit.analyze(cnn, x[:1], presets.EpsilonPlusFlat()).relevance, first)
    torch.testing.assert_close(lrpkit.analyze(cnn, x[:1]).relevance, first)  # EpsilonPlusFlat is the CNN default


def test_analyze_mlp_with_leading_flatten():
    # the default preset's LRP-flat lands on the first Linear, not on the Flatten before it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    expl = lrpkit.analyze(model, torch.rand(2, 2, 2))
    assert expl.relevance.shape == (2, 2, 2)
    assert "FlatRule" in lrpkit.LRP(model).table().splitlines()[2]


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------

def test_missing_batch_dimension(lrp):
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        lrp(torch.rand(3, 12, 12))


def test_missing_batch_dimension_linear_model():
    # Linear(4) first: x of shape (4,) lacks the batch dimension; x of shape (2, 5) has the wrong feature count
    lrp = lrpkit.LRP(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval())
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        lrp(torch.rand(4))
    with pytest.raises(ValueError, match=r"\(B, \.\.\., 4\)") as err:
        lrp(torch.rand(2, 5))
    assert "unsqueeze" not in str(err.value)


def test_wrong_channel_count(lrp):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lrp(torch.rand(1, 4, 12, 12))


def test_wrong_dtype(lrp):
    with pytest.raises(TypeError, match="float64.*float32"):
        lrp(torch.rand(1, 3, 12, 12, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        lrp(torch.ones(1, 3, 12, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lrp([[1.0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wrong_device(lrp):
    with pytest.raises(ValueError, match="cuda"):
        lrp(torch.rand(1, 3, 12, 12, device="cuda"))


def test_target_errors(lrp, x):
    with pytest.raises(ValueError, match=r"out of range.*5 outputs"):
        lrp(x, target=5)
    with pytest.raises(ValueError, match=r"\[-1\] out of range"):
        lrp(x, target=[0, -1, 2])
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        lrp(x, target=[0, 1])
    with pytest.raises(TypeError, match="int"):
        lrp(x, target=1.5)


def test_R_errors(lrp, x):
    with pytest.raises(ValueError, match=r"R has shape \(3, 4\).*\(3, 5\)"):
        lrp(x, R=torch.ones(3, 4))
    with pytest.raises(ValueError, match="either target or R"):
        lrp(x, target=0, R=torch.ones(3, 5))


def test_training_mode_warns_and_leaves_the_model_alone(x):
    model = _cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode.*eval"):
        lrp = lrpkit.LRP(model)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the explanation is the one of the eval-mode model (dropout off)
    expected = lrpkit.LRP(_cnn())(x).relevance
    torch.testing.assert_close(lrp(x).relevance, expected)
    assert model.training


# --------------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------------

def test_two_analyzers_on_two_threads(cnn, x):
    a = lrpkit.LRP(cnn, presets.EpsilonPlusFlat())
    b = lrpkit.LRP(cnn, presets.EpsilonAlpha2Beta1())
    inputs = [torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    serial = [(a(xi, target=1).relevance, b(xi, target=2).relevance) for xi in inputs]

    def work(analyzer, target):
        return [analyzer(xi, target=target).relevance for xi in inputs]

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(work, a, 1), pool.submit(work, b, 2), pool.submit(work, a, 1), pool.submit(work, b, 2)]
        results = [f.result() for f in futures]
    for k in range(len(inputs)):
        for res in results[0::2]:
            torch.testing.assert_close(res[k], serial[k][0])
        for res in results[1::2]:
            torch.testing.assert_close(res[k], serial[k][1])
