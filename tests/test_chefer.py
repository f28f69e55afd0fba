"""Chefer et al. 2021: the rules of lrpkit.rules.chefer on hand-derived cases, and TransformerAttribution /
PartialLRP against an independent, direct implementation of the paper's algorithm (the structure of the reference
code, one image at a time, float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import lrpkit
from lrpkit.layers import Chain, LayerNormalize, Scale, SelfAttention, SkipConnection
from lrpkit.methods._capture import attention_and_gradients
from lrpkit.methods.chefer import PartialLRP, TransformerAttribution, chefer_composite
from lrpkit.plan import Plan
from lrpkit.propagate import Step
from lrpkit.tape import Tape
from lrpkit.rules.chefer import (ATTENTION_RELEVANCE, CheferAttentionRule, CheferLinearRule, CheferPassRule,
                                 CheferPositionalEmbeddingRule, CheferSkipConnectionRule, CheferSumRule, CheferZBoxRule,
                                 CheferZPlusRule, product_split, rescaled_split, safe_divide)


def tiny_vit(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval().to(dtype)


def run_rule(rule, layer, x, R):
    """Forward + reverse of one layer under ``rule``; returns (R_in, tape, record)."""
    step = Step(layer, rule, 0, "0", "layer")
    step.state = rule.prepare(layer)
    tape = Tape(Plan([step]))
    rec = rule.forward(step, x, tape)
    return rule.lrp(step, rec, R, tape), tape, rec


def linear(weight, bias=None):
    w = torch.as_tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None).double()
    layer.weight.data = w.clone()
    if bias is not None:
        layer.bias.data = torch.as_tensor(bias, dtype=torch.float64)
    return layer.requires_grad_(False)


# -- small helpers -----------------------------------------------------------------------------------------------
def test_safe_divide_zero_and_sign():
    a = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    b = torch.tensor([2.0, 0.0, -4.0], dtype=torch.float64)
    # 1/(2 + 1e-9), 0 at b = 0, 1/(-4 - 1e-9)
    out = safe_divide(a, b)
    assert out[1] == 0
    assert torch.allclose(out, torch.tensor([0.5, 0.0, -0.25], dtype=torch.float64), atol=1e-8)


# -- LRP-α1β0 without bias -----------------------------------------------------------------------------------------
def test_linear_alpha1_beta0_ignores_bias_hand_case():
    # x = (1, -2, 3); rows of W: out0 (1, 2, 1): products 1, -4, 3 -> (.)+ = 1, 0, 3, z+ = 4
    #                            out1 (-1, -1, 2): products -1, 2, 6 -> 0, 2, 6, z+ = 8
    #                            out2 (-1, 1, -1): products -1, -2, -3 -> 0, 0, 0, z+ = 0 (relevance dropped)
    # R = (2, 4, 7): s = (0.5, 0.5, 0) -> R_in = (0.5*1, 0.5*2, 0.5*3 + 0.5*6) = (0.5, 1, 4.5); the bias is ignored
    layer = linear([[1, 2, 1], [-1, -1, 2], [-1, 1, -1]], bias=[100.0, -50.0, 3.0])
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    R = torch.tensor([[2.0, 4.0, 7.0]], dtype=torch.float64)
    R_in, _, _ = run_rule(CheferLinearRule(), layer, x, R)
    assert torch.allclose(R_in, torch.tensor([[0.5, 1.0, 4.5]], dtype=torch.float64), atol=1e-8)
    # without out2 the rule conserves: 0.5 + 1 + 4.5 = 2 + 4
    assert math.isclose(R_in.sum().item(), 6.0, rel_tol=1e-8)


def test_linear_closed_form_matches_terms_and_skips_zero_rows():
    torch.manual_seed(1)
    layer = linear(torch.randn(7, 16), bias=torch.randn(7))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    R = torch.randn(2, 6, 7, dtype=torch.float64)
    fast, _, _ = run_rule(CheferLinearRule(), layer, x, R)
    terms, _, _ = run_rule(CheferZPlusRule(), layer, x, R)  # the same rule computed term by term (zennit-style)
    assert torch.allclose(fast, terms, atol=1e-10)
    assert torch.allclose(fast.sum((1, 2)), R.sum((1, 2)), atol=1e-10)  # conserves (16 inputs: no z+ = 0 here)
    # only token 0 of each sample carries relevance (as in a ViT's last block): the rows-skipping path
    R_sparse = torch.zeros_like(R)
    R_sparse[:, 0] = R[:, 0]
    fast, _, _ = run_rule(CheferLinearRule(), layer, x, R_sparse)
    terms, _, _ = run_rule(CheferZPlusRule(), layer, x, R_sparse)
    assert torch.allclose(fast, terms, atol=1e-10)
    assert fast[:, 1:].abs().max() == 0


def prepared_tensors(obj, seen=None):
    """Every tensor reachable from a step's prepared state (dicts, lists, sub-steps, modules, plain objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        return
    if isinstance(obj, Step):
        items = [obj.state] + [s for branch in obj.children for s in branch]
    elif isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return
    for item in items:
        yield from prepared_tensors(item, seen)


def all_steps(steps):
    for step in steps:
        yield step
        for branch in step.children:
            yield from all_steps(branch)


def test_linear_layers_keep_no_prepared_weight_copy():
    # issue 16: CheferLinearRule.prepare built |W| for every Linear layer (attention projections included), held
    # for the analyzer's lifetime (340 MB on ViT-B); lrp builds it now and frees it with the step
    model = tiny_vit()
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    for analyzer in (TransformerAttribution(model), PartialLRP(model), lrpkit.LRP(model, chefer_composite())):
        for step in all_steps(analyzer.steps):
            held = list(prepared_tensors(step.state))
            if isinstance(step.layer, (nn.Linear, SelfAttention)):
                assert held == [], (step.name, [tuple(t.shape) for t in held])
            assert not any(tuple(t.shape) in weights for t in held), step.name
    # the relevance is the same as with |W| kept: the closed form against the term-by-term rule
    layer = linear(torch.randn(7, 16, generator=torch.Generator().manual_seed(1)))
    x, R = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    R_in, _, _ = run_rule(CheferLinearRule(), layer, x, R)
    assert torch.allclose(R_in, run_rule(CheferZPlusRule(), layer, x, R)[0], atol=1e-10)


