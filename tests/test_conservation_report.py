"""lrpkit.evaluate.conservation_report on cases whose answer is known by hand."""

import pytest
import torch

import lrpkit
from lrpkit.evaluate import conservation_report


def test_bias_free_epsilon_net_conserves_and_a_bias_is_reported():
    # one layer z = 2·a1 + 3·a2 (+ b); a = (1, 1): z = 5 without bias.
    layer = torch.nn.Linear(2, 1, bias=True)
    layer.weight.data = torch.tensor([[2.0, 3.0]])
    layer.bias.data = torch.tensor([0.0])
    net = torch.nn.Sequential(layer).eval()
    composite = lrpkit.Composite(lrpkit.GlobalMap(lrpkit.rules.ZeroRule()))
    x = torch.tensor([[1.0, 1.0]])
    report = conservation_report(lrpkit.analyze(net, x, composite, normalize_output=False))
    # R = z = 5 at the output; inputs get 2 and 3: all of it, ratio 1
    assert torch.allclose(report["output"], torch.tensor([5.0]))
    assert torch.allclose(report["input"], torch.tensor([5.0]))
    assert torch.allclose(report["ratio"], torch.tensor([1.0]))
    # with b = 5: z = 10, the bias takes b/z · R = 5/10 · 10 = 5, the inputs 2 + 3 = 5, ratio 0.5
    layer.bias.data = torch.tensor([5.0])
    report = conservation_report(lrpkit.analyze(net, x, composite, normalize_output=False))
    assert torch.allclose(report["bias"], torch.tensor([5.0]))
    assert torch.allclose(report["ratio"], torch.tensor([0.5]))
    assert torch.allclose(report["residual"], torch.tensor([0.0]), atol=1e-6)


def test_non_lrp_explanations_are_refused():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
    expl = lrpkit.methods.Gradient(net)(torch.ones(1, 2))
    with pytest.raises(ValueError, match="accounting"):
        conservation_report(expl)
