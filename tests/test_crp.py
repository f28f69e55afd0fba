"""Concept Relevance Propagation (lrpkit.CRP): hand-derived cases, the sum over all concepts, what flows around
the layer, batch and concept independence, feature maps and tokens, chunking, errors."""

import pytest
import torch
from torch import nn

import lrpkit
from helpers import tiny_vit
from lrpkit import rules
from lrpkit.crp import ConceptExplanation, IndexedConcepts, TopConcepts
from lrpkit.layers import Chain, SkipConnection
from lrpkit.rules.base import divide
from lrpkit.tape import Tape

EXACT = lrpkit.Composite(lrpkit.GlobalTypeMap({nn.Linear: rules.EpsilonRule(1e-12),
                                               SkipConnection: rules.SkipConnectionRule(1e-12)}))


def linear(*rows) -> nn.Linear:
    layer = nn.Linear(len(rows[0]), len(rows), bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows, dtype=torch.float64))
    return layer


# ---- hand-derived ---------------------------------------------------------------------------------------------

def test_hand_derived_two_concepts_of_a_hidden_layer():
    # x = [1, 2]; h = W1 x = [[1, 0], [1, 1]] [1, 2] = [1, 3]; ReLU; y = W2 h = [1, 2]·[1, 3] = 7; R_y = 1 (one-hot)
    # relevance at the hidden layer (ε → 0): R_h = h ⊙ W2 / y = [1·1/7, 3·2/7] = [1/7, 6/7]
    # concept 0: [1/7, 0]: s = [1/7 / 1, 0] = [1/7, 0]; W1ᵀ s = [1/7, 0]; R_x = x ⊙ W1ᵀ s = [1/7, 0]
    # concept 1: [0, 6/7]: s = [0, 6/7 / 3] = [0, 2/7]; W1ᵀ s = [2/7, 2/7]; R_x = [1·2/7, 2·2/7] = [2/7, 4/7]
    # together [3/7, 4/7]: plain LRP, x ⊙ W1ᵀ (R_h / h) = x ⊙ W1ᵀ [1/7, 2/7] = [3/7, 4/7]
    model = nn.Sequential(linear([1, 0], [1, 1]), nn.ReLU(), linear([1, 2])).eval()
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    lrp = lrpkit.LRP(model, EXACT)
    for layer in ("0", "1"):  # the Linear and the ReLU after it: the ReLU passes the relevance on
        expl = lrpkit.CRP(lrp, layer, IndexedConcepts(0, 1))(x)
        torch.testing.assert_close(expl.relevance[0], torch.tensor([[1, 0], [2, 4]], dtype=torch.float64) / 7)
        torch.testing.assert_close(expl.concept_relevance[0], torch.tensor([1, 6], dtype=torch.float64) / 7)
        torch.testing.assert_close(expl.relevance.sum(1), lrp(x).relevance)
    top = lrpkit.CRP(lrp, "0", TopConcepts(2))(x)
    assert top.concepts.tolist() == [[1, 0]]  # 6/7 before 1/7
    torch.testing.assert_close(top.relevance[0, 0], torch.tensor([2, 4], dtype=torch.float64) / 7)


def skip_model():
    """y = head(x + f(x)) with f = diag(2, 1), head = [1, 1]; names: block (the residual connection), block.f,
    head."""
    inner = Chain([linear([2, 0], [0, 1])], ["block.f"])
    return Chain([SkipConnection(inner), linear([1, 1])], ["block", "head"]).eval()


