"""The propagation options of the tape (lrpkit.tape.Tape): where to stop, where the graph starts, which
intermediate relevances are kept; and that observers see every layer once."""

import torch
from torch import nn

import lrpkit
from lrpkit.plan import Plan
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


X = torch.rand(3, 4, dtype=torch.float64)


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
