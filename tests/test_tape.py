"""The propagation options of the tape (lrpkit.tape.Tape): where to stop, where the graph starts, which
intermediate relevances are kept; and that observers see every layer once."""

import torch
from torch import nn

import lrpkit
from lrpkit.plan import Plan
from lrpkit.rules.base import divide
from lrpkit.tape import Tape


def model():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), block, nn.Linear(4, 3)).double().eval()


def run(lrp, x, **options):
    tape = Tape(lrp.plan, **options)
    with torch.enable_grad():
        out = tape.forward(lrp.steps, x)
    R = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0).detach()
    return tape, tape.backward(lrp.steps, R)


X = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_relevance_at_keeps_the_input_relevance_of_any_layer():
    lrp = lrpkit.LRP(model())
    expl = lrp(X, layerwise=True)
    tape, R = run(lrp, X, relevance_at={s.index for s in lrp.all_steps})
    assert torch.equal(R, expl.relevance)
    for k, step in enumerate(lrp.steps):  # the top-level ones equal the layerwise relevance
        assert torch.equal(tape.relevances[step.index], expl.layerwise[k])


def test_stop_after_ends_the_loop_and_returns_the_relevance_above():
    lrp = lrpkit.LRP(model())
    expl = lrp(X, layerwise=True)
    # stop after the last Linear (top-level layer 3): the relevance at its output is the output relevance
    last = lrp.steps[-1]
    tape, R = run(lrp, X, stop_after=last.index, relevance_at={s.index for s in lrp.all_steps})
    assert tape.stopped and torch.equal(R, expl.layerwise[-1])
    assert tape.relevances == {}  # nothing below was computed
    # stop after layer 1 (the ReLU): layers 3 and 2 ran, the loop returns the ReLU's output relevance
    tape, R = run(lrp, X, stop_after=lrp.steps[1].index)
    assert torch.equal(R, expl.layerwise[2])


def test_graph_from_starts_the_graph_at_that_layer():
    lrp = lrpkit.LRP(model(), lrpkit.methods.chefer_composite())
    first = lrp.steps[0]
    tape = Tape(lrp.plan, graph_from=first.index)
    with torch.enable_grad():
        out = tape.forward(lrp.steps, X)
    assert out.requires_grad  # Chefer's rules pass the graph on
    tape = Tape(lrp.plan)
    with torch.enable_grad():
        assert not tape.forward(lrp.steps, X).requires_grad  # no graph without the option


def test_hand_outs_and_the_plan_table():
    lrp = lrpkit.LRP(model())
    assert isinstance(lrp.plan, Plan)
    table = lrp.plan.table()
    assert len(table.splitlines()) == len(lrp.all_steps)
    assert "gated" in table and "drops_output" in table  # Linear → ReLU → Linear with ε


def test_stop_at_ends_at_a_nested_layers_output_and_backward_from_goes_on_through_it_only():
    lrp = lrpkit.LRP(model())  # the nested Sequential is flattened: layer 4 is the block's second Linear
    expl = lrp(X, layerwise=True)
    tape, R = run(lrp, X, stop_at=lrp.steps[4].index)
    assert tape.reached_stop and torch.equal(R, expl.layerwise[5])  # the relevance at its output
    assert set(tape.records) == {s.index for s in lrp.steps[:5]}  # it and those below it keep their records
    R_in = tape.backward_from(lrp.steps, lrp.steps[4].index, R)
    torch.testing.assert_close(R_in, expl.relevance, rtol=1e-12, atol=0)  # on the main path: plain LRP


