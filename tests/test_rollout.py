"""Attention Rollout and Gradient Attention Rollout: the math on hand-made matrices, then the explainers against an
independent reference that reads timm's own attention probabilities through hooks (non-fused attention)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from lrpkit.methods.rollout import (AttentionRollout, GradientRollout, discard_smallest, fuse_heads, gradient_fused,
                                    gradient_rollout, normalize_rows, readout_weights, rollout, token_map)


# ------------------------------------------------------------------------------------------------ helpers
def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()


def timm_attention(model, x, target=None, grad=False):
    """Logits, A_b and (optionally) ∂y_t/∂A_b read from timm itself: non-fused attention on a copy of the model, a
    forward hook on each block's attn_drop (applied to the softmax output) keeps the probabilities."""
    model = copy.deepcopy(model)
    store = []

    def hook(module, inp, out):
        if grad:
            out.retain_grad()
        store.append(out)

    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(hook)
    with torch.enable_grad():
        logits = model(x)
        t = logits.argmax(1) if target is None else torch.as_tensor(target).expand(x.shape[0])
        if grad:
            logits.gather(1, t[:, None]).sum().backward()
    attns = [a.detach().double() for a in store]
    grads = [a.grad.double() for a in store] if grad else None
    return logits.detach(), t, attns, grads


def ref_rollout(fused_per_block, ratio=0.0, protect=True):
    """Independent per-sample rollout in numpy (float64): discard via a stable argsort, add I, row-normalise,
    multiply on the left. fused_per_block: list of (B, N, N) arrays. Returns (B, N, N)."""
    out = []
    for b in range(fused_per_block[0].shape[0]):
        n = fused_per_block[0].shape[-1]
        r = np.eye(n)
        for f in fused_per_block:
            a = np.array(f[b], dtype=np.float64)
            if ratio > 0:
                flat = a.reshape(-1)
                order = [i for i in np.argsort(flat, kind="stable") if not (protect and i == 0)]
                flat[order[: int(ratio * n * n)]] = 0
                a = flat.reshape(n, n)
            a = a + np.eye(n)
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        out.append(r)
    return np.stack(out)


