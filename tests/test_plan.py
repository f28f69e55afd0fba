"""The execution plan (``lrpkit.plan.Plan``, ``LRP(model).plan``) as data: which layers below a ReLU get the
cheaper stabiliser ``relu(z) + ε`` and drop their output, which ReLUs run in place in the recording pass, which
inputs are recomputed, and that the plan never changes a result."""

from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

import lrpkit
from lrpkit import presets, rules
from lrpkit.plan import Plan
from lrpkit.tape import owns_memory


def _plan(lrp):
    return [(type(s.layer).__name__, lrp.plan[s.index].gated, lrp.plan[s.index].relu_in_place,
             lrp.plan[s.index].keep_output) for s in lrp.all_steps if not s.children]


def _unplanned(lrp):
    """The same analyzer with the ReLU plan switched off: every layer keeps its output and uses stab(z)."""
    lrp.plan = Plan(lrp.steps, relus=False)
    return lrp


def _eps():
    return lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule()))


def test_the_plan_of_a_small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 8), nn.LeakyReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    composite = lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule()),
                                 lrpkit.LastLayerMap(rules.FlatRule()))
    assert _plan(lrpkit.LRP(model, composite)) == [
        # conv → ReLU → conv (ε: R_in = a ⊙ c vanishes with its input): gated, output dropped, ReLU in place
        ("Conv2d", True, False, False), ("ReLU", False, True, False),
        # conv → ReLU → Flatten (PassRule is not known to vanish with its input): kept as it was
        ("Conv2d", False, False, True), ("ReLU", False, False, False),
        ("Flatten", False, False, False),
        # a LeakyReLU passes relevance where z < 0: no plan
        ("Linear", False, False, True), ("LeakyReLU", False, False, False),
        # Linear → ReLU → Linear with LRP-flat (input replaced by ones, R_in ≠ 0 where a = 0): not gated;
        # LRP-flat recomputes its own denominator and keeps no output
        ("Linear", False, False, True), ("ReLU", False, False, False), ("Linear", False, False, False)]


def test_the_plan_with_term_rules_and_a_relu_at_the_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    plan = _plan(lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.ZPlusRule()))))
    # z⁺ keeps no output anyway: both ReLUs run in place; its terms (a⁺, a⁻) vanish with a, so the first conv is
    # gated (z⁺ computes its own denominator and ignores the gate); the last conv has nothing above its ReLU
    assert plan == [("Conv2d", True, False, False), ("ReLU", False, True, False),
                    ("Conv2d", False, False, False), ("ReLU", False, True, False)]


def test_zbox_does_not_vanish_with_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    composite = lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule()),
                                 lrpkit.RangeMap(range(2, 3), rules.ZBoxRule(-1.0, 1.0)))
    assert _plan(lrpkit.LRP(model, composite))[0] == ("Conv2d", False, False, True)


def _models():
    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 16), nn.ReLU(),
                          nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    return {"mixed": mixed, "resnet18": torchvision.models.resnet18(num_classes=7).eval()}


COMPOSITES = {
    "epsilon": _eps,
    "EpsilonPlusFlat": presets.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: presets.EpsilonGammaBox(-3.0, 3.0),
    "flat above a ReLU": lambda: lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule()),
                                                  lrpkit.LastLayerMap(rules.FlatRule()),
                                                  lrpkit.RangeMap(range(8, 11), rules.FlatRule())),
}