def test_hand_derived_relevance_around_the_layer_is_not_the_concepts():
    # x = [1, 1]; f = [2, 1]; y1 = x + f = [3, 2]; y = 5. R_y1 = y1 ⊙ [1, 1] / 5 = [3/5, 2/5]
    # residual split: s = R_y1 / y1 = [1/5, 1/5]; through f: f ⊙ s = [2/5, 1/5]; identity path: x ⊙ s = [1/5, 1/5]
    # plain LRP: [2/5 + 1/5, 1/5 + 1/5] = [3/5, 2/5]
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    lrp = lrpkit.LRP(skip_model(), EXACT)
    torch.testing.assert_close(lrp(x).relevance, torch.tensor([[3, 2]], dtype=torch.float64) / 5)
    # at block.f (inside the residual connection): R_L = [2/5, 1/5]; concept 0: [2/5, 0] through f (diagonal):
    # [2/5, 0]; concept 1: [0, 1/5]. The identity path's [1/5, 1/5] is nobody's: Σ concepts = LRP − [1/5, 1/5]
    inside = lrpkit.CRP(lrp, "block.f", IndexedConcepts(0, 1))(x)
    torch.testing.assert_close(inside.relevance[0], torch.tensor([[2, 0], [0, 1]], dtype=torch.float64) / 5)
    # at block (the residual stream after it): R_L = [3/5, 2/5]; concept 0: s = [1/5, 0], f ⊙ s = [2/5, 0] → [2/5, 0],
    # x ⊙ s = [1/5, 0]: [3/5, 0]; concept 1: s = [0, 1/5] → [0, 1/5] + [0, 1/5] = [0, 2/5]. Σ = LRP
    after = lrpkit.CRP(lrp, "block", IndexedConcepts(0, 1))(x)
    torch.testing.assert_close(after.relevance[0], torch.tensor([[3, 0], [0, 2]], dtype=torch.float64) / 5)


# ---- the sum over all concepts ---------------------------------------------------------------------------------

def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(20, 4)).double().eval()


X_CNN = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer, channels", [("0", 6), ("2", 8), ("3", 8), ("5", 5), ("9", 4)])
def test_all_concepts_of_a_layer_on_the_main_path_sum_to_lrp(layer, channels):
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, layer, IndexedConcepts(*range(channels)))(X_CNN)
    torch.testing.assert_close(expl.relevance.sum(1), lrp(X_CNN).relevance, rtol=1e-10, atol=1e-14)


class AroundTheBranch(rules.SkipConnectionRule):
    """Only the identity path of ``y = a + f(a)``: ``R_a = a ⊙ R / stab(y)``; nothing through f."""

    def lrp(self, step, rec, R, tape):
        a, _ = rec.extras["summands"]
        return a * divide(R, rec.output, self.epsilon)


def test_inside_a_residual_block_the_concepts_sum_to_what_flows_through_it():
    # LRP is linear in the relevance below the block: LRP = (through the branch) + (around it); the concepts of
    # a layer inside the branch share the first part, and only it
    model = tiny_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = lrpkit.LRP(model)
    around = lrpkit.LRP(model, lrpkit.Composite(*lrp.composite.primitives,
                                                lrpkit.NameMap({"blocks.1.mlp": AroundTheBranch()})))
    for layer, channels in (("blocks.1.mlp.fc1", 128), ("blocks.1.mlp.fc2", 32), ("blocks.1.norm2", 32)):
        expl = lrpkit.CRP(lrp, layer, IndexedConcepts(*range(channels)))(x)
        torch.testing.assert_close(expl.relevance.sum(1) + around(x).relevance, lrp(x).relevance,
                                   rtol=1e-9, atol=1e-15)
    residual = lrpkit.CRP(lrp, "blocks.1", IndexedConcepts(*range(32)))(x)  # the residual stream: the main path
    torch.testing.assert_close(residual.relevance.sum(1), lrp(x).relevance, rtol=1e-9, atol=1e-15)


def test_inside_a_resnet_block_below_which_the_plan_hands_a_gate_over():
    # torchvision ResNet-18 with LRP-ε: layer2.0 (a Sum) takes its denominator from the input of layer2.1 (the
    # residual connection around the layer), handed over when layer2.1 is passed, which CRP's pass below the
    # layer never does: the hand-over must happen all the same
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule())))
    index = {s.name: s.index for s in lrp.all_steps if not s.children}
    sums = [s for s in lrp.all_steps if s.name == "layer2.0"]
    assert lrp.plan[sums[0].index].takes_gate
    around = lrpkit.LRP(model, lrpkit.Composite(*lrp.composite.primitives,
                                                lrpkit.NameMap({"layer2.1": AroundTheBranch()})))
    expl = lrpkit.CRP(lrp, "layer2.1.conv1", IndexedConcepts(*range(128)), batch_size=256)(x)
    assert index["layer2.1.conv1"] == lrpkit.CRP(lrp, "layer2.1.conv1", TopConcepts(1)).step.index
    torch.testing.assert_close(expl.relevance.sum(1) + around(x).relevance, lrp(x).relevance, rtol=1e-9, atol=1e-15)


