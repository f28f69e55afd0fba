"""Raw attention, attention GradCAM (Chefer et al. 2021 baselines) and generic attention explainability
(Chefer et al. 2021b): hand-made cases for the math, then the explainers against timm's own attention
probabilities and gradients read through hooks (non-fused attention on a copy of the model)."""

import copy

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from lrpkit.methods.attention import (AttentionGradCAM, GenericAttention, RawAttention, generic_relevance,
                                      gradcam_rows, raw_attention_rows)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()


def timm_attention(model, x, target=None):
    """Logits, target, A_b and ∂y_t/∂A_b from timm itself (hooks on attn_drop, which sees the softmax output)."""
    model = copy.deepcopy(model)
    store = []

    def hook(module, inp, out):
        out.retain_grad()
        store.append(out)

    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(hook)
    logits = model(x)
    t = logits.argmax(1) if target is None else torch.as_tensor(target).expand(x.shape[0])
    logits.gather(1, t[:, None]).sum().backward()
    return logits.detach(), t, [a.detach() for a in store], [a.grad for a in store]


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------- the math
A3 = torch.tensor([[[[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]],
                    [[0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]]])  # (B=1, heads=2, N=3, N=3)
E0 = torch.tensor([1.0, 0.0, 0.0])  # read-out: the class token (token 0)


def test_raw_attention_rows_by_hand():
    # class rows [.5, .3, .2] and [.1, .1, .8] -> head mean [.3, .2, .5]
    assert torch.allclose(raw_attention_rows(A3, E0), torch.tensor([[0.3, 0.2, 0.5]]))
    # read-out averaging tokens 1 and 2: rows 1 and 2 of each head, then the head mean:
    # head 1: ([.2,.6,.2] + [.1,.1,.8])/2 = [.15,.35,.5]; head 2: ([.3,.3,.4] + [.5,.25,.25])/2 = [.4,.275,.325]
    w = torch.tensor([0.0, 0.5, 0.5])
    assert torch.allclose(raw_attention_rows(A3, w), torch.tensor([[0.275, 0.3125, 0.4125]]))


def test_gradcam_rows_by_hand():
    g = torch.zeros_like(A3)
    g[0, 0, 0] = torch.tensor([9.0, 1.0, 3.0])   # head 1: α = mean over the patch tokens 1, 2 = (1 + 3)/2 = 2
    g[0, 1, 0] = torch.tensor([0.0, -1.0, -3.0])  # head 2: α = -2 (the prefix column 0 is not averaged)
    # α·a: head 1 2·[.5,.3,.2] = [1, .6, .4]; head 2 -2·[.1,.1,.8] = [-.2,-.2,-1.6]; mean [.4, .2, -.6]; clamp
    assert torch.allclose(gradcam_rows(A3, g, E0, num_prefix=1), torch.tensor([[0.4, 0.2, 0.0]]))


def test_generic_relevance_by_hand_clamps_before_the_head_mean():
    a1 = torch.stack([torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.full((2, 2), 0.5)])[None]
    g1 = torch.stack([torch.ones(2, 2), torch.tensor([[-2.0, -1.0], [0.0, 2.0]])])[None]
    # head 1: A⊙G = [[.6,.4],[.3,.7]]; head 2: [[-1,-.5],[0,1]] -> clamp [[0,0],[0,1]]; mean [[.3,.2],[.15,.85]]
    # R = I + Ā·I = [[1.3, .2], [.15, 1.85]]  (mean-then-clamp would give row 0 = [1, 0])
    r = generic_relevance([a1], [g1])
    assert torch.allclose(r, torch.tensor([[[1.3, 0.2], [0.15, 1.85]]]))
    # a second block with one head: Ā_2 = [[0, .5], [0, 0]] -> R + Ā_2 R = row 0 + .5·row 1 = [1.375, 1.125]
    a2, g2 = torch.full((1, 1, 2, 2), 0.5), torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    r2 = generic_relevance([a1, a2], [g1, g2])
    assert torch.allclose(r2, torch.tensor([[[1.375, 1.125], [0.15, 1.85]]]))


# ------------------------------------------------------------------------------------------------ on models
@pytest.mark.parametrize("kw, prefix", [(dict(), 1), (dict(reg_tokens=3), 4)])
def test_methods_match_timm_reference(kw, prefix):
    model = tiny_vit(**kw)
    logits, _, attns, grads = timm_attention(model, X, target=2)

    raw = RawAttention(model)(X, target=2)
    ref = attns[-1][:, :, 0, prefix:].mean(1)
    assert torch.allclose(raw.token_relevance, ref.reshape(3, 4, 4), atol=1e-6)

    cam = AttentionGradCAM(model)(X, target=2)
    a, g = attns[-1][:, :, 0, prefix:], grads[-1][:, :, 0, prefix:]
    ref = (a * g.mean(-1, keepdim=True)).mean(1).clamp(min=0)  # Chefer's generate_attn_gradcam, per sample
    assert torch.allclose(cam.token_relevance, ref.reshape(3, 4, 4), atol=1e-6)

    gen = GenericAttention(model)(X, target=2)
    r = torch.eye(attns[0].shape[-1]).repeat(3, 1, 1)
    for a, g in zip(attns, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    assert torch.allclose(gen.token_relevance, r[:, 0, prefix:].reshape(3, 4, 4), atol=1e-6)

    for e in (raw, cam, gen):
        assert torch.allclose(e.output, logits, atol=1e-5) and e.target.tolist() == [2, 2, 2]
        assert e.heatmap.shape == (3, 32, 32) and e.patch_relevance.shape == (3, 4, 4)


def test_gradient_methods_follow_the_target():
    model = tiny_vit()
    for method in (AttentionGradCAM(model), GenericAttention(model)):
        a, b = method(X, target=0), method(X, target=3)
        assert not torch.allclose(a.token_relevance, b.token_relevance)
    # raw attention does not depend on the target
    raw = RawAttention(model)
    assert torch.equal(raw(X, target=0).token_relevance, raw(X, target=3).token_relevance)


@pytest.mark.parametrize("cls", [RawAttention, AttentionGradCAM, GenericAttention])
def test_batch_equals_stacked_single_samples(cls):
    method = cls(tiny_vit(class_token=False, global_pool="avg"))
    whole = method(X, target=[1, 4, 0])
    singles = torch.cat([method(X[i:i + 1], target=t).token_relevance for i, t in enumerate([1, 4, 0])])
    assert torch.allclose(whole.token_relevance, singles, atol=1e-6)


def test_no_class_token_uses_the_mean_of_the_patch_rows():
    model = tiny_vit(class_token=False, global_pool="avg")
    _, _, attns, _ = timm_attention(model, X)
    ref = attns[-1].mean(1).mean(1)  # head mean, then the mean of all 16 (patch) rows
    assert torch.allclose(RawAttention(model)(X).token_relevance, ref.reshape(3, 4, 4), atol=1e-6)


def test_dynamic_image_size():
    model = tiny_vit(patch_size=4, dynamic_img_size=True, reg_tokens=2)
    x = torch.randn(2, 3, 16, 28)
    for cls in (RawAttention, AttentionGradCAM, GenericAttention):
        e = cls(model)(x)
        assert e.token_relevance.shape == (2, 4, 7) and torch.isfinite(e.token_relevance).all()


def test_clear_errors():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    for cls in (RawAttention, AttentionGradCAM, GenericAttention):
        with pytest.raises(TypeError, match="vision transformer"):
            cls(cnn.eval())
    method = GenericAttention(tiny_vit())
    with pytest.raises(ValueError, match="entries for a batch"):
        method(X, target=[1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        method(X.long())
