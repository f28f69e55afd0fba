"""The weight-only vector-Jacobian products equal autograd's for every linear layer configuration."""

import pytest
import torch

from lrpkit.layers import Scale
from lrpkit.rules.vjp import has_input_vjp, input_vjp

CASES = {
    "linear-tokens": (torch.nn.Linear(4, 3), (2, 7, 4)),
    "scale": (Scale(torch.tensor([2.0, -1.0, 0.5])), (2, 5, 3)),
    "conv2d-stride-pad": (torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "conv2d-dilated-grouped-odd": (torch.nn.Conv2d(4, 6, 3, stride=3, padding=2, dilation=2, groups=2), (2, 4, 11, 10)),
    "conv2d-1x1-strided": (torch.nn.Conv2d(4, 4, 1, stride=2), (2, 4, 7, 7)),
    "conv1d": (torch.nn.Conv1d(2, 4, 3, groups=2, dilation=2, stride=2), (2, 2, 12)),
    "conv3d": (torch.nn.Conv3d(2, 2, 2, stride=2), (2, 2, 5, 5, 5)),
}


@pytest.mark.parametrize("case", CASES)
def test_input_vjp_equals_autograd(case):
    torch.manual_seed(0)
    layer, shape = CASES[case]
    a = torch.randn(shape, requires_grad=True)
    z = layer(a)
    s = torch.randn_like(z)
    (expected,) = torch.autograd.grad(z, a, s)
    assert has_input_vjp(layer)
    assert torch.allclose(input_vjp(layer, s, a.shape), expected, atol=1e-6)


def test_padding_modes_other_than_zeros_use_autograd():
    assert not has_input_vjp(torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert not has_input_vjp(torch.nn.Conv2d(1, 1, 3, padding="same"))