# ---- feature maps and tokens: the channel axis ----------------------------------------------------------------

def relevance_at_output(lrp, index, x):
    """LRP's relevance at the output of the top-level or nested layer with index ``index``: the input relevance
    of the layer after it (tape.relevance_at)."""
    after = index + 1
    tape = Tape(lrp.plan, relevance_at={after})
    with torch.enable_grad():
        out = tape.forward(lrp.steps, x)
    tape.backward(lrp.steps, torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0))
    return tape.relevances[after]


def test_feature_map_concepts_are_channels_in_dim_1():
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, "2", TopConcepts(3))(X_CNN)
    R = relevance_at_output(lrp, 2, X_CNN)  # (B, 8, 8, 8): the ReLU after conv "2" passes it on
    torch.testing.assert_close(expl.channel_relevance, R.sum((2, 3)))
    assert expl.relevance.shape == (3, 3, 3, 8, 8) and expl.heatmap.shape == (3, 3, 8, 8)


def test_token_concepts_are_the_last_dim():
    model = tiny_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = lrpkit.LRP(model)
    crp = lrpkit.CRP(lrp, "blocks.0.mlp.fc1", TopConcepts(4))
    assert crp.channel_axis == -1 and crp.step.name == "blocks.0.mlp.fc1"
    expl = crp(x)
    R = relevance_at_output(lrp, crp.step.index, x)  # (B, 17 tokens, 128 hidden neurons)
    assert R.shape == (2, 17, 128)
    torch.testing.assert_close(expl.channel_relevance, R.sum(1))
    assert expl.relevance.shape == (2, 4, 3, 32, 32)


def test_module_paths_name_the_module_output():
    lrp = lrpkit.LRP(tiny_vit())
    name = {s.index: (s.name, type(s.layer).__name__) for s in lrp.all_steps}
    assert name[lrpkit.CRP(lrp, "blocks.0", TopConcepts(1)).step.index] == ("blocks.0.mlp", "SkipConnection")
    assert name[lrpkit.CRP(lrp, "blocks.0.mlp", TopConcepts(1)).step.index] == ("blocks.0.mlp.fc2", "Linear")
    assert name[lrpkit.CRP(lrp, "blocks.0.attn", TopConcepts(1)).step.index] == ("blocks.0.attn", "SelfAttention")
    assert name[lrpkit.CRP(lrp, "norm", TopConcepts(1)).step.index] == ("norm", "Scale")  # LayerNorm: two steps
    crp = lrpkit.CRP(lrp, 7, TopConcepts(1))  # a layer index of lrp.table()
    assert crp.step.index == 7 and crp.layer == "blocks.0.attn"


@pytest.mark.parametrize("preset", ["CPLRP", "AttnLRP"])
def test_attention_heads_value_outputs(preset):
    # "blocks.1.attn.values": y = A v per head, merged (B, N, H·d), the output projection's input. Its relevance
    # under LRP-ε on the projection, from the relevance R at the attention's output: R_y = y ⊙ Wᵀ (R / stab(y W + b))
    model = tiny_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = lrpkit.LRP(model, getattr(lrpkit.presets, preset)())
    crp = lrpkit.CRP(lrp, "blocks.1.attn.values", IndexedConcepts(*range(32)))
    assert type(crp.step.layer).__name__ == "SelfAttention" and crp.site == "values" and crp.channel_axis == -1
    expl = crp(x)
    tape = Tape(lrp.plan, stop_at=crp.step.index)
    with torch.enable_grad():
        out = tape.forward(lrp.steps, x)
    R = tape.backward(lrp.steps, torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0))
    attn = crp.step.layer
    with torch.no_grad():
        block_input = model.blocks[0](model._pos_embed(model.patch_embed(x)))
        q, k, v = attn.qkv_heads(model.blocks[1].norm1(block_input))
        y = attn.merge_heads(attn.attention(q, k) @ v)
        z = attn.proj(y)
    R_y = y * ((R / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0))) @ attn.proj.weight)
    torch.testing.assert_close(expl.channel_relevance, R_y.sum(1), rtol=1e-8, atol=1e-15)
    # all the heads' channels together carry what the attention output's channels carry
    output = lrpkit.CRP(lrp, "blocks.1.attn", IndexedConcepts(*range(32)))(x)
    torch.testing.assert_close(expl.relevance.sum(1), output.relevance.sum(1), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="blocks.1.attn.values"):
        lrpkit.CRP(lrp, "blocks.1.attn.keys", TopConcepts(1))


