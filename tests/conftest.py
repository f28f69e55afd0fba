"""Shared fixtures: the 2-input/2-output Linear of the hand-derived rule cases and a one-layer LRP helper; every
test's isolation from the others (registries, torch's global state, environment, random seeds)."""

import os
import zlib

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import registry


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Every test leaves the process as it found it, whatever order the tests run in (pytest-randomly): the
    process-wide rule and canonizer registries and the active registry scopes, torch's default dtype, thread count
    and grad mode, and the environment variables. (pytest restores the warnings filters itself.)"""
    dtype, threads, grad, environ = torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(), \
        dict(os.environ)
    with registry.isolated():
        yield
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:  # e.g. the CLI's --threads, run in-process
        torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)


def _seed_torch(item, offset: int) -> None:
    """Seed torch's global generator for this test, as pytest-randomly seeds ``random`` and numpy (it does not seed
    torch): from the run's seed (``--randomly-seed``; 0 with ``-p no:randomly``) and the test's id, so that a test
    draws the same numbers whatever ran before it, and a run is reproduced by its seed."""
    base = item.config.getoption("randomly_seed", default=0)
    base = base if isinstance(base, int) else 0
    torch.manual_seed((base + zlib.crc32(item.nodeid.encode()) + offset) % 2**32)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _seed_torch(item, -1)  # before the fixtures: a module-scoped model built in this test's setup


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    _seed_torch(item, 0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    _seed_torch(item, 1)


@pytest.fixture
def linear2():
    """``z = W a + b`` with ``W = [[2, -1], [1, 3]]`` (rows: outputs) and ``b = [1, -2]``."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0], [1.0, 3.0]]))
        layer.bias.copy_(torch.tensor([1.0, -2.0]))
    return layer


@pytest.fixture
def rule_lrp():
    """``rule_lrp(layer, rule, x, R)``: the input relevance of one layer under ``rule`` for output relevance ``R``."""

    def run(layer, rule, x, R):
        model = nn.Sequential(layer).eval()
        composite = lrpkit.Composite(lrpkit.GlobalTypeMap({type(layer): rule}))
        return lrpkit.LRP(model, composite)(x, R=R).relevance

    return run


@pytest.fixture(scope="session")
def randomize_bn():
    """``randomize_bn(model, seed)``: non-trivial running statistics and affine parameters for every BatchNorm,
    so that BatchNorm fusion is really exercised (:func:`helpers.randomize_bn`)."""
    from helpers import randomize_bn

    return randomize_bn


# One intra-op thread: the test models are tiny, and on a shared machine with few cores torch's thread pool spends
# far more time synchronising than computing (measured: LRP + zennit on VGG16-BN ~10x less CPU time).
torch.set_num_threads(1)
