"""Scoped registration: a custom layer's rule or canonizer registered for a block (or one analyzer) changes nothing
outside it; the process-wide registry changes only through register_rule / register_canonizer outside any block.
"""

import asyncio
import threading

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import registry
from lrpkit.canonize import flatten, join, make_chain, register_canonizer
from lrpkit.rules import EpsilonRule, PassRule, ZeroRule


class Double(nn.Module):
    """y = 2x, element-wise."""

    def forward(self, x):
        return 2 * x


class Triple(Double):
    def forward(self, x):
        return 3 * x


class Block(nn.Module):
    """x + fc(x): a container canonization cannot see into."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x)


def canonize_block(block, path):
    return [(path, lrpkit.SkipConnection(make_chain(flatten(block.fc, join(path, "fc")))))]


def model_with(layer):
    return nn.Sequential(nn.Linear(3, 3), layer, nn.Linear(3, 2)).eval()


def accepted(model) -> bool:
    try:
        lrpkit.canonize(model)
    except lrpkit.CanonizationError:
        return False
    return True


# -- a block ----------------------------------------------------------------------------------------------------
def test_a_rule_registered_in_a_block_holds_only_there():
    model, rule = model_with(Double()), PassRule()
    before = dict(registry.GLOBAL.rules)
    assert not accepted(model)
    with lrpkit.registered(rules={Double: rule}) as reg:
        assert isinstance(reg, lrpkit.Registry)
        assert registry.default_rule(Double()) is rule and registry.is_registered(Double())
        assert "PassRule" in lrpkit.LRP(model).table().splitlines()[2]
        expl = lrpkit.analyze(model, torch.rand(2, 3))
        assert torch.isfinite(expl.relevance).all()
    assert not accepted(model) and registry.default_rule(Double()) is None
    assert dict(registry.GLOBAL.rules) == before
    assert registry.active() == (registry.GLOBAL,)


def test_a_registry_object_chains_and_is_reusable():
    reg = lrpkit.Registry()
    assert reg.rule(Double, PassRule()) is reg and reg.canonizer(Block, canonize_block) is reg
    assert set(reg.rules) == {Double} and set(reg.canonizers) == {Block}
    with pytest.raises(TypeError):
        reg.rules[Triple] = PassRule()  # a read-only view: register with .rule()
    for _ in range(2):
        with reg:
            assert accepted(model_with(Double())) and accepted(nn.Sequential(Block()))
        assert not accepted(model_with(Double())) and not accepted(nn.Sequential(Block()))
    assert "Double: PassRule()" in repr(reg) and "Block: canonize_block" in repr(reg)


def test_leaving_a_block_restores_even_on_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with lrpkit.registered(rules={Double: PassRule()}):
            raise RuntimeError("inside")
    assert registry.default_rule(Double()) is None and registry.active() == (registry.GLOBAL,)


def test_nested_blocks_layer_over_each_other():
    outer_rule, inner_rule = PassRule(), PassRule()
    with lrpkit.registered(rules={Double: outer_rule}):
        with lrpkit.registered(rules={Double: inner_rule}, canonizers={Block: canonize_block}):
            assert registry.default_rule(Double()) is inner_rule  # same type: the innermost registration wins
            assert registry.canonizer_for(Block()) is canonize_block
        assert registry.default_rule(Double()) is outer_rule
        assert registry.canonizer_for(Block()) is None
        with lrpkit.registered(rules={Triple: inner_rule}):  # another type: the outer one still shows
            assert registry.default_rule(Double()) is outer_rule and registry.default_rule(Triple()) is inner_rule
    assert registry.default_rule(Double()) is None


def test_the_nearest_class_in_the_mro_wins():
    base_rule, sub_rule = PassRule(), PassRule()
    with lrpkit.registered(rules={Double: base_rule}):
        assert registry.default_rule(Triple()) is base_rule  # a subclass without a registration of its own
    with lrpkit.registered(rules={Triple: sub_rule}):
        with lrpkit.registered(rules={Double: base_rule}):
            # an inner block registering a parent class does not override the subclass registered outside it,
            # as registering both process-wide would not
            assert registry.default_rule(Triple()) is sub_rule and registry.default_rule(Double()) is base_rule
    # the built-in defaults are not overridden by a block that registers a parent class
    with lrpkit.registered(rules={nn.Module: PassRule()}):
        assert isinstance(registry.default_rule(nn.Linear(2, 2)), ZeroRule)
        assert accepted(model_with(Double()))


def test_a_canonizer_registered_in_a_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Block(), nn.Linear(3, 2)).eval()
    with pytest.raises(lrpkit.CanonizationError, match="Block"):
        lrpkit.canonize(model)
    with lrpkit.registered(canonizers={Block: canonize_block}):
        chain = lrpkit.canonize(model)
    assert [type(layer).__name__ for layer in chain] == ["Linear", "SkipConnection", "Linear"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(chain(x), model(x))
    with pytest.raises(lrpkit.CanonizationError, match="Block"):
        lrpkit.canonize(model)


def test_entering_the_same_registry_twice():
    reg = lrpkit.Registry().rule(Double, PassRule())
    with reg:
        with reg:
            assert registry.active() == (registry.GLOBAL, reg, reg)
        assert registry.active() == (registry.GLOBAL, reg)
    assert registry.active() == (registry.GLOBAL,)
    with pytest.raises(RuntimeError, match="not active"):
        reg.__exit__(None, None, None)


# -- process-wide -----------------------------------------------------------------------------------------------
def test_register_rule_outside_a_block_is_process_wide():
    rule = PassRule()
    with registry.isolated():
        lrpkit.register_rule(Double, rule)
        lrpkit.register_canonizer(Block, canonize_block)
        assert registry.GLOBAL.rules[Double] is rule and registry.GLOBAL.canonizers[Block] is canonize_block
        assert accepted(model_with(Double()))
        # a block over it overrides, and leaving the block shows the process-wide registration again
        with lrpkit.registered(rules={Double: EpsilonRule()}):
            assert isinstance(registry.default_rule(Double()), EpsilonRule)
        assert registry.default_rule(Double()) is rule
    # isolated() put the process-wide registry back
    assert Double not in registry.GLOBAL.rules and Block not in registry.GLOBAL.canonizers


def test_register_rule_inside_a_block_adds_to_that_block():
    with lrpkit.registered() as outer:
        with lrpkit.registered() as inner:
            lrpkit.register_rule(Double, PassRule())
            lrpkit.register_canonizer(Block, canonize_block)
        assert Double in inner.rules and Block in inner.canonizers and not outer.rules
        assert registry.default_rule(Double()) is None
    assert Double not in registry.GLOBAL.rules and Block not in registry.GLOBAL.canonizers


def test_isolated_also_closes_blocks_left_open():
    reg = lrpkit.Registry().rule(Double, PassRule())
    with registry.isolated():
        reg.__enter__()
        assert registry.is_registered(Double())
    assert registry.active() == (registry.GLOBAL,)


def test_the_builtin_defaults_and_canonizers_are_process_wide():
    assert isinstance(registry.GLOBAL.rules[nn.Linear], ZeroRule)
    assert isinstance(registry.GLOBAL.rules[nn.ReLU], PassRule)
    assert isinstance(registry.GLOBAL.rules[lrpkit.SkipConnection], lrpkit.rules.SkipConnectionRule)
    torchvision = pytest.importorskip("torchvision")
    assert registry.canonizer_for(torchvision.models.resnet18()) is not None


# -- per analyzer ---------------------------------------------------------------------------------------------
def test_a_registry_for_one_analyzer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), Double(), Block(), nn.Linear(3, 2, bias=False)).eval()
    reg = lrpkit.Registry().rule(Double, PassRule()).canonizer(Block, canonize_block)
    lrp = lrpkit.LRP(model, registry=reg)
    assert registry.active() == (registry.GLOBAL,)  # nothing stays active after the construction
    assert "PassRule" in lrp.table()  # the table (which maps the composite again) sees the registry too
    x = torch.rand(4, 3)
    expl = lrp(x)
    assert expl.relevance.shape == (4, 3) and torch.isfinite(expl.relevance).all()
    with pytest.raises(lrpkit.CanonizationError):  # another analyzer of the same model does not see it
        lrpkit.LRP(model)
    # the same as in a block
    with reg:
        torch.testing.assert_close(lrpkit.LRP(model)(x).relevance, expl.relevance)


def test_scope_is_what_the_analyzer_wraps():
    reg = lrpkit.Registry().rule(Double, PassRule())
    with registry.scope(None):
        assert registry.active() == (registry.GLOBAL,)
    with registry.scope(reg):
        assert registry.active() == (registry.GLOBAL, reg)
    assert registry.active() == (registry.GLOBAL,)
    with pytest.raises(TypeError, match="lrpkit.Registry"):
        registry.scope({Double: PassRule()})


# -- threads and tasks ------------------------------------------------------------------------------------------
def test_a_block_is_seen_only_by_its_own_thread():
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with lrpkit.registered(rules={Double: PassRule()}):
            entered.set()
            checked.wait(10)
            seen["worker"] = registry.is_registered(Double())
        seen["worker after"] = registry.is_registered(Double())

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    seen["main"] = registry.is_registered(Double())
    checked.set()
    thread.join(10)
    assert seen == {"main": False, "worker": True, "worker after": False}


def test_one_registry_entered_by_two_threads_at_once():
    reg = lrpkit.Registry().rule(Double, PassRule())
    barrier = threading.Barrier(2, timeout=10)
    seen = []

    def worker(order):
        with reg:
            barrier.wait()  # both inside
            if order:
                barrier.wait()  # the other one has left
            seen.append(registry.is_registered(Double()))
            if not order:
                barrier.wait()
        seen.append(registry.is_registered(Double()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen.count(True) == 2 and seen.count(False) == 2


def test_asyncio_tasks_keep_their_own_blocks():
    async def task(rule, ready, other_ready):
        with lrpkit.registered(rules={Double: rule}):
            ready.set()
            await other_ready.wait()  # the other task is inside its own block now
            return registry.default_rule(Double())

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        ra, rb = PassRule(), PassRule()
        got = await asyncio.gather(task(ra, a, b), task(rb, b, a))
        return got == [ra, rb] and got[0] is ra and got[1] is rb

    assert asyncio.run(main())
    assert registry.active() == (registry.GLOBAL,)


# -- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("register", [
    lambda t, r: lrpkit.register_rule(t, r),
    lambda t, r: lrpkit.Registry().rule(t, r),
    lambda t, r: lrpkit.registered(rules={t: r}),
], ids=["register_rule", "Registry.rule", "registered"])
def test_rule_registration_errors_name_the_fix(register):
    with pytest.raises(TypeError, match=r"instance of Double; pass the class itself: Double"):
        register(Double(), PassRule())
    with pytest.raises(TypeError, match=r"nn.Module subclass, got <class 'int'>; pass the class"):
        register(int, PassRule())
    with pytest.raises(TypeError, match=r"nn.Module subclass, got 'Double'"):
        register("Double", PassRule())
    with pytest.raises(TypeError, match=r"not its class: PassRule\(\) instead of PassRule"):
        register(Double, PassRule)
    with pytest.raises(TypeError, match=r"lrpkit.rules.Rule\), got 'pass'.*EpsilonRule\(\)"):
        register(Double, "pass")
    assert registry.default_rule(Double()) is None and Double not in registry.GLOBAL.rules


@pytest.mark.parametrize("register", [
    lambda t, f: lrpkit.register_canonizer(t, f),
    lambda t, f: register_canonizer(t, f),  # lrpkit.canonize.register_canonizer
    lambda t, f: lrpkit.Registry().canonizer(t, f),
    lambda t, f: lrpkit.registered(canonizers={t: f}),
], ids=["register_canonizer", "canonize.register_canonizer", "Registry.canonizer", "registered"])
def test_canonizer_registration_errors_name_the_fix(register):
    with pytest.raises(TypeError, match=r"instance of Block; pass the class itself: Block"):
        register(Block(), canonize_block)
    with pytest.raises(TypeError, match=r"nn.Module subclass, got <class 'str'>"):
        register(str, canonize_block)
    with pytest.raises(TypeError, match=r"function fn\(module, path\) returning a list of \(name, layer\).*got 3"):
        register(Block, 3)
    assert registry.canonizer_for(Block()) is None and Block not in registry.GLOBAL.canonizers