def held_storages(obj, skip: set, found: dict | None = None, seen: set | None = None) -> dict:
    """``{data_ptr: nbytes}`` of every tensor storage that ``obj`` holds (records, their extras, recipes, lists,
    dicts), parameters (``skip``) left out."""
    found = {} if found is None else found
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, nn.Module):
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() not in skip:
            found[storage.data_ptr()] = storage.nbytes()
        return found
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:  # records, recipes, the tape's lazy inputs: their slots
        items = [getattr(obj, name, None) for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())]
    for item in items:
        held_storages(item, skip, found, seen)
    return found


def graph_saved(output: torch.Tensor):
    """What the autograd graph behind ``output`` saves: the packed objects (tensors, or what a pack hook made)."""
    saved, nodes, todo = [], set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        for name in dir(node):
            if name.startswith("_raw_saved_"):
                raw = getattr(node, name)
                saved += [r.data for r in (raw if isinstance(raw, (list, tuple)) else [raw]) if r is not None]
        todo += [fn for fn, _ in node.next_functions]
    return saved


def test_recording_pass_keeps_each_activation_once():
    # issue 16: TransformerAttribution's recording pass kept, per block, q, k, v, q kᵀ, A v and its merged heads,
    # each Linear layer's output next to its x W, the LayerNorm and GELU outputs, and its autograd graph saved
    # per-head copies of q, k, v and the GELU's input besides: 2.3 GiB on ViT-B at batch 8, 3.6x the input gradient.
    # Now the records keep, per block, the residual stream after the attention and after the MLP, x W of the four
    # Linear layers and A; everything else is recomputed from them, bitwise
    B, N, C, H, depth = 2, 17, 32, 2, 3
    model = tiny_vit()
    ta = TransformerAttribution(model)
    first = ta.attention_steps[0].index
    tape = Tape(ta.plan, graph_from=first, stop_after=first)
    with torch.enable_grad():
        output = tape.forward(ta.steps, torch.randn(B, 3, 32, 32, dtype=torch.float64))
    params = {p.untyped_storage().data_ptr() for p in ta.chain.parameters()}
    blocks = [s for s in ta.steps if isinstance(s.layer, SkipConnection)]
    in_blocks = {s.index for s in all_steps(blocks)}
    held = held_storages([rec for i, rec in tape.records.items() if i in in_blocks], params)
    per_block = (C + C) + (3 * C + C + 4 * C + C) + H * N  # residuals; x W of qkv, proj, fc1, fc2; A (per token)
    assert sum(held.values()) == (depth * per_block + C) * B * N * 8  # + the first block's input
    # the graph of the recording pass saves nothing that the records do not hold (but LayerNorm's statistics):
    # x W + b, the per-head copies of q, k, v are saved as recipes, recomputed in the backward pass
    everything = held_storages(list(tape.records.values()), params)
    saved = graph_saved(output)
    tensors = [t for t in saved if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params]
    assert len(saved) > len(tensors) > 0
    assert all(t.untyped_storage().data_ptr() in everything for t in tensors if t.numel() > B * N)


# -- z^B with the input's bounds -------------------------------------------------------------------------------------
def test_zbox_bounds_from_each_sample():
    # W = (1, -2, 1), bias 10 (ignored). Sample 1: x = (1, -1, 2), l = -1, h = 2:
    #   x w - l w+ - h w-: (1 + 1, 2 + 4, 2 + 1) = (2, 6, 3), z = 11; R = 11 -> R_in = (2, 6, 3)
    # Sample 2: x = (0, 0, 1), l = 0, h = 1: (0, 0 + 2, 1) = (0, 2, 1), z = 3; R = 3 -> (0, 2, 1)
    layer = linear([[1, -2, 1]], bias=[10.0])
    x = torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    R = torch.tensor([[11.0], [3.0]], dtype=torch.float64)
    R_in, _, _ = run_rule(CheferZBoxRule(), layer, x, R)
    assert torch.allclose(R_in, torch.tensor([[2.0, 6.0, 3.0], [0.0, 2.0, 1.0]], dtype=torch.float64), atol=1e-8)
    # per_sample=False: both samples use l = -1, h = 2; sample 2: (0 + 1, 0 + 4, 1 + 1) = (1, 4, 2), z = 7
    R_in, _, _ = run_rule(CheferZBoxRule(per_sample=False), layer, x, torch.tensor([[11.0], [7.0]]).double())
    assert torch.allclose(R_in[1], torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64), atol=1e-8)


def test_zbox_patch_conv_batch_equals_single_samples():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 4, stride=4).double().requires_grad_(False)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2]).view(3, 1, 1, 1)
    R = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    batch, _, _ = run_rule(CheferZBoxRule(), conv, x, R)
    for i in range(3):
        single, _, _ = run_rule(CheferZBoxRule(), conv, x[i:i + 1], R[i:i + 1])
        assert torch.allclose(batch[i:i + 1], single, atol=1e-10)
    assert torch.allclose(batch.sum((1, 2, 3)), R.sum((1, 2, 3)), atol=1e-6)  # z^B conserves (ε = 1e-9)


# -- pass rules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [LayerNormalize(1e-6), Scale(torch.tensor([2.0, -3.0, 0.5]), torch.ones(3)),
                                   nn.GELU(), nn.Dropout(0.5), nn.Identity()])
def test_pass_rules_leave_relevance_unchanged(layer):
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]])
    R = torch.tensor([[[0.3, -0.7, 2.0], [1.0, 0.0, -4.0]]])
    R_in, _, _ = run_rule(CheferPassRule(), layer, x, R)
    assert torch.equal(R_in, R)


def test_pass_rule_refuses_a_layer_that_changes_the_size():
    with pytest.raises(ValueError, match="keeps the number of elements"):
        run_rule(CheferPassRule(), nn.Identity(), torch.ones(1, 3), torch.ones(1, 2))


