"""Composite primitives: which layers each selects, precedence (the last listed wins), the rule table, errors."""

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import rules
from lrpkit.composites import (Composite, FirstLayerMap, FirstLayerTypeMap, GlobalMap, GlobalTypeMap, LastLayerMap,
                               LastLayerTypeMap, NameMap, RangeMap, RangeTypeMap)
from lrpkit.layers import Chain, SkipConnection, Sum

EPS, GAMMA, FLAT, ZBOX = rules.EpsilonRule(), rules.GammaRule(), rules.FlatRule(), rules.ZBoxRule(0.0, 1.0)


@pytest.fixture(scope="module")
def chain():
    # index: 0 Conv2d, 1 ReLU, 2 Conv2d, 3 ReLU, 4 MaxPool2d, 5 Flatten, 6 Linear, 7 ReLU, 8 Linear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    return lrpkit.canonize(model)


def assigned(composite, chain):
    """{index: rule} for the layers whose rule is not the registered default."""
    defaults = Composite().assign(chain)
    return {s.index: s.rule for s, d in zip(composite.assign(chain), defaults) if s.rule is not d.rule}


def test_defaults(chain):
    kinds = [type(s.rule).__name__ for s in Composite().assign(chain)]
    assert kinds == ["ZeroRule", "PassRule", "ZeroRule", "PassRule", "ZeroRule", "PassRule", "ZeroRule", "PassRule",
                     "ZeroRule"]


def test_global_map_selects_the_rules_targets(chain):
    # LRP-ε targets Linear/Conv, pooling and norms: the MaxPool too; LRP-γ only Linear/Conv
    assert assigned(Composite(GlobalMap(EPS)), chain) == {0: EPS, 2: EPS, 4: EPS, 6: EPS, 8: EPS}
    assert assigned(Composite(GlobalMap(GAMMA)), chain) == {0: GAMMA, 2: GAMMA, 6: GAMMA, 8: GAMMA}


def test_global_type_map(chain):
    assert assigned(Composite(GlobalTypeMap({nn.Conv2d: GAMMA, nn.Linear: EPS})), chain) == \
        {0: GAMMA, 2: GAMMA, 6: EPS, 8: EPS}
    assert assigned(Composite(GlobalTypeMap({(nn.Conv2d, nn.Linear): EPS})), chain) == \
        {0: EPS, 2: EPS, 6: EPS, 8: EPS}


def test_first_and_last_layer_maps(chain):
    assert assigned(Composite(FirstLayerMap(FLAT)), chain) == {0: FLAT}
    assert assigned(Composite(LastLayerMap(EPS)), chain) == {8: EPS}
    # type maps: the first / last layer of one of the given types
    assert assigned(Composite(FirstLayerTypeMap({nn.Linear: FLAT})), chain) == {6: FLAT}
    assert assigned(Composite(LastLayerTypeMap({nn.Conv2d: GAMMA})), chain) == {2: GAMMA}
    assert assigned(Composite(FirstLayerTypeMap({nn.Conv2d: ZBOX, nn.Linear: FLAT})), chain) == {0: ZBOX}
    # like GlobalTypeMap, a type map for a type the chain does not have selects nothing
    assert assigned(Composite(FirstLayerTypeMap({nn.Conv1d: FLAT}), LastLayerTypeMap({nn.Conv1d: FLAT})), chain) == {}


def test_first_layer_map_skips_a_leading_flatten():
    # as zennit's first-layer map: the first layer the rule targets, so LRP-flat lands on the Linear (index 1)
    chain = lrpkit.canonize(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)).eval())
    assert assigned(Composite(FirstLayerMap(FLAT)), chain) == {1: FLAT}
    # a rule without targets (PassRule) goes to the very first / last layer
    pass_rule = rules.PassRule()
    chain = lrpkit.canonize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval())
    assert assigned(Composite(LastLayerMap(pass_rule)), chain) == {1: pass_rule}
    with pytest.raises(rules.IncompatibleRuleError, match="FirstLayerMap.*PassRule.*Linear.*layer 0"):
        Composite(FirstLayerMap(pass_rule)).assign(chain)