# ---- independence, chunking, options --------------------------------------------------------------------------

def test_batch_and_concept_independence():
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    together = lrpkit.CRP(lrp, "2", IndexedConcepts(1, 4, 6))(X_CNN, target=[0, 1, 2])
    for b in range(3):
        alone = lrpkit.CRP(lrp, "2", IndexedConcepts(4))(X_CNN[b: b + 1], target=b)
        torch.testing.assert_close(alone.relevance[0, 0], together.relevance[b, 1], rtol=1e-12, atol=1e-16)
    top = lrpkit.CRP(lrp, "2", TopConcepts(3))(X_CNN)
    for b in range(3):
        alone = lrpkit.CRP(lrp, "2", TopConcepts(3))(X_CNN[b: b + 1])
        assert torch.equal(alone.concepts[0], top.concepts[b])
        torch.testing.assert_close(alone.relevance[0], top.relevance[b], rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 100])
@pytest.mark.parametrize("layer", ["0", "2", "5"])
def test_chunks_give_the_same_result(batch_size, layer):
    # with LRP-ε, each conv (followed by a ReLU and a layer whose relevance vanishes with its input) takes its
    # denominator from the layer two above it (lrpkit.plan: the gate), which does not run in CRP's pass below the
    # layer; a chunk of concepts after the first records the forward pass again
    lrp = lrpkit.LRP(small_cnn(), lrpkit.Composite(lrpkit.GlobalMap(rules.EpsilonRule())))
    assert all(lrp.plan[i].takes_gate for i in (0, 2, 5))
    whole = lrpkit.CRP(lrp, layer, TopConcepts(4), batch_size=100)(X_CNN, target=[3, 0, 1])
    chunked = lrpkit.CRP(lrp, layer, TopConcepts(4), batch_size=batch_size)(X_CNN, target=[3, 0, 1])
    assert torch.equal(whole.concepts, chunked.concepts) and torch.equal(whole.target, chunked.target)
    torch.testing.assert_close(chunked.relevance, whole.relevance, rtol=1e-12, atol=1e-16)


def test_top_concepts_are_the_most_relevant_channels_in_decreasing_order():
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    expl = lrpkit.CRP(lrp, "2", TopConcepts(3))(X_CNN)
    assert expl.concepts.dtype == torch.long and expl.concepts.shape == (3, 3)
    assert (expl.concept_relevance[:, :-1] >= expl.concept_relevance[:, 1:]).all()
    torch.testing.assert_close(expl.concept_relevance, expl.channel_relevance.sort(1, descending=True).values[:, :3])
    torch.testing.assert_close(expl.concept_relevance, expl.channel_relevance.gather(1, expl.concepts))
    assert isinstance(expl, ConceptExplanation) and expl.layer == "2"


def test_output_relevance_options():
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    crp = lrpkit.CRP(lrp, "5", IndexedConcepts(0, 2))
    one_hot = crp(X_CNN, target=1)
    logit = crp(X_CNN, target=1, normalize_output=False)  # zennit-crp's start: the logit's value
    scale = one_hot.output[:, 1].view(3, 1, 1, 1, 1)
    torch.testing.assert_close(logit.relevance, one_hot.relevance * scale)
    R = torch.zeros_like(one_hot.output)
    R[:, 1] = 1.0
    explicit = crp(X_CNN, R=R)
    torch.testing.assert_close(explicit.relevance, one_hot.relevance)
    assert explicit.target is None and one_hot.target.tolist() == [1, 1, 1]