# -- the two attention products ------------------------------------------------------------------------------------
def test_product_split_gradient_times_input_halved():
    # z = x·y with x = (1, 2), y = (3, -1): z = 3 - 2 = 1; R = 4 -> s = 4
    # R_x = x ⊙ (s yᵀ) / 2 = (1·3·4, 2·(-1)·4) / 2 = (6, -4);  R_y = y ⊙ (xᵀ s) / 2 = (3·1·4, -1·2·4) / 2 = (6, -4)
    # each side holds Σ = 2 = R / 2
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)
    R = torch.tensor([[4.0]], dtype=torch.float64)
    R_x, R_y = product_split(x, y, R, x @ y, torch.matmul)
    assert torch.allclose(R_x, torch.tensor([[6.0, -4.0]], dtype=torch.float64))
    assert torch.allclose(R_y, torch.tensor([[6.0], [-4.0]], dtype=torch.float64))


def tiny_attention():
    # C = 2, one head, head_dim 1, scale 1: q = (1, 2)·x, k = (1, 1)·x, v = (3, 1)·x; proj w = 1, bias 5
    qkv = linear([[1, 2], [1, 1], [3, 1]], bias=[0.0, 0.0, 0.0])
    proj = linear([[1.0]], bias=[5.0])
    return SelfAttention(qkv, proj, num_heads=1, scale=1.0)