def test_range_maps(chain):
    # RangeMap: indices 2..6 whose type the rule targets (2 Conv2d, 4 MaxPool2d, 6 Linear; not the ReLU/Flatten)
    assert assigned(Composite(RangeMap(range(2, 7), EPS)), chain) == {2: EPS, 4: EPS, 6: EPS}
    assert assigned(Composite(RangeTypeMap(range(0, 3), {nn.Conv2d: GAMMA})), chain) == {0: GAMMA, 2: GAMMA}
    assert assigned(Composite(RangeTypeMap(range(3, 9), {nn.Linear: EPS})), chain) == {6: EPS, 8: EPS}


def test_name_map():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(2, 2))
    chain = lrpkit.canonize(model.eval())
    assert chain.names == ["features.0", "features.1", "features.2", "flatten", "fc"]
    assert assigned(Composite(NameMap({"fc": EPS, "features.2": GAMMA})), chain) == {2: GAMMA, 4: EPS}
    # fnmatch patterns; a pattern matching a layer the rule cannot handle (the ReLU) leaves that layer alone
    assert assigned(Composite(NameMap({"features.*": GAMMA})), chain) == {0: GAMMA, 2: GAMMA}
    with pytest.raises(KeyError, match="no layer is named 'head'.*rule table"):
        Composite(NameMap({"head": EPS})).assign(chain)
    with pytest.raises(rules.IncompatibleRuleError, match=r"NameMap.*GammaRule.*ReLU.*layer 1 \(features.1\)"):
        Composite(NameMap({"features.1": GAMMA})).assign(chain)


def test_last_listed_wins(chain):
    both = (GlobalTypeMap({nn.Conv2d: GAMMA}), FirstLayerMap(ZBOX))
    assert assigned(Composite(*both), chain) == {0: ZBOX, 2: GAMMA}
    assert assigned(Composite(*both[::-1]), chain) == {0: GAMMA, 2: GAMMA}
    assert assigned(Composite(GlobalMap(EPS), NameMap({"6": GAMMA}), RangeMap(range(7, 9), FLAT)), chain) == \
        {0: EPS, 2: EPS, 4: EPS, 6: GAMMA, 8: FLAT}


def test_containers_are_numbered_depth_first():
    torch.manual_seed(0)
    chain = Chain([nn.Linear(2, 3), SkipConnection(Chain([nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)])),
                   nn.Linear(3, 2)]).eval()
    slots = Composite().assign(chain)
    assert [(s.index, s.path, type(s.layer).__name__) for s in slots] == [
        (0, "0", "Linear"), (1, "1", "SkipConnection"), (2, "1.inner.0", "Linear"), (3, "1.inner.1", "ReLU"),
        (4, "1.inner.2", "Linear"), (5, "2", "Linear")]
    assert isinstance(slots[1].rule, rules.SkipConnectionRule)
    assert assigned(Composite(RangeMap(range(1, 5), EPS)), chain) == {2: EPS, 4: EPS}
    assert assigned(Composite(LastLayerMap(EPS), FirstLayerMap(FLAT)), chain) == {0: FLAT, 5: EPS}
    split = rules.SkipConnectionRule(0.1)
    assert assigned(Composite(GlobalTypeMap({SkipConnection: split})), chain) == {1: split}
    # and the analyzer runs the rules it was given: LRP-0 and ε = 0.1 splits differ
    x = torch.rand(2, 2)
    default = lrpkit.LRP(chain, Composite())(x, target=0).relevance
    other = lrpkit.LRP(chain, Composite(GlobalTypeMap({SkipConnection: rules.SkipConnectionRule(10.0)})))(
        x, target=0).relevance
    assert not torch.allclose(default, other)


