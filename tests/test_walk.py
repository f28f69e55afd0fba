"""The one walker over the chain (lrpkit.walk): order, paths, nesting; run equals the chain's forward."""

import torch
import torchvision

from lrpkit import canonize
from lrpkit.layers import Chain, Multiply, SkipConnection, Sum
from lrpkit.walk import run, walk


def small():
    lin = torch.nn.Linear(2, 2)
    inner = Chain([torch.nn.ReLU(), lin], ["a.relu", "a.fc"])
    gate = Chain([torch.nn.Sigmoid()], ["g.act"])
    return Chain([SkipConnection(inner), Sum(Chain([]), Chain([torch.nn.Tanh()], ["t"])),
                  Multiply(Chain([]), gate)], ["block", "sum", "se"])


def test_order_paths_and_nesting():
    visits = list(walk(small()))
    assert [(v.index, v.path, v.name, v.depth, v.parent, v.branch, v.is_container) for v in visits] == [
        (0, "0", "block", 0, None, 0, True), (1, "0.inner.0", "a.relu", 1, 0, 0, False),
        (2, "0.inner.1", "a.fc", 1, 0, 0, False), (3, "1", "sum", 0, None, 0, True),
        (4, "1.branch1.0", "t", 1, 3, 1, False), (5, "2", "se", 0, None, 0, True),
        (6, "2.branch1.0", "g.act", 1, 5, 1, False)]
    # post-order: the order in which outputs are produced; the indices stay depth-first
    assert [v.index for v in walk(small(), post_order=True)] == [1, 2, 0, 4, 3, 6, 5]


def test_run_is_the_forward_and_sees_every_layer():
    torch.manual_seed(0)
    chain = canonize(torchvision.models.resnet18(num_classes=4).eval())
    x = torch.randn(2, 3, 32, 32)
    seen = []
    out = run(chain, x, seen=lambda layer, a, y: seen.append(layer))
    torch.testing.assert_close(out, chain(x), rtol=0, atol=0)
    assert len(seen) == len(list(walk(chain)))