def test_attention_rule_hand_case():
    # tokens x0 = (1, 0), x1 = (0, 1): q = (1, 2), k = (1, 1), v = (3, 1)
    # logits = q kᵀ = [[1, 1], [2, 2]] -> A = 0.5 everywhere; y = A v = (2, 2); out = y + 5
    # R_out = (4, 2): proj α1β0 without bias: (y·1)+ = y -> R_y = (4, 2); s = R_y / y = (2, 1)
    # R_A = A ⊙ (s vᵀ) / 2 = [[.5·2·3, .5·2·1], [.5·1·3, .5·1·1]] / 2 = [[1.5, .5], [.75, .25]]   (Σ 3 = ΣR_y / 2)
    # R_v = v ⊙ (Aᵀ s) / 2 = v · (0.5·2 + 0.5·1) / 2 = (2.25, 0.75)                              (Σ 3)
    # softmax (and scale) pass; s' = R_A / (q kᵀ) = [[1.5, .5], [.375, .125]]
    # R_q = q ⊙ (s' k) / 2 = (1·2/2, 2·0.5/2) = (1, 0.5);  R_k = k ⊙ (s'ᵀ q) / 2 = (2.25/2, 0.75/2) = (1.125, 0.375)
    # qkv α1β0: token 0 only has input 0: 1 + 1.125 + 2.25 = 4.375; token 1 only input 1: 0.5 + 0.375 + 0.75 = 1.625
    layer = tiny_attention()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    R = torch.tensor([[[4.0], [2.0]]], dtype=torch.float64)
    R_in, tape, rec = run_rule(CheferAttentionRule(), layer, x, R)
    assert torch.allclose(rec.output, layer(x))  # the rule's forward is the layer's
    ((index, R_A),) = tape.handed[ATTENTION_RELEVANCE]
    assert index == 0
    assert torch.allclose(R_A, torch.tensor([[[[1.5, 0.5], [0.75, 0.25]]]], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(R_in, torch.tensor([[[4.375, 0.0], [0.0, 1.625]]], dtype=torch.float64), atol=1e-8)
    assert math.isclose(R_in.sum().item(), 6.0, rel_tol=1e-8)  # conserves


def test_attention_rule_matches_generic_product_splits():
    torch.manual_seed(3)
    layer = SelfAttention(linear(torch.randn(12, 8)), linear(torch.randn(8, 4)), num_heads=2, scale=0.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    R = torch.randn(2, 5, 8, dtype=torch.float64)
    R_in, tape, rec = run_rule(CheferAttentionRule(), layer, x, R)
    # the same steps with the generic (autograd) product rule and the term-based α1β0 rule
    lin = CheferZPlusRule()
    e = CheferAttentionRule.values(layer, rec)  # q, k, v, q kᵀ, A, y of the recorded pass
    R_y, _, _ = run_rule(lin, layer.proj, layer.merge_heads(e["y"]), R)
    R_A, R_v = product_split(e["attn"], e["v"], layer.split_heads(R_y), e["y"], torch.matmul)
    R_q, R_k = product_split(e["qn"], e["kn"], R_A, e["dots"], lambda q, k: q @ k.transpose(-2, -1))
    R_t = torch.cat([layer.merge_heads(t) for t in (R_q, R_k, R_v)], -1)
    expected, _, _ = run_rule(lin, layer.qkv, x, R_t)
    assert torch.allclose(tape.handed[ATTENTION_RELEVANCE][0][1], R_A, atol=1e-10)
    assert torch.allclose(R_in, expected, atol=1e-9)
    # conservation at both products: Σ R_A = Σ R_v = Σ R_y / 2, Σ R_q + Σ R_k = Σ R_A
    assert torch.allclose(R_A.sum((1, 2, 3)), R_y.sum((1, 2)) / 2, atol=1e-9)
    assert torch.allclose(R_v.sum((1, 2, 3)), R_y.sum((1, 2)) / 2, atol=1e-9)
    assert torch.allclose((R_q + R_k).sum((1, 2, 3)), R_A.sum((1, 2, 3)), atol=1e-9)


# -- sums: residual rescaling ----------------------------------------------------------------------------------------
def test_skip_connection_rescaled_shares_hand_case():
    # a = (1, 2), f(a) = Scale(3, -2)(a) = (3, -4), y = (4, -2); R = (4, 2): s = R/y = (1, -1)
    # shares a ⊙ s = (1, -2) (Σa = -1), f ⊙ s = (3, 4) (Σf = 7); ΣR = 6, |Σa| + |Σf| = 8
    # rescaled: a' = (1, -2)·sign(-1)·6/8 = (-0.75, 1.5) (Σ 0.75 = 1/8·6); f' = (3, 4)·6/8 = (2.25, 3) (Σ 5.25 = 7/8·6)
    # f' passes the Scale unchanged -> R_in = a' + f' = (1.5, 4.5), Σ 6
    skip = SkipConnection(Chain([Scale(torch.tensor([3.0, -2.0], dtype=torch.float64))]))
    lrp = lrpkit.LRP(Chain([skip]).eval(), lrpkit.Composite(lrpkit.GlobalTypeMap(
        {SkipConnection: CheferSkipConnectionRule(), Scale: CheferPassRule()})))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    expl = lrp(x, R=torch.tensor([[4.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(expl.relevance, torch.tensor([[1.5, 4.5]], dtype=torch.float64), atol=1e-8)


def test_rescaled_split_branch_sums_per_sample():
    torch.manual_seed(4)
    a, b, R = (torch.randn(3, 4, 5, dtype=torch.float64) for _ in range(3))
    a2, b2 = rescaled_split([a, b], R)
    sa, sb, sr = a.sum((1, 2)), b.sum((1, 2)), R.sum((1, 2))
    assert torch.allclose(a2.sum((1, 2)), sa.abs() / (sa.abs() + sb.abs()) * sr)
    assert torch.allclose(b2.sum((1, 2)), sb.abs() / (sa.abs() + sb.abs()) * sr)
    assert torch.allclose(a2 / a, (torch.sign(sa) * sr / (sa.abs() + sb.abs())).view(3, 1, 1).expand_as(a))
    # a share with sum 0 gets nothing, all of ΣR goes to the other: a = (1.5, -1.5), b = (1, 2), R = (3, 3)
    # -> a' = 0, b' = (1, 2)·6/3 = (2, 4)
    z, rest = rescaled_split([torch.tensor([[1.5, -1.5]]), torch.tensor([[1.0, 2.0]])], torch.tensor([[3.0, 3.0]]))
    assert torch.equal(z, torch.zeros(1, 2)) and torch.allclose(rest, torch.tensor([[2.0, 4.0]]))


def test_positional_embedding_rule_keeps_the_input_share():
    # x = (1, 3), e = (1, -1): y = (2, 2); R = (4, 2): s = (2, 1); x-share (2, 3) (Σ 5), e-share (2, -1) (Σ 1)
    # rescaled x' = (2, 3)·6/6 = (2, 3); the embedding keeps 1
    from lrpkit.layers import PositionalEmbedding
    pe = PositionalEmbedding(torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1))
    x = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 2, 1, 1)
    R = torch.tensor([4.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    R_in, _, rec = run_rule(CheferPositionalEmbeddingRule(), pe, x, R)
    assert torch.allclose(R_in.flatten(), torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(rec.absorbed["positional_embedding"], torch.tensor([1.0], dtype=torch.float64))


def test_sum_rule_rescales_all_branches():
    # branches f1 = 2a, f2 = -a on a = (1, 1): y = (1, 1); R = (3, 1): s = (3, 1); shares (6, 2) Σ 8, (-3, -1) Σ -4
    # rescaled to 8/12·4 and 4/12·4: f1' = (6, 2)·4/12 = (2, 2/3), f2' = (-3, -1)·(-1)·4/12 = (1, 1/3); both pass
    from lrpkit.layers import Sum
    s = Sum(Chain([Scale(torch.tensor([2.0, 2.0], dtype=torch.float64))]),
            Chain([Scale(torch.tensor([-1.0, -1.0], dtype=torch.float64))]))
    lrp = lrpkit.LRP(Chain([s]).eval(), lrpkit.Composite(lrpkit.GlobalTypeMap({Sum: CheferSumRule(),
                                                                        Scale: CheferPassRule()})))
    expl = lrp(torch.ones(1, 2, dtype=torch.float64), R=torch.tensor([[3.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(expl.relevance, torch.tensor([[3.0, 1.0]], dtype=torch.float64))


# -- the composite ---------------------------------------------------------------------------------------------------
def test_composite_rule_table():
    table = TransformerAttribution(tiny_vit()).table()
    rows = {line.split()[2] + " " + line.split()[3]: line for line in table.splitlines()[1:]}
    expect = {"patch_embed.proj Conv2d(3,": "CheferZBoxRule(per_sample=True",
              "pos_embed PositionalEmbedding()": "CheferPositionalEmbeddingRule()",
              "blocks.0.attn SkipConnection": "CheferSkipConnectionRule(",
              "blocks.0.norm1 LayerNormalize()": "CheferPassRule()",
              "blocks.0.norm1 Scale()": "CheferPassRule()",
              "blocks.0.attn SelfAttention(heads=2,": "CheferAttentionRule(linear_rule=CheferLinearRule(",
              "blocks.2.mlp.fc1 Linear(in_features=32,": "CheferLinearRule(",
              "blocks.2.mlp.act GELU(approximate='none')": "CheferPassRule()",
              "norm LayerNormalize()": "CheferPassRule()",
              "pool SelectClassToken()": "CheferSelectTokenRule()",
              "head Linear(in_features=32,": "CheferLinearRule("}
    for key, rule in expect.items():
        assert key in rows, key
        assert rule in rows[key], (key, rows[key])
    assert "Epsilon" not in table and "ZeroRule" not in table
    # fixed z^B bounds instead of the input's
    fixed = lrpkit.LRP(tiny_vit(), chefer_composite(low=-2.0, high=3.0)).table()
    assert "ZBoxRule(low=-2.0, high=3.0" in fixed.splitlines()[1]


def distilled_vit():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(9)
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                      num_classes=5).eval().double()


@pytest.mark.parametrize("make", [tiny_vit, distilled_vit, lambda: tiny_vit(global_pool="avg", init_values=0.1)],
                         ids=["vit", "distilled", "avg-pool-layerscale"])
def test_composite_with_lrp_conserves_and_hands_out_attention_relevance(make):
    model = make()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expl = lrpkit.LRP(model, chefer_composite())(x)
    blocks = sorted(i for i, _ in expl.extras[ATTENTION_RELEVANCE])
    assert len(blocks) == 3 and all(r.shape == (2, 2, 17 + (make is distilled_vit), 17 + (make is distilled_vit))
                                    for _, r in expl.extras[ATTENTION_RELEVANCE])
    acc = expl.accounting
    # every rule conserves (up to the 1e-9 stabilisers); what leaves goes to the prefix tokens and the embedding
    assert set(acc.parts) <= {"class_token", "distillation_token", "positional_embedding", "stabilizer"}
    assert acc.parts["stabilizer"].abs().max() < 1e-6
    assert torch.allclose(acc.total(), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="both low and high"):
        chefer_composite(low=0.0)


# -- an independent implementation of the paper's algorithm --------------------------------------------------------
def _lin(x, layer, R):
    """α1β0 without bias, the direct way: z+ = x+ W+ + x- W-, R_in = x+ (s W+) + x- (s W-)."""
    w = layer.weight
    pw, nw, px, nx = w.clamp(min=0), w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(R, F.linear(px, pw) + F.linear(nx, nw))
    return px * (s @ pw) + nx * (s @ nw)


def _add(a, b, R):
    s = safe_divide(R, a + b)
    ra, rb = a * s, b * s
    sa, sb = ra.sum(), rb.sum()  # branch sums become |Σa| / (|Σa| + |Σb|) · ΣR; ε = 1e-9 on |Σa| + |Σb| as lrpkit
    # (the reference code also puts it on Σa and Σb, a difference of O(ε / |Σa|) that this test leaves out)
    den = sa.abs() + sb.abs() + 1e-9
    return ra * (sa.abs() / den * R.sum() / sa), rb * (sb.abs() / den * R.sum() / sb)


def reference(model: VisionTransformer, x: torch.Tensor, target: int, start_layer: int):
    """One image: the reference code's forward with saved activations, its relprop and its rollout."""
    H = model.blocks[0].attn.num_heads
    with torch.enable_grad():
        t = model.patch_embed(x)
        t = torch.cat([model.cls_token.expand(1, -1, -1), t], 1) + model.pos_embed
        saved, attns = [], []
        for blk in model.blocks:
            a = blk.attn
            h = blk.norm1(t)
            q, k, v = a.qkv(h).reshape(1, -1, 3, H, a.head_dim).permute(2, 0, 3, 1, 4)
            A = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
            y = (A @ v).transpose(1, 2).reshape(1, -1, H * a.head_dim)
            o = a.proj(y)
            t1 = t + o
            h2 = blk.norm2(t1)
            g = blk.mlp.act(blk.mlp.fc1(h2))
            f2 = blk.mlp.fc2(g)
            saved.append(dict(t=t, h=h, q=q, k=k, v=v, A=A, y=y, o=o, t1=t1, h2=h2, g=g, f2=f2))
            attns.append(A)
            t = t1 + f2
        out = model.head(model.norm(t)[:, 0])
        grads = torch.autograd.grad(out[0, target], attns)
    with torch.no_grad():
        R = _lin(model.norm(t)[:, 0], model.head, F.one_hot(torch.tensor([target]), out.shape[1]).to(x))
        R = torch.cat([R[:, None], torch.zeros_like(t[:, 1:])], 1)
        cams = []
        for blk, s in zip(reversed(model.blocks), reversed(saved)):
            ra, rb = _add(s["t1"], s["f2"], R)
            rb = _lin(s["g"], blk.mlp.fc2, rb)
            rb = _lin(s["h2"], blk.mlp.fc1, rb)
            R = ra + rb
            ra, rb = _add(s["t"], s["o"], R)
            rb = _lin(s["y"], blk.attn.proj, rb).reshape(1, -1, H, blk.attn.head_dim).transpose(1, 2)
            S = safe_divide(rb, s["A"] @ s["v"])
            R_A, R_v = s["A"] * (S @ s["v"].transpose(-2, -1)) / 2, s["v"] * (s["A"].transpose(-2, -1) @ S) / 2
            cams.insert(0, R_A)
            S = safe_divide(R_A, s["q"] @ s["k"].transpose(-2, -1))
            R_q, R_k = s["q"] * (S @ s["k"]) / 2, s["k"] * (S.transpose(-2, -1) @ s["q"]) / 2
            R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(1, -1, 3 * H * blk.attn.head_dim)
            R = ra + _lin(s["h"], blk.attn.qkv, R_qkv)
        n = t.shape[1]
        mats = [torch.eye(n, dtype=x.dtype) + (g[0] * c[0]).clamp(min=0).mean(0) for g, c in zip(grads, cams)]
        joint = torch.eye(n, dtype=x.dtype)
        for m in mats[start_layer:]:
            joint = m @ joint
        partial = cams[-1][0].clamp(min=0).mean(0)[0, 1:]
    return joint[0, 1:], partial


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_matches_independent_implementation(start_layer):
    model = tiny_vit()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = [1, 3]
    expl = TransformerAttribution(model, start_layer=start_layer)(x, target=targets)
    partial = PartialLRP(model)(x, target=targets)
    assert expl.method == "TransformerAttribution" and expl.token_relevance.shape == (2, 4, 4)
    assert expl.target.tolist() == targets and expl.heatmap.shape == (2, 32, 32)
    assert torch.allclose(expl.output, model(x))
    for i in range(2):
        ref_map, ref_partial = reference(model, x[i:i + 1], targets[i], start_layer)
        assert torch.allclose(expl.token_relevance[i].flatten(), ref_map, rtol=1e-9, atol=0)
        assert torch.allclose(partial.token_relevance[i].flatten(), ref_partial, rtol=1e-9, atol=0)
    assert expl.token_relevance.abs().max() > 0


def test_batch_equals_single_samples_float32():
    model = tiny_vit(dtype=torch.float32, seed=6)
    x = torch.randn(4, 3, 32, 32)
    ta = TransformerAttribution(model)
    batch = ta(x)
    for i in range(4):
        single = ta(x[i:i + 1])
        assert single.target.item() == batch.target[i].item()
        assert torch.allclose(batch.token_relevance[i], single.token_relevance[0], rtol=1e-4, atol=1e-7)


def test_start_layer_depth_is_identity_and_last_block_alone():
    model = tiny_vit(seed=7)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # start_layer = depth: C = I, whose class-token row is zero over the patches
    assert TransformerAttribution(model, start_layer=3)(x).token_relevance.abs().max() == 0
    # start_layer = depth - 1: C = I + Ā_L, the class-token row over the patches is Ā_L[cls, patches], with
    # G_L from the attention-capturing forward pass and R_L from plain LRP with the composite
    expl = TransformerAttribution(model, start_layer=2)(x)
    _, _, _, grads = attention_and_gradients(lrpkit.canonize(model), x.clone().requires_grad_())
    rel = dict(lrpkit.LRP(model, chefer_composite())(x).extras[ATTENTION_RELEVANCE])
    a_bar = (grads[2] * rel[27]).clamp(min=0).mean(1)
    assert torch.allclose(expl.token_relevance.flatten(1), a_bar[:, 0, 1:], rtol=1e-8)
    # more blocks add non-negative terms to the row: start_layer 0 >= start_layer 2 everywhere
    full = TransformerAttribution(model, start_layer=0)(x)
    assert (full.token_relevance >= expl.token_relevance - 1e-12).all()
    assert not torch.allclose(full.token_relevance, expl.token_relevance)


def test_forward_runs_once_per_call(monkeypatch):
    model = tiny_vit()
    ta = TransformerAttribution(model)
    calls = []
    original = CheferAttentionRule.forward

    def counting(self, step, x, prop):
        calls.append(step.index)
        return original(self, step, x, prop)

    monkeypatch.setattr(CheferAttentionRule, "forward", counting)
    ta(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert calls == [7, 17, 27]  # one forward pass, no second one for the gradients


@pytest.mark.parametrize("kw", [dict(reg_tokens=2), dict(no_embed_class=True), dict(init_values=0.1),
                                dict(img_size=(32, 48)), dict(qk_norm=True)])
def test_configurations_batch_equals_singles(kw):
    model = tiny_vit(seed=8, **kw)
    gh, gw = (4, 6) if "img_size" in kw else (4, 4)
    x = torch.randn(2, 3, 8 * gh, 8 * gw, dtype=torch.float64)
    ta = TransformerAttribution(model, start_layer=1)
    batch = ta(x)
    assert batch.token_relevance.shape == (2, gh, gw)
    assert torch.isfinite(batch.token_relevance).all() and batch.token_relevance.abs().max() > 0
    single = ta(x[1:])
    assert torch.allclose(batch.token_relevance[1], single.token_relevance[0], rtol=1e-8)


def test_distilled_model():
    model = distilled_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expl = TransformerAttribution(model)(x)
    assert expl.token_relevance.shape == (2, 4, 4)  # the distillation token is a prefix token, not a patch
    assert torch.allclose(expl.output, model(x))
    single = TransformerAttribution(model)(x[:1])
    assert torch.allclose(expl.token_relevance[0], single.token_relevance[0], rtol=1e-8)


def test_errors_and_model_untouched():
    model = tiny_vit()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training mode"):
        TransformerAttribution(model)(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()
    with pytest.raises(ValueError, match="start_layer"):
        TransformerAttribution(model, start_layer=4)
    # a chain whose head reads token 0 but has no class token (token 0 is a patch): nothing to read out
    torch.manual_seed(0)
    no_token = Chain([nn.Conv2d(3, 4, 8, 8), lrpkit.layers.PatchFlatten(),
                      SkipConnection(Chain([SelfAttention(nn.Linear(4, 12), nn.Linear(4, 4), 2, 0.5)])),
                      lrpkit.layers.SelectClassToken(0), nn.Linear(4, 3)]).eval().double()
    with pytest.raises(TypeError, match="neither a class token nor a mean"):
        PartialLRP(no_token)
    with pytest.raises(TypeError, match="vision transformer"):
        TransformerAttribution(nn.Sequential(nn.Linear(3, 2)).eval())
    with pytest.raises(TypeError, match="CheferAttentionRule on every SelfAttention"):
        TransformerAttribution(model, composite=lrpkit.presets.CPLRP())
    # a rule that cuts the forward graph above the blocks (generic LRP-ε on the head): a clear error
    broken = lrpkit.Composite(*chefer_composite().primitives, lrpkit.LastLayerMap(lrpkit.rules.EpsilonRule()))
    with pytest.raises(TypeError, match="does not keep that graph"):
        TransformerAttribution(model, composite=broken)(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    # inside torch.inference_mode() it works (tests/test_inference_mode.py)


@pytest.mark.parametrize("kw", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False)],
                         ids=["avg+cls", "avg-no-cls"])
def test_mean_pooled_models_read_the_mean_of_the_patch_rows(kw):
    # the head reads (1/M) Σ of the M patch tokens: the map is the read-out row w · C, w = 1/M on every patch
    model = tiny_vit(seed=4, **kw)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    P = 1 if kw.get("class_token", True) else 0
    w = torch.zeros(16 + P, dtype=torch.float64)
    w[P:] = 1 / 16
    _, _, _, grads = attention_and_gradients(lrpkit.canonize(model), x.clone().requires_grad_())
    rel = dict(lrpkit.LRP(model, chefer_composite())(x).extras[ATTENTION_RELEVANCE])
    last = max(rel)
    # start_layer = depth - 1: C = I + Ā_L, read-out row w + w Ā_L
    a_bar = (grads[2] * rel[last]).clamp(min=0).mean(1)
    expl = TransformerAttribution(model, start_layer=2)(x)
    assert torch.allclose(expl.token_relevance.flatten(1), (w + w @ a_bar)[:, P:], rtol=1e-8)
    # start_layer = depth: C = I, the constant w over the patches (not zero, unlike the class token's row)
    assert torch.allclose(TransformerAttribution(model, start_layer=3)(x).token_relevance,
                          torch.full((2, 4, 4), 1 / 16, dtype=torch.float64))
    # PartialLRP: Σ_i w_i mean_h R_L⁺[i, patches]
    partial = PartialLRP(model)(x)
    expected = torch.einsum("n,bhnm->bm", w, rel[last].clamp(min=0)) / 2
    assert torch.allclose(partial.token_relevance.flatten(1), expected[:, P:], rtol=1e-8)
    assert partial.token_relevance.abs().max() > 0
    # per sample as alone
    full = TransformerAttribution(model)
    assert torch.allclose(full(x).token_relevance[1], full(x[1:]).token_relevance[0], rtol=1e-8)


# -- a score bias and a rotary embedding (BEiT, EVA-02) ----------------------------------------------------------
def test_attention_rule_with_a_score_bias_hand_case():
    # tiny_attention's q = (1, 2), k = (1, 1), v = (3, 1), q kᵀ = [[1, 1], [2, 2]], plus B = [[-2, -2], [0, 0]]:
    # S = [[-1, -1], [2, 2]], each row constant -> A = 0.5 everywhere, y = (2, 2), R_A = [[1.5, .5], [.75, .25]] and
    # R_v = (2.25, 0.75) as without the bias (test_attention_rule_hand_case).
    # Sum rule on S = P + B: t = R_A / S = [[-1.5, -.5], [.375, .125]]; P ⊙ t = [[-1.5, -.5], [.75, .25]] (Σ -1),
    # B ⊙ t = [[3, 1], [0, 0]] (Σ 4); rescaled to |−1| / 5 · 3 = 0.6 and 4 / 5 · 3 = 2.4 (factor ΣR_A / 5 = 0.6):
    # R_P = −0.6 · P ⊙ t = [[.9, .3], [−.45, −.15]], R_B = 0.6 · B ⊙ t (Σ 2.4, the accounting's attention_bias)
    # s' = R_P / (q kᵀ) = [[.9, .3], [−.225, −.075]]; R_q = q ⊙ (s' k) / 2 = (1·1.2/2, 2·(−.3)/2) = (.6, −.3);
    # R_k = k ⊙ (s'ᵀ q) / 2 = ((.9 − .45)/2, (.3 − .15)/2) = (.225, .075)   (Σ R_q + Σ R_k = 0.6 = Σ R_P)
    # qkv α1β0: token 0: .6 + .225 + 2.25 = 3.075; token 1: −.3 + .075 + .75 = .525   (Σ 3.6 = 6 − 2.4)
    qkv, proj = tiny_attention().qkv, tiny_attention().proj
    layer = SelfAttention(qkv, proj, num_heads=1, scale=1.0,
                          bias=torch.tensor([[[[-2.0, -2.0], [0.0, 0.0]]]], dtype=torch.float64))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    R = torch.tensor([[[4.0], [2.0]]], dtype=torch.float64)
    R_in, tape, rec = run_rule(CheferAttentionRule(), layer, x, R)
    assert torch.allclose(rec.output, layer(x))
    ((_, R_A),) = tape.handed[ATTENTION_RELEVANCE]
    assert torch.allclose(R_A, torch.tensor([[[[1.5, 0.5], [0.75, 0.25]]]], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(R_in, torch.tensor([[[3.075, 0.0], [0.0, 0.525]]], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(rec.absorbed["attention_bias"], torch.tensor([2.4], dtype=torch.float64), atol=1e-8)
    # a zero bias is no bias
    zero = SelfAttention(qkv, proj, num_heads=1, scale=1.0, bias=torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    R_zero, _, rec_zero = run_rule(CheferAttentionRule(), zero, x, R)
    assert torch.allclose(R_zero, torch.tensor([[[4.375, 0.0], [0.0, 1.625]]], dtype=torch.float64), atol=1e-8)
    assert rec_zero.absorbed["attention_bias"].abs().max() < 1e-12


def rotary_90(tokens=2, dim=2, num_prefix=0):
    """A Rotary that leaves token 0 alone (cos 1, sin 0) and turns every channel pair of the others by 90°
    (cos 0, sin 1: ``(a, b) -> (−b, a)``)."""
    from lrpkit.layers import Rotary

    cos = torch.zeros(tokens - num_prefix, dim, dtype=torch.float64)
    sin = torch.ones(tokens - num_prefix, dim, dtype=torch.float64)
    cos[0], sin[0] = 1.0, 0.0
    return Rotary(sin, cos, num_prefix=num_prefix)


def test_attention_rule_with_a_rotary_embedding_hand_case():
    # one head of width 2; x0 = (1, 0), x1 = (0, 1), so each token's q, k, v are the weights' columns:
    # q0 = (0, 1), q1 = (2, 0); k0 = (0, 1), k1 = (1, 0); v0 = (3, 0), v1 = (0, 1). The rotation leaves token 0 and
    # turns token 1: q'1 = (0, 2), k'1 = (0, 1); q' k'ᵀ = [[1, 1], [2, 2]] -> A = 0.5, y = (1.5, 0.5) for both.
    # proj = I (bias 5, ignored): R_y = R = ((3, 1), (1.5, .5)); s = R_y / y / 2 = ((1, 1), (.5, .5))
    # R_A = A ⊙ (s vᵀ) = [[1.5, .5], [.75, .25]]; R_v = v ⊙ (Aᵀ s) = ((2.25, 0), (0, .75))
    # s' = R_A / (q' k'ᵀ) = [[1.5, .5], [.375, .125]]
    # s' k' = ((0, 2), (0, .5)); Jᵀ leaves token 0 and turns token 1 back, (a, b) -> (b, −a): ((0, 2), (.5, 0))
    # R_q = q ⊙ Jᵀ(s' k') / 2 = ((0, 1), (.5, 0))                                     (Σ 1.5 = Σ R_A / 2)
    # s'ᵀ q' = ((0, 2.25), (0, .75)); Jᵀ: ((0, 2.25), (.75, 0)); R_k = k ⊙ … / 2 = ((0, 1.125), (.375, 0))  (Σ 1.5)
    # qkv α1β0: token 0: 1 + 1.125 + 2.25 = 4.375; token 1: .5 + .375 + .75 = 1.625   (Σ 6: conserves)
    qkv = linear([[0, 2], [1, 0], [0, 1], [1, 0], [3, 0], [0, 1]], bias=[0.0] * 6)
    proj = linear([[1.0, 0.0], [0.0, 1.0]], bias=[5.0, 5.0])
    layer = SelfAttention(qkv, proj, num_heads=1, scale=1.0, rope=rotary_90())
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    q, k = layer.positions(*(layer.split_heads(t) for t in qkv(x).chunk(3, -1)[:2]))
    assert torch.equal(q[0, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64))  # q' as above
    R = torch.tensor([[[3.0, 1.0], [1.5, 0.5]]], dtype=torch.float64)
    R_in, tape, rec = run_rule(CheferAttentionRule(), layer, x, R)
    assert torch.allclose(rec.output, layer(x))
    ((_, R_A),) = tape.handed[ATTENTION_RELEVANCE]
    assert torch.allclose(R_A, torch.tensor([[[[1.5, 0.5], [0.75, 0.25]]]], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(R_in, torch.tensor([[[4.375, 0.0], [0.0, 1.625]]], dtype=torch.float64), atol=1e-8)


def test_attention_rule_with_bias_rope_and_qk_norm_matches_generic_splits():
    """Random weights, two heads of width 4, a class token left unrotated, qk LayerNorms and a score bias: the rule
    equals the steps done with the generic (autograd) product rule, Chefer's sum rule and the term-based α1β0."""
    from lrpkit.layers import Rotary

    torch.manual_seed(11)
    n, d = 5, 4
    rope = Rotary(torch.randn(n - 1, d, dtype=torch.float64), torch.randn(n - 1, d, dtype=torch.float64),
                  num_prefix=1)
    norms = [nn.LayerNorm(d).double().requires_grad_(False) for _ in range(2)]
    for norm in norms:
        norm.weight.data.add_(0.3 * torch.randn(d, dtype=torch.float64))
    layer = SelfAttention(linear(torch.randn(24, 8)), linear(torch.randn(8, 8)), num_heads=2, scale=0.5,
                          q_norm=norms[0], k_norm=norms[1], bias=torch.randn(1, 2, n, n, dtype=torch.float64),
                          rope=rope)
    x = torch.randn(2, n, 8, dtype=torch.float64)
    R = torch.randn(2, n, 8, dtype=torch.float64)
    R_in, tape, rec = run_rule(CheferAttentionRule(), layer, x, R)
    assert torch.allclose(rec.output, layer(x), atol=1e-12)
    lin = CheferZPlusRule()
    e = CheferAttentionRule.values(layer, rec)
    R_y, _, _ = run_rule(lin, layer.proj, layer.merge_heads(e["y"]), R)
    R_A, R_v = product_split(e["attn"], e["v"], layer.split_heads(R_y), e["y"], torch.matmul)
    t = safe_divide(R_A, e["scores"])
    R_P, R_B = rescaled_split([e["dots"] * layer.scale * t, e["bias"] * t], R_A)
    R_q, R_k = product_split(e["qn"], e["kn"], R_P, e["dots"], lambda q, k: rope(q) @ rope(k).transpose(-2, -1))
    R_t = torch.cat([layer.merge_heads(r) for r in (R_q, R_k, R_v)], -1)
    expected, _, _ = run_rule(lin, layer.qkv, x, R_t)
    assert torch.allclose(tape.handed[ATTENTION_RELEVANCE][0][1], R_A, atol=1e-10)
    assert torch.allclose(R_in, expected, atol=1e-9)
    assert torch.allclose(rec.absorbed["attention_bias"], R_B.sum((1, 2, 3)), atol=1e-10)
    # conservation: the rotary embedding is part of a bilinear product, Σ R_q = Σ R_k = Σ R_P / 2; the bias keeps
    # the rest of Σ R_A
    assert torch.allclose(R_q.sum((1, 2, 3)), R_P.sum((1, 2, 3)) / 2, atol=1e-9)
    assert torch.allclose(R_k.sum((1, 2, 3)), R_P.sum((1, 2, 3)) / 2, atol=1e-9)
    assert torch.allclose(R_P.sum((1, 2, 3)) + R_B.sum((1, 2, 3)), R_A.sum((1, 2, 3)), atol=1e-9)
    assert (R_B.sum((1, 2, 3)).abs() > 1e-3).all()  # a real share


def rope_transformer(seed=0):
    """A canonized-style chain with a class token, two blocks of attention with a rotary embedding (the patch tokens
    rotated, the class token not) and a score bias, an MLP, the final norm and a class-token head (float64)."""
    from lrpkit.layers import ClassToken, PatchFlatten, Rotary, SelectClassToken

    torch.manual_seed(seed)
    C, heads, n = 16, 2, 17
    layers = [nn.Conv2d(3, C, 8, 8), PatchFlatten(), ClassToken(torch.randn(1, 1, C), ["class"])]
    for _ in range(2):
        rope = Rotary(torch.randn(n - 1, C // heads), torch.randn(n - 1, C // heads), num_prefix=1, half=True)
        attn = SelfAttention(nn.Linear(C, 3 * C), nn.Linear(C, C), heads, (C // heads) ** -0.5,
                             bias=torch.randn(1, heads, n, n), rope=rope)
        layers += [SkipConnection(Chain([LayerNormalize(), attn])),
                   SkipConnection(Chain([LayerNormalize(), nn.Linear(C, 32), nn.GELU(), nn.Linear(32, C)]))]
    layers += [LayerNormalize(), Scale(1 + 0.1 * torch.randn(C)), SelectClassToken(0), nn.Linear(C, 5)]
    return Chain(layers).eval().double()


def test_transformer_attribution_on_rotary_attention_with_a_bias():
    model = rope_transformer()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # C = I + Ā_L (start_layer = 1): the attention gradient from the recording pass, R_L from plain LRP
    expl = TransformerAttribution(model, start_layer=1)(x)
    _, _, attns, grads = attention_and_gradients(lrpkit.canonize(model), x.clone().requires_grad_())
    lrp = lrpkit.LRP(model, chefer_composite())(x)
    rel = dict(lrp.extras[ATTENTION_RELEVANCE])
    a_bar = (grads[1] * rel[max(rel)]).clamp(min=0).mean(1)
    assert torch.allclose(expl.token_relevance.flatten(1), a_bar[:, 0, 1:], rtol=1e-8)
    assert expl.token_relevance.abs().max() > 0
    # the books close: what the biases of the scores kept is in the accounting
    acc = lrp.accounting
    assert (acc.parts["attention_bias"].abs() > 1e-6).all()
    assert torch.allclose(acc.total(), acc.output)
    full = TransformerAttribution(model)
    assert torch.allclose(full(x).token_relevance[1], full(x[1:]).token_relevance[0], rtol=1e-8)
    partial = PartialLRP(model)(x)
    assert torch.allclose(partial.token_relevance.flatten(1), rel[max(rel)].clamp(min=0).mean(1)[:, 0, 1:])


def test_attention_rule_refuses_windows_and_other_position_maps():
    class Windowed(SelfAttention):
        def group(self, x):
            return x

    layer = tiny_attention()
    with pytest.raises(lrpkit.rules.IncompatibleRuleError, match="within groups"):
        CheferAttentionRule().check(Windowed(layer.qkv, layer.proj, 1, 1.0))
    with pytest.raises(lrpkit.rules.IncompatibleRuleError, match="Rotary"):
        CheferAttentionRule().check(SelfAttention(layer.qkv, layer.proj, 1, 1.0, rope=nn.Tanh()))