def test_end_layer_maps_follow_the_containers():
    torch.manual_seed(0)

    def linear():
        return nn.Linear(3, 3)

    # 0 Sum: branch 0 = 1 Linear, 2 SkipConnection(3 Linear); branch 1 = 4 Sum(5 Linear | 6 Linear), 7 Linear
    chain = Chain([Sum(Chain([linear(), SkipConnection(Chain([linear()]))]),
                       Chain([Sum(Chain([linear()]), Chain([linear()])), linear()]))]).eval()
    assert [s.path for s in Composite().assign(chain)] == [
        "0", "0.branch0.0", "0.branch0.1", "0.branch0.1.inner.0", "0.branch1.0", "0.branch1.0.branch0.0",
        "0.branch1.0.branch1.0", "0.branch1.1"]
    # the first and the last layer sit in branches of the outer Sum: the first (last) layer of each branch, the
    # last one of branch 0 inside a skip connection (whose inner chain is not a branch beside another)
    assert assigned(Composite(FirstLayerMap(FLAT)), chain) == {1: FLAT, 5: FLAT}
    assert assigned(Composite(LastLayerMap(EPS)), chain) == {3: EPS, 7: EPS}
    # 0 Sum: branch 0 = 1 Linear; branch 1 = 2 Linear, 3 Sum(4 Linear | 5 Linear): the last layer sits in the
    # inner Sum, so the last layer of each of its branches
    chain = Chain([Sum(Chain([linear()]), Chain([linear(), Sum(Chain([linear()]), Chain([linear()]))]))]).eval()
    assert assigned(Composite(LastLayerTypeMap({nn.Linear: GAMMA})), chain) == {4: GAMMA, 5: GAMMA}
    # a skip connection alone: its first layer only
    chain = Chain([SkipConnection(Chain([linear(), linear()])), linear()]).eval()
    assert assigned(Composite(FirstLayerMap(FLAT)), chain) == {1: FLAT}


def test_table(chain):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    composite = lrpkit.presets.EpsilonPlusFlat()
    table = lrpkit.LRP(model, composite).table()
    assert table == composite.table(chain)
    lines = table.splitlines()
    assert lines[0].split() == ["index", "path", "name", "layer", "rule"]
    assert len(lines) == 1 + len(chain)
    assert lines[1].split()[0] == "0" and "Conv2d" in lines[1] and "FlatRule" in lines[1]
    assert "Conv2d" in lines[3] and "ZPlusRule" in lines[3]
    assert "MaxPool2d" in lines[5] and "MaxPoolRule" in lines[5]  # the presets: relevance to the argmax
    assert "Linear" in lines[9] and "EpsilonRule(epsilon=1e-06)" in lines[9]


def test_table_indents_container_contents():
    chain = Chain([SkipConnection(Chain([nn.Linear(3, 3)]))]).eval()
    lines = Composite().table(chain).splitlines()
    assert "SkipConnectionRule" in lines[1] and "  Linear(" in lines[2]


def test_composite_errors(chain):
    with pytest.raises(TypeError, match="composite primitives"):
        Composite(EPS)

    class Unknown(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(rules.IncompatibleRuleError, match=r"no rule for: 1 .*Unknown"):
        Composite().assign(Chain([nn.Linear(2, 2), Unknown()]))


def test_the_rule_table_shows_every_layer_on_one_line():
    # a layer with submodules (SelfAttention holds its qkv and proj Linear layers) prints over several lines; the
    # table shows its type and its own settings, one row per step
    from helpers import tiny_vit

    lrp = lrpkit.LRP(tiny_vit())
    rows = lrp.table().split("\n")
    assert len(rows) == 1 + len(lrp.all_steps)
    attention = [r for r in rows if "blocks.0.attn " in r and "SelfAttentionRule" in r]
    assert len(attention) == 1 and "SelfAttention(heads=2, head_dim=16)" in attention[0]