def test_stop_at_inside_a_residual_connection_leaves_its_rule_and_the_identity_path():
    torch.manual_seed(0)
    inner = lrpkit.Chain([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], ["f.0", "f.1", "f.2"])
    chain = lrpkit.Chain([nn.Linear(4, 4), lrpkit.SkipConnection(inner), nn.Linear(4, 3)], ["a", "f", "b"])
    chain = chain.double().eval()
    lrp = lrpkit.LRP(chain)
    skip, head = lrp.steps[1], lrp.steps[2]
    last = skip.children[0][-1]
    # stopped at the inner chain's output: the residual split's share f(a) ⊙ R_y / stab(y) (y = a + f(a))
    tape, R_f = run(lrp, X, stop_at=last.index)
    full, R_full = run(lrp, X, relevance_at={head.index})
    with torch.no_grad():
        a = chain[0](X)
        f, y = inner(a), a + inner(a)
    s = full.relevances[head.index] / (y + 1e-6 * torch.where(y >= 0, 1.0, -1.0))
    assert tape.reached_stop
    torch.testing.assert_close(R_f, f * s, rtol=1e-9, atol=1e-15)
    # from there through f and the layers below the connection; the identity path a ⊙ s is left out
    R_in = tape.backward_from(lrp.steps, last.index, R_f)
    around = lrpkit.LRP(chain, lrpkit.Composite(*lrp.composite.primitives, lrpkit.NameMap({"f": AroundTheBranch()})))
    torch.testing.assert_close(R_in + around(X).relevance, R_full, rtol=1e-10, atol=1e-15)


class AroundTheBranch(lrpkit.rules.SkipConnectionRule):
    """Only the identity path of ``y = a + f(a)``: ``R_a = a ⊙ R / stab(y)``."""

    def lrp(self, step, rec, R, tape):
        return rec.extras["summands"][0] * divide(R, rec.output, self.epsilon)


def test_relevance_at_the_first_layer_of_a_residual_branch_is_that_layers_own():
    # y = a + f(a), f = [Linear, ReLU, Linear]: the input relevance of f's first Linear is R_f propagated through f
    # alone. The residual rule then adds the identity path's share a ⊙ s to the tensor the branch returned (in
    # place); the kept relevance must not see that: its total is R_f's share of the output, not all of it.
    torch.manual_seed(0)
    inner = lrpkit.Chain([nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False)],
                         ["f.0", "f.1", "f.2"])
    chain = lrpkit.Chain([nn.Linear(4, 4, bias=False), lrpkit.SkipConnection(inner), nn.Linear(4, 3, bias=False)],
                         ["a", "f", "b"]).double().eval()
    lrp = lrpkit.LRP(chain, lrpkit.Composite(lrpkit.GlobalMap(lrpkit.rules.EpsilonRule(1e-12))))
    first = lrp.steps[1].children[0][0]
    tape, R = run(lrp, X, relevance_at={first.index, lrp.steps[1].index})
    with torch.no_grad():
        a = chain[0](X)
        f, y = inner(a), a + inner(a)
    R_y = run(lrp, X, relevance_at={lrp.steps[2].index})[0].relevances[lrp.steps[2].index]
    s = R_y / (y + 1e-6 * torch.where(y >= 0, 1.0, -1.0))  # the split: R_f = f ⊙ s, R_a = a ⊙ s
    torch.testing.assert_close(tape.relevances[first.index].sum(1), (f * s).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tape.relevances[lrp.steps[1].index], tape.relevances[first.index] + a * s,
                               rtol=1e-9, atol=1e-12)  # the connection's own input relevance: both paths


def test_stop_after_a_layer_inside_a_residual_connection_returns_that_layers_output_relevance():
    # stop after f's last Linear (inside y = a + f(a)): the result is the relevance at its output, f(a) ⊙ R_y /
    # stab(y), not the connection's (the loop leaves the connection's rule unfinished)
    torch.manual_seed(0)
    inner = lrpkit.Chain([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], ["f.0", "f.1", "f.2"])
    chain = lrpkit.Chain([nn.Linear(4, 4), lrpkit.SkipConnection(inner), nn.Linear(4, 3)], ["a", "f", "b"])
    lrp = lrpkit.LRP(chain.double().eval())
    skip, head = lrp.steps[1], lrp.steps[2]
    tape, R = run(lrp, X, stop_after=skip.children[0][-1].index)
    full, _ = run(lrp, X, relevance_at={head.index})
    with torch.no_grad():
        a = chain[0](X)
        f, y = inner(a), a + inner(a)
    assert tape.stopped and not tape.reached_stop
    s = full.relevances[head.index] / (y + 1e-6 * torch.where(y >= 0, 1.0, -1.0))
    torch.testing.assert_close(R, f * s, rtol=1e-9, atol=1e-15)