def fuse_np(attn, how):
    return {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[how].numpy()


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------- the math
H1 = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
H2 = torch.tensor([[0.2, 0.8], [0.3, 0.7]])
TWO_HEADS = torch.stack([H1, H2])[None]  # (B=1, heads=2, N=2, N=2)


def test_fuse_heads_by_hand():
    assert torch.allclose(fuse_heads(TWO_HEADS, "mean"), torch.tensor([[[0.55, 0.45], [0.4, 0.6]]]))
    assert torch.allclose(fuse_heads(TWO_HEADS, "max"), torch.tensor([[[0.9, 0.8], [0.5, 0.7]]]))
    assert torch.allclose(fuse_heads(TWO_HEADS, "min"), torch.tensor([[[0.2, 0.1], [0.3, 0.5]]]))
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(TWO_HEADS, "median")


def test_normalize_rows_divides_each_row_by_its_own_sum():
    # max fusion [[.9,.8],[.5,.7]]; (A + I)/2 = [[.95,.4],[.25,.85]]; row sums 1.35 and 1.1
    # -> [[.95/1.35, .4/1.35], [.25/1.1, .85/1.1]] = [[19/27, 8/27], [5/22, 17/22]]
    got = normalize_rows(fuse_heads(TWO_HEADS, "max"))
    want = torch.tensor([[[19 / 27, 8 / 27], [5 / 22, 17 / 22]]])
    assert torch.allclose(got, want)
    assert torch.allclose(got.sum(-1), torch.ones(1, 2))
    # vit-explain's a / a.sum(dim=-1) divides entry (i, j) by row j's sum: [[.95/1.35, .4/1.1], [.25/1.35, .85/1.1]]
    # -- row 0 would sum to 1.067; this test fails on that defect
    a = (fuse_heads(TWO_HEADS, "max") + torch.eye(2)) / 2
    buggy = a / a.sum(dim=-1)
    assert not torch.allclose(buggy, want)


def test_discard_smallest_by_hand_per_sample_and_protecting_the_class_token():
    a = torch.tensor([[[0.1, 0.5], [0.2, 0.3]],
                      [[0.7, 0.05], [0.6, 0.01]]])
    # ratio 0.5 of 4 entries = 2 smallest per sample, (0,0) never:
    # sample 0: candidates .5 .2 .3 -> drop .2 .3; sample 1: candidates .05 .6 .01 -> drop .01 .05
    got = discard_smallest(a, 0.5, protect=0)
    assert torch.equal(got, torch.tensor([[[0.1, 0.5], [0.0, 0.0]], [[0.7, 0.0], [0.6, 0.0]]]))
    # without protection sample 0 loses .1 and .2 instead
    assert torch.equal(discard_smallest(a, 0.5, protect=None)[0], torch.tensor([[0.0, 0.5], [0.0, 0.3]]))
    assert torch.equal(discard_smallest(a, 0.0), a)
    for bad in (-0.1, 1.0, "0.5"):
        with pytest.raises(ValueError, match="discard_ratio"):
            discard_smallest(a, bad)


def test_rollout_of_two_blocks_by_hand():
    # Â_1 = normalised max fusion = [[19/27, 8/27], [5/22, 17/22]]; Â_2 = normalised mean fusion:
    # (mean + I)/2 = [[.775, .225], [.2, .8]] (rows already sum to 1)
    a1 = normalize_rows(fuse_heads(TWO_HEADS, "max"))
    a2 = normalize_rows(fuse_heads(TWO_HEADS, "mean"))
    # rollout = Â_2 Â_1; row 0 = [.775·19/27 + .225·5/22, .775·8/27 + .225·17/22] = [0.596506, 0.403494]
    r = rollout([a1, a2])
    assert torch.allclose(r[0, 0], torch.tensor([0.775 * 19 / 27 + 0.225 * 5 / 22, 0.775 * 8 / 27 + 0.225 * 17 / 22]))
    assert torch.allclose(r[0, 0], torch.tensor([0.596506, 0.403494]), atol=1e-6)
    assert torch.allclose(r.sum(-1), torch.ones(1, 2))  # a product of row-stochastic matrices
    assert not torch.allclose(r, rollout([a2, a1]))  # the order matters: Â_L ⋯ Â_1


def test_gradient_fusion_clamps_after_the_head_mean():
    # entry (0,1): head 1 A⊙G = .5·.8 = .4, head 2 = .5·(-.4) = -.2 -> mean .1 (clamp first would give .2)
    a = torch.full((1, 2, 2, 2), 0.5)
    g = torch.tensor([[[[1.0, 0.8], [0.0, -1.0]], [[1.0, -0.4], [0.0, -1.0]]]])
    f = gradient_fused(a, g)
    assert torch.allclose(f, torch.tensor([[[0.5, 0.1], [0.0, 0.0]]]))  # entry (1,1): mean -.5 -> clamped to 0


def test_gradient_rollout_pairs_each_block_with_its_own_gradient():
    a1, g1 = torch.tensor([[0.6, 0.4], [0.2, 0.8]]), torch.ones(2, 2)
    a2, g2 = torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    attns, grads = [a1[None, None], a2[None, None]], [g1[None, None], g2[None, None]]
    # correct pairing: F1 = A1 -> Â1 = (A1 + I)/2 = [[.8, .2], [.1, .9]];
    # F2 = A2⊙G2 = [[0, .2], [.5, .5]] -> (F2 + I)/2 = [[.5, .1], [.25, .75]]
    #    -> rows / (.6, 1) = [[5/6, 1/6], [.25, .75]]
    # row 0 of Â2 Â1 = [5/6·.8 + 1/6·.1, 5/6·.2 + 1/6·.9] = [41/60, 19/60]
    r = gradient_rollout(attns, grads)
    assert torch.allclose(r[0, 0], torch.tensor([41 / 60, 19 / 60]))
    # vit-explain's reversed pairing (A1 with G2, A2 with G1) gives row 0 = [0.532778, 0.467222]
    rev = gradient_rollout(attns, grads[::-1])
    assert torch.allclose(rev[0, 0], torch.tensor([0.95 * 5 / 9 + 0.05 * 0.1, 0.95 * 4 / 9 + 0.05 * 0.9]))
    assert not torch.allclose(r, rev)


def test_readout_weights_and_token_map():
    vit = AttentionRollout(tiny_vit())
    w = readout_weights(vit.chain, 17, 1)
    assert torch.equal(w, torch.eye(17)[0])  # global_pool='token': the class token
    avg = AttentionRollout(tiny_vit(class_token=False, global_pool="avg"))
    assert torch.allclose(readout_weights(avg.chain, 16, 0), torch.full((16,), 1 / 16))
    both = AttentionRollout(tiny_vit(class_token=True, global_pool="avg", reg_tokens=2))
    # TokenMean(start=3): tokens 3..18 equally, prefix rows (class, 2 registers) weight 0
    w = readout_weights(both.chain, 19, 3)
    assert torch.allclose(w, torch.cat([torch.zeros(3), torch.full((16,), 1 / 16)]))
    rows = torch.arange(2 * 6.0).view(2, 6)  # 2 prefix tokens + a 2x2 grid
    assert torch.equal(token_map(rows, 2, (2, 2)), torch.tensor([[[2.0, 3], [4, 5]], [[8, 9], [10, 11]]]))
    with pytest.raises(ValueError, match="patch grid"):
        token_map(rows, 1, (2, 2))


# ------------------------------------------------------------------------------------------------ on models
def uniform_attention(model):
    # q = k = 0 (qkv weight and bias zero): every score is 0, so A = 1/N everywhere
    for blk in model.blocks:
        blk.attn.qkv.weight.data.zero_()
        blk.attn.qkv.bias.data.zero_()
    return model


@pytest.mark.parametrize("kw, value", [
    # N = 1 + 16: Â = (U + I)/2 rows sum to 1; two blocks: (½U + ½I)² = ¾U + ¼I (U² = U);
    # class row over a patch token: ¾·1/17
    (dict(), 0.75 / 17),
    # 4 registers: N = 21 -> ¾/21
    (dict(reg_tokens=4), 0.75 / 21),
    # no class token, global_pool='avg': mean of the 16 patch rows of ¾U + ¼I over column j: ¾/16 + ¼·1/16 = 1/16
    (dict(class_token=False, global_pool="avg"), 1 / 16),
])
def test_rollout_of_uniform_attention_by_hand(kw, value):
    e = AttentionRollout(uniform_attention(tiny_vit(**kw)))(X)
    assert e.token_relevance.shape == (3, 4, 4)
    assert torch.allclose(e.token_relevance, torch.full((3, 4, 4), value))


@pytest.mark.parametrize("fusion, ratio", [("mean", 0.0), ("max", 0.0), ("min", 0.3), ("max", 0.9)])
def test_attention_rollout_matches_timm_reference(fusion, ratio):
    model = tiny_vit(reg_tokens=1)
    logits, _, attns, _ = timm_attention(model, X)
    e = AttentionRollout(model, head_fusion=fusion, discard_ratio=ratio)(X)
    ref = ref_rollout([fuse_np(a, fusion) for a in attns], ratio)[:, 0, 2:].reshape(3, 4, 4)
    assert torch.allclose(e.token_relevance.double(), torch.as_tensor(ref), atol=1e-5)
    assert torch.allclose(e.output, logits, atol=1e-5) and torch.equal(e.target, logits.argmax(1))
    assert e.heatmap.shape == (3, 32, 32) and e.method == "AttentionRollout"


def test_attention_rollout_needs_no_gradient():
    x = X.clone().requires_grad_(True)
    e = AttentionRollout(tiny_vit())(x, target=2)
    assert e.token_relevance.grad_fn is None and e.output.grad_fn is None
    assert e.target.tolist() == [2, 2, 2]


def test_gradient_rollout_matches_timm_reference_with_correct_pairing():
    model = tiny_vit(depth=3)
    _, _, attns, grads = timm_attention(model, X, target=1, grad=True)
    e = GradientRollout(model, discard_ratio=0.2)(X, target=1)
    fused = [(a * g).mean(1).clamp(min=0).numpy() for a, g in zip(attns, grads)]
    ref = ref_rollout(fused, 0.2)[:, 0, 1:].reshape(3, 4, 4)
    assert torch.allclose(e.token_relevance.double(), torch.as_tensor(ref), atol=1e-6)
    reversed_pairs = [(a * g).mean(1).clamp(min=0).numpy() for a, g in zip(attns, grads[::-1])]
    wrong = ref_rollout(reversed_pairs, 0.2)[:, 0, 1:].reshape(3, 4, 4)
    assert not np.allclose(e.token_relevance.double().numpy(), wrong, atol=1e-6)
    assert e.target.tolist() == [1, 1, 1]


@pytest.mark.parametrize("make", [
    lambda m: AttentionRollout(m, head_fusion="max", discard_ratio=0.5),
    lambda m: GradientRollout(m, discard_ratio=0.5),
])
def test_batch_equals_stacked_single_samples(make):
    explainer = make(tiny_vit(reg_tokens=2))
    whole = explainer(X, target=[0, 3, 4])
    singles = [explainer(X[i:i + 1], target=t) for i, t in enumerate([0, 3, 4])]
    assert torch.allclose(whole.token_relevance, torch.cat([s.token_relevance for s in singles]), atol=1e-6)
    assert torch.equal(whole.target, torch.tensor([0, 3, 4]))


def test_distilled_deit_reads_class_and_distillation_rows():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=5).eval()
    _, _, attns, _ = timm_attention(model, X)
    r = ref_rollout([fuse_np(a, "mean") for a in attns])
    # the eval-mode head averages the class- and the distillation-token heads: the map is the mean of rows 0 and 1
    ref = 0.5 * (r[:, 0, 2:] + r[:, 1, 2:])
    e = AttentionRollout(model)(X)
    assert torch.allclose(e.token_relevance.double(), torch.as_tensor(ref).reshape(3, 4, 4), atol=1e-6)


