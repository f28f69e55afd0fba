"""What a rule author sees: the three modification hooks (also on an instance), closed forms that keep no graph
unless they ask, and the traits the plan reads (safe defaults)."""

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit.rules import EpsilonRule, PassRule, Rule
from lrpkit.traits import Traits


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).double().eval()


X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class PositiveWeights(Rule):
    def __init__(self):
        self.epsilon = 1e-9

    def modify_param(self, p, name):
        return p.clamp(min=0)


def composite(rule):
    return lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Linear: rule}))


def test_a_hook_set_on_an_instance_is_honoured():
    by_subclass = lrpkit.analyze(net(), X, composite(PositiveWeights())).relevance
    rule = Rule()
    rule.modify_param = lambda p, name: p.clamp(min=0)
    assert rule.modifies_params and rule.prepare(nn.Linear(2, 2)) is not None
    by_instance = lrpkit.analyze(net(), X, composite(rule)).relevance
    plain = lrpkit.analyze(net(), X, composite(Rule())).relevance
    assert plain.abs().sum() > 0  # a case where relevance gets through
    assert torch.equal(by_instance, by_subclass)
    assert not torch.allclose(by_instance, plain)  # the hook changed the result: it was not ignored


def test_what_a_rule_modifies_follows_its_hooks_as_they_are_set_and_removed():
    rule = EpsilonRule()
    assert not rule.modifies_input and rule.traits(nn.Linear(2, 2)).uses_gate  # asked once: the answer is kept
    rule.modify_input = lambda a: a.clamp(min=0)
    assert rule.modifies_input and not rule.traits(nn.Linear(2, 2)).uses_gate
    del rule.modify_input
    assert not rule.modifies_input and rule.traits(nn.Linear(2, 2)).uses_gate


def test_the_denominator_hook_on_an_instance_is_honoured():
    rule = EpsilonRule()
    rule.modify_denominator = lambda z: z + 100.0  # a huge stabiliser: almost nothing gets through
    assert not rule.traits(nn.Linear(2, 2)).uses_gate  # the plan must not hand it the cheaper gate
    R = lrpkit.analyze(net(), X, composite(rule)).relevance
    assert R.abs().sum() < 0.1 * lrpkit.analyze(net(), X, composite(EpsilonRule())).relevance.abs().sum()


@pytest.mark.parametrize("name", ["lrp", "forward", "prepare", "traits"])
def test_replacing_a_planned_method_on_an_instance_is_refused(name):
    with pytest.raises(TypeError, match=f"define a subclass that overrides {name}"):
        setattr(EpsilonRule(), name, lambda *args: None)


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


class DoubleRule(Rule):
    """y = 2x: R_in = R."""

    targets = accepted = (Double,)

    def lrp(self, step, record, R, tape):
        assert not record.input.requires_grad and record.output.grad_fn is None  # no graph was kept
        return R


def test_a_closed_form_keeps_no_graph():
    model = nn.Sequential(nn.Linear(3, 3), Double(), nn.Linear(3, 2)).eval()
    with lrpkit.registered(rules={Double: DoubleRule()}):
        lrp = lrpkit.LRP(model)
    assert not lrp.plan[1].traits.graph
    lrp(torch.rand(2, 3))  # the assertion inside the rule


def test_a_rule_that_asks_for_a_graph_gets_one():
    class GraphDouble(DoubleRule):
        def traits(self, layer):
            return Traits(graph=True)

        def forward(self, step, x, tape):
            a = x.detach().requires_grad_(True)
            with torch.enable_grad():
                return lrpkit.propagate.Record(a, step.layer(a))

        def lrp(self, step, record, R, tape):
            (g,) = torch.autograd.grad(record.output, record.input, R)
            return record.input.detach() * g / (2 * record.input.detach())

    model = nn.Sequential(nn.Linear(3, 3), Double(), nn.Linear(3, 2)).eval()
    with lrpkit.registered(rules={Double: GraphDouble()}):
        lrp = lrpkit.LRP(model)
    assert lrp.plan[1].traits.graph
    assert torch.isfinite(lrp(torch.rand(2, 3)).relevance).all()


def test_default_traits():
    lin, pool = nn.Linear(2, 2), nn.AvgPool2d(2)
    # the generic rule: reuses the output, may take the gate on a linear layer, keeps a graph only where the
    # layer's VJP needs one (pooling)
    assert Rule().traits(lin) == Traits(output=True, lazy_input=True, vanishes_with_input=True,
                                        output_in_record_only=True, uses_gate=True)
    assert Rule().traits(pool).graph and not Rule().traits(pool).lazy_input
    # a closed form gets the safe defaults for everything its lrp decides (its forward is the generic one,
    # which leaves the output only in the record)
    assert DoubleRule().traits(Double()) == Traits(output_in_record_only=True)
    assert PassRule().traits(nn.ReLU()).moves_only and not PassRule().traits(nn.ReLU()).output