@pytest.mark.parametrize("model_name", ["mixed", "resnet18"])
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_the_plan_changes_no_result(model_name, composite):
    model = _models()[model_name]
    size = 16 if model_name == "mixed" else 48
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    planned = lrpkit.LRP(model, COMPOSITES[composite]())
    assert any(p.gated for p in planned.plan)
    reference = _unplanned(lrpkit.LRP(model, COMPOSITES[composite]()))
    x_before = x.clone()
    a, b = planned(x, layerwise=True), reference(x, layerwise=True)
    assert torch.equal(x, x_before)  # the in-place ReLUs never touch the user's input
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-6, atol=1e-12)
    for ra, rb in zip(a.layerwise, b.layerwise):
        torch.testing.assert_close(ra, rb, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(a.accounting.input, b.accounting.input, rtol=1e-6, atol=1e-9)
    assert a.accounting.parts.keys() == b.accounting.parts.keys()
    for key in a.accounting.parts:
        torch.testing.assert_close(a.accounting.parts[key], b.accounting.parts[key], rtol=1e-5, atol=1e-6)


def test_a_recomputed_input_is_the_output_of_the_layer_below():
    """LayerNorm → its affine Scale → Linear (a transformer's MLP): neither the LayerNorm's nor the Scale's output is
    kept; the reverse loop recomputes the Linear's input, which is the Scale's output, and the Scale's rule finds it
    in its record instead of computing it a third time; so does the LayerNorm's rule, which needs the normalised
    output y as well (``R / stab(y)``): LayerNorm normalises twice, not three times."""
    from lrpkit.layers import Chain, LayerNormalize, Scale

    torch.manual_seed(0)
    chain = Chain([nn.Linear(4, 6), LayerNormalize(), Scale(torch.rand(6) + 0.5, torch.rand(6)),
                   nn.Linear(6, 3)]).eval()
    lrp = lrpkit.LRP(chain, _eps())
    norm, scale, top = (lrp.plan[s.index] for s in lrp.steps[1:])
    assert (norm.keep_output, scale.keep_output, scale.lazy_input, top.lazy_input) == (False, False, True, True)
    calls = []
    for step in lrp.steps[1:3]:
        step.layer.register_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    layer_norm = lrp.steps[1].layer
    normalize = layer_norm.normalize  # also what the module's forward calls
    layer_norm.normalize = lambda x: calls.append("normalize") or normalize(x)  # on this copy only
    e = lrp(torch.randn(2, 4))
    # the recording pass, and one recomputation each
    assert sorted(calls) == ["LayerNormalize", "LayerNormalize", "Scale", "Scale", "normalize", "normalize"]
    assert e.relevance.abs().sum() > 0


def test_a_wrong_gate_would_be_seen():
    """The equality above can fail: gating a layer whose relevance does not vanish where z ≤ 0 (LRP-flat above
    the ReLU spreads relevance onto zero inputs) divides by ε there instead of by z − ε."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    composite = lambda: lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule()),  # noqa: E731
                                         lrpkit.LastLayerMap(rules.FlatRule()))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    right = lrpkit.LRP(model, composite())
    assert not right.plan[0].gated
    wrong = lrpkit.LRP(model, composite())  # the plan as if LRP-flat's relevance vanished where z ≤ 0
    wrong.plan.steps[0] = replace(wrong.plan[0], gated=True, takes_gate=True, keep_output=False)
    wrong.plan.steps[2] = replace(wrong.plan[2], gate_to=0)
    assert not torch.allclose(wrong(x).relevance, right(x).relevance, rtol=1e-3)


def test_the_gate_by_hand():
    """z = (2, −1), ReLU, then y = a₁ + a₂ with ε: R_y = 1 → R_a = a ⊙ 1/stab(y) = (2, 0)/(2 + ε).
    Below the ReLU the gate gives s = R_a / (relu(z) + ε) = (2/(2+ε)/(2+ε), 0) instead of R_a / stab(z);
    R_x = x ⊙ Wᵀ s with W = diag(1, 1), x = (2, −1): (4/(2+ε)², 0)."""
    eps = 1e-6
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        second.weight.fill_(1.0)
    model = nn.Sequential(first, nn.ReLU(), second).eval().double()
    lrp = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule(eps))))
    assert lrp.plan[0].gated and lrp.plan[0].takes_gate and lrp.plan[2].gate_to == 0
    R = lrp(torch.tensor([[2.0, -1.0]], dtype=torch.float64)).relevance
    torch.testing.assert_close(R, torch.tensor([[4 / (2 + eps) ** 2, 0.0]], dtype=torch.float64), rtol=1e-14,
                               atol=0)


def test_owns_memory():
    a = torch.randn(2, 3)
    assert owns_memory(a * 2, a)
    assert not owns_memory(a, a)  # the input itself
    assert not owns_memory(a.view(3, 2), a)  # a view
    assert not owns_memory(a[0], torch.randn(3))  # a view of something else
    assert not owns_memory(a.clone().requires_grad_(), a)


def test_the_plan_keeps_the_model_and_its_outputs():
    model = _models()["resnet18"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    expected = model(x)
    explanation = lrpkit.analyze(model, x, _eps())
    torch.testing.assert_close(explanation.output, expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