def test_the_relevance_is_detached_and_float32_works():
    model = small_cnn().float()
    x = X_CNN.float().requires_grad_(True)
    expl = lrpkit.CRP(lrpkit.LRP(model), "2", TopConcepts(2))(x)
    assert not expl.relevance.requires_grad and expl.relevance.dtype == torch.float32
    assert torch.isfinite(expl.relevance).all()


def test_zeros_and_constants_give_finite_maps_and_inference_mode_is_left():
    model = small_cnn().float()
    crp = lrpkit.CRP(lrpkit.LRP(model), "2", TopConcepts(2))
    for x in (torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)):
        with torch.inference_mode():  # CRP, like LRP, needs autograd below the layer and steps outside
            expl = crp(x)
        assert torch.isfinite(expl.relevance).all() and torch.isfinite(expl.concept_relevance).all()


# ---- errors ------------------------------------------------------------------------------------------------------

def test_unknown_or_removed_layer_names_the_layers_that_can_be_chosen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    lrp = lrpkit.LRP(model)
    for bad in ("1", "3", "features.1"):  # fused BatchNorm, dropped Dropout, no such module
        message = rf"no layer '{bad}' in the canonized model.*fuses each BatchNorm.*chosen: 0, 2, 4, 5;"
        with pytest.raises(ValueError, match=message):
            lrpkit.CRP(lrp, bad, TopConcepts(1))
    with pytest.raises(ValueError, match=r"layer index 9 is out of range: the rule table has indices 0\.\.3"):
        lrpkit.CRP(lrp, 9, TopConcepts(1))
    with pytest.raises(TypeError, match="module path"):
        lrpkit.CRP(lrp, 1.5, TopConcepts(1))
    with pytest.raises(TypeError, match="LRP analyzer"):
        lrpkit.CRP(model, "0", TopConcepts(1))
    with pytest.raises(TypeError, match="TopConcepts"):
        lrpkit.CRP(lrp, "0", 3)


def test_a_layer_no_relevance_reaches_is_a_clear_error():
    # the gate branch of a squeeze-excitation product: ProductRule(mode="gate") holds the gate constant
    torch.manual_seed(0)
    gate = Chain([nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid()], ["se.pool", "se.fc", "se.gate"])
    model = Chain([nn.Conv2d(3, 4, 3), lrpkit.Multiply(Chain([], []), gate), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(4, 2)], ["conv", "se", "pool", "flatten", "head"]).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="no relevance reaches layer 'se.fc'.*ProductRule"):
        lrpkit.CRP(lrpkit.LRP(model), "se.fc", TopConcepts(1))(x)
    uniform = lrpkit.LRP(model, lrpkit.Composite(*lrpkit.LRP(model).composite.primitives,
                                                 lrpkit.GlobalTypeMap({lrpkit.Multiply: rules.ProductRule("uniform")})))
    assert lrpkit.CRP(uniform, "se.fc", TopConcepts(2))(x).relevance.shape == (2, 2, 3, 6, 6)


def test_channel_out_of_range_and_too_many_concepts():
    lrp = lrpkit.LRP(small_cnn(), lrpkit.presets.EpsilonPlusFlat())
    with pytest.raises(ValueError, match=r"channel 8 out of range: layer '2' has 8 channels \(0..7\)"):
        lrpkit.CRP(lrp, "2", IndexedConcepts(1, 8))(X_CNN)
    with pytest.raises(ValueError, match=r"TopConcepts\(9\) asks for more concepts than layer '2' has channels \(8\)"):
        lrpkit.CRP(lrp, "2", TopConcepts(9))(X_CNN)
    with pytest.raises(ValueError, match="k >= 1"):
        TopConcepts(0)
    with pytest.raises(ValueError, match="at least one channel"):
        IndexedConcepts()
    with pytest.raises(ValueError, match="indices >= 0"):
        IndexedConcepts(-1)
    with pytest.raises(ValueError, match="target has 2 entries for a batch of 3"):
        lrpkit.CRP(lrp, "2", TopConcepts(1))(X_CNN, target=[0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        lrpkit.CRP(lrp, "2", TopConcepts(1), batch_size=0)