def test_dynamic_image_size_and_other_patch_size():
    model = tiny_vit(patch_size=4, dynamic_img_size=True)
    x = torch.randn(2, 3, 24, 20)
    for method in (AttentionRollout(model), GradientRollout(model)):
        e = method(x)
        assert e.token_relevance.shape == (2, 6, 5) and e.heatmap.shape == (2, 24, 20)
        assert torch.isfinite(e.token_relevance).all()


def test_clear_errors_and_model_untouched():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="vision transformer"):
        AttentionRollout(cnn.eval())
    model = tiny_vit()
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="sum")
    with pytest.raises(ValueError, match="discard_ratio"):
        GradientRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="out of range"):
        AttentionRollout(model)(X, target=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    GradientRollout(model)(X)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(b.attn.fused_attn for b in model.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_equals_cpu():
    from lrpkit.methods.attention import AttentionGradCAM, GenericAttention, RawAttention

    model = tiny_vit(reg_tokens=2)
    for cls, kw in [(AttentionRollout, dict(head_fusion="max", discard_ratio=0.5)), (GradientRollout, {}),
                    (RawAttention, {}), (AttentionGradCAM, {}), (GenericAttention, {})]:
        cpu = cls(model, **kw)(X, target=1).token_relevance
        gpu = cls(copy.deepcopy(model).cuda(), **kw)(X.cuda(), target=1)
        assert gpu.token_relevance.device.type == "cuda"
        assert torch.allclose(gpu.token_relevance.cpu(), cpu, atol=1e-4)
