"""ViT-CX (Xie et al. 2023): the steps on hand-made maps, the feature layer against timm's own activations, the
masked passes recomputed independently, and a model whose output depends on one patch only."""

import copy

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from torch import nn

from lrpkit.layers import (Chain, ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Scale,
                           SelectClassToken, SelfAttention, SkipConnection)
from lrpkit.methods.vitcx import (ViTCX, causal_scores, cluster_masks, constant_maps, cosine_distances, normalize_maps,
                                  vitcx_saliency)
from helpers import tiny_vit


def timm_output(model, module_path, x):
    """The output of ``module_path`` in (a copy of) the timm model, read with a forward hook."""
    model = copy.deepcopy(model)
    box = []
    model.get_submodule(module_path).register_forward_hook(lambda m, i, o: box.append(o.detach()))
    with torch.no_grad():
        model(x)
    return box[0]


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------- the steps
def test_normalize_maps_by_hand():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]])
    # (m - 1) / (9 - 1) = [[0, .25], [.5, 1]]; the constant map has no range -> zeros
    assert torch.equal(normalize_maps(maps), torch.tensor([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))


def test_constant_maps_by_hand():
    ulp = torch.finfo(torch.float32).eps  # the spacing of float32 numbers in [1, 2)
    maps = torch.tensor([[0.3, 0.3, 0.3, 0.3],            # constant, not zero
                         [0.0, 0.0, 0.0, 0.0],            # all zero
                         [1.0, 1.0 + ulp, 1.0, 1.0],      # one ulp of spread: 1.2e-7 <= 4·eps·(1 + eps)
                         [1.0, 1.0 + 8 * ulp, 1.0, 1.0],  # eight ulps: 9.5e-7 > 4.8e-7
                         [1e-9, 2e-9, 1e-9, 1e-9],        # tiny values but a real pattern: relative spread 1/2
                         [-5.0, -5.0, -5.0, -5.0]]).view(6, 2, 2)
    assert constant_maps(maps).tolist() == [True, True, True, False, False, True]


def test_cosine_distances_equal_scipy_pdist():
    flat = torch.rand(7, 50, generator=torch.Generator().manual_seed(0))
    assert np.allclose(cosine_distances(flat), pdist(flat.double().numpy(), metric="cosine"), atol=1e-6)


def _as_set(masks):
    return sorted(tuple(round(v, 6) for v in m.flatten().tolist()) for m in masks)


def test_cluster_masks_by_hand():
    m1, m2, m3 = [1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]
    maps = torch.tensor([m1, m2, m3, [0.0] * 4]).view(4, 2, 2)  # the last map is all zero: no information
    # cos(m1, m2) = 1/√1.01 = 0.995037 -> distance 0.004963; m3 is orthogonal to both -> distance 1
    # t = 0.1: {m1, m2} and {m3}; m1 + m2 = [2, .1, 0, 0] -> normalised [1, .05, 0, 0]
    masks, labels = cluster_masks(maps, 0.1)
    assert _as_set(masks) == _as_set(torch.tensor([[1.0, 0.05, 0, 0], m3]))
    assert labels[0] == labels[1] != labels[2] and labels[3] == 0
    # t = 0.001 < 0.004963: three clusters, the maps themselves
    assert _as_set(cluster_masks(maps, 0.001)[0]) == _as_set(torch.tensor([m1, m2, m3]))
    # t = 1: one cluster; [2, .1, 1, 1] -> (v - .1)/1.9 = [1, 0, 9/19, 9/19]
    masks, _ = cluster_masks(maps, 1.0)
    assert torch.allclose(masks.flatten(1), torch.tensor([[1.0, 0.0, 9 / 19, 9 / 19]]))
    assert cluster_masks(torch.zeros(3, 2, 2), 0.1)[0].shape == (0, 2, 2)


def test_causal_scores_and_saliency_by_hand():
    # s = p(x̃) - p(x̂) + p(x) = [.9 - .8 + .5, .4 - .6 + .5] = [.6, .3]
    assert torch.allclose(causal_scores(torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.6]), 0.5),
                          torch.tensor([0.6, 0.3]))
    masks = torch.tensor([[[1.0, 0.0, 0.0]], [[0.5, 1.0, 0.0]]])  # K = 2 masks on a 1x3 image
    s = torch.tensor([0.8, 0.2])
    # pixel 0: (1/2)(.8·1 + .2·.5)/(1 + .5) = .3; pixel 1: (1/2)(.2·1)/1 = .1; pixel 2: no mask covers it -> 0
    assert torch.allclose(vitcx_saliency(s, masks), torch.tensor([[0.3, 0.1, 0.0]]))


# ------------------------------------------------------------------------------------------- feature layer
@pytest.mark.parametrize("kw, prefix", [(dict(), 1), (dict(reg_tokens=2), 3), (dict(class_token=False,
                                                                                     global_pool="avg"), 0)])
def test_default_feature_layer_is_the_last_blocks_first_norm(kw, prefix):
    model = tiny_vit(**kw)
    tokens = timm_output(model, "blocks.1.norm1", X)  # (B, N, D)
    want = tokens[:, prefix:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)  # token P + 4h + w -> map (h, w)
    for layer in (None, "blocks.1.norm1", model.blocks[1].norm1):
        logits, grid = ViTCX(model, layer=layer, progress=False).features(X)
        assert torch.allclose(grid, want, atol=1e-5)
        assert torch.allclose(logits, model(X), atol=1e-5)


def test_other_feature_layers():
    model = tiny_vit()
    # a block's name: the residual stream after the block
    _, grid = ViTCX(model, layer="blocks.0", progress=False).features(X)
    assert torch.allclose(grid, timm_output(model, "blocks.0", X)[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2),
                          atol=1e-5)
    # an int: a top-level layer of the chain; 0 is the patch projection, already a (B, D, h, w) grid
    _, grid = ViTCX(model, layer=0, progress=False).features(X)
    assert torch.allclose(grid, timm_output(model, "patch_embed.proj", X), atol=1e-5)
    with pytest.raises(ValueError, match="no layer named"):
        ViTCX(model, layer="blocks.7.norm1")
    with pytest.raises(ValueError, match="neither part"):
        ViTCX(model, layer=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="before the pooling"):
        ViTCX(model, layer="pool", progress=False)(X)


# ----------------------------------------------------------------------------------------------- the method
def test_masked_passes_recomputed_independently():
    # seed=3: ε_i is the i-th draw randn(3, 32, 32)·σ of a generator seeded with 3 (reseeded for each sample)
    model = tiny_vit(reg_tokens=1)
    e = ViTCX(model, seed=3, batch_size=5, keep_masks=True, progress=False)(X, target=[1, 4])
    with torch.no_grad():
        p_x = torch.softmax(model(X), -1)
        for b, t in enumerate([1, 4]):
            masks = e.extras["masks"][b]
            k = masks.shape[0]
            assert e.extras["num_masks"][b] == k > 1
            gen = torch.Generator().manual_seed(3)
            eps = torch.stack([torch.randn(3, 32, 32, generator=gen) * 0.1 for _ in range(k)])
            m = masks[:, None]
            kept = X[b] * m + eps * (1 - m)          # x̃_i = x ⊙ M_i + ε_i ⊙ (1 − M_i)
            noisy = X[b] + eps * (1 - m)             # x̂_i = x + ε_i ⊙ (1 − M_i)
            s = (torch.softmax(model(kept), -1)[:, t] - torch.softmax(model(noisy), -1)[:, t] + p_x[b, t])
            assert torch.allclose(e.extras["scores"][b], s, atol=1e-5)
            sal = (s[:, None, None] * masks).sum(0) / k / masks.sum(0)
            assert torch.allclose(e.relevance[b, 0], sal, atol=1e-5)
    assert e.relevance.shape == (2, 1, 32, 32) and e.heatmap.shape == (2, 32, 32)
    assert e.target.tolist() == [1, 4] and e.patch_relevance.shape == (2, 4, 4)
    assert e.extras["masked_images"] == 2 * sum(e.extras["num_masks"]) and e.extras["images_per_second"] > 0


def test_noise_free_scores_are_the_masked_image_probabilities():
    # noise_std = 0: x̃_i = x ⊙ M_i and x̂_i = x, so s_i = p_c(x ⊙ M_i)
    model = tiny_vit()
    e = ViTCX(model, noise_std=0.0, keep_masks=True, progress=False)(X[:1])
    masks = e.extras["masks"][0]
    with torch.no_grad():
        p = torch.softmax(model(X[:1] * masks[:, None]), -1)[:, e.target[0]]
    assert torch.allclose(e.extras["scores"][0], p, atol=1e-5)


def test_deterministic_with_a_seed_and_batch_equals_single_samples():
    method = ViTCX(tiny_vit(), seed=0, batch_size=8, progress=False)
    a, b = method(X), method(X)
    assert torch.equal(a.relevance, b.relevance)
    singles = torch.cat([method(X[i:i + 1], target=int(a.target[i])).relevance for i in range(2)])
    assert torch.allclose(a.relevance, singles, atol=1e-6)
    other = ViTCX(tiny_vit(), seed=1, batch_size=8, progress=False)(X)
    assert not torch.allclose(a.relevance, other.relevance)


def test_number_of_clusters_falls_as_the_threshold_rises():
    model = tiny_vit()
    counts = [ViTCX(model, distance_threshold=t, seed=0, progress=False)(X[:1]).extras["num_masks"][0]
              for t in (0.0, 0.05, 0.2, 1.0)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1] == 1  # nonnegative maps: cosine distances <= 1, so t = 1 merges everything


def region_vit(k=6):
    """A hand-built ViT whose output depends on patch k only (grid 4x4, patch 8, 17 channels):
    channels 0-15 of token n are 5·[c = n] (a positional embedding, conv weights 0), so after the norm the
    feature map of channel c is a bump on patch c and ViT-CX's masks are (smoothed) patches; channel 16 is the
    patch's mean pixel value. The attention branch adds 0 (proj = 0), the head reads token 1+k only:
    logits = ±4·mean(patch k)."""
    d = 17
    conv = nn.Conv2d(3, d, 8, stride=8)
    conv.weight.data.zero_()
    conv.bias.data.zero_()
    conv.weight.data[16] = 1.0 / 192
    pos = torch.zeros(1, d, 4, 4)
    pos[0, :16] = 5.0 * torch.eye(16).view(16, 4, 4)
    qkv, proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    qkv.weight.data = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(0)) * 0.2
    proj.weight.data.zero_()
    proj.bias.data.zero_()
    head = nn.Linear(d, 2)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.weight.data[0, 16], head.weight.data[1, 16] = 4.0, -4.0
    attn = Chain([LayerNormalize(), Scale(torch.ones(d), torch.zeros(d)), SelfAttention(qkv, proj, 1, d ** -0.5)])
    return Chain([conv, PositionalEmbedding(pos), PatchFlatten(), ClassToken(torch.zeros(1, 1, d), ["class"]),
                  SkipConnection(attn), SelectClassToken(1 + k), head]).eval()


def test_a_model_that_reads_one_patch_gets_its_highest_scores_there():
    # patch 6 = row 1, column 2 (pixels 8:16, 16:24) holds 1.0: p_0(x) = σ(8) ≈ .9997. A mask covering the patch
    # keeps it (s ≈ p_0 ≈ 1); a mask elsewhere replaces it by noise (s ≈ σ(0) = .5). The transposed patch (9)
    # and a shifted prefix (5 or 7) would both fail.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    x[:, :, 8:16, 16:24] = 1.0
    e = ViTCX(region_vit(6), seed=0, progress=False)(x, target=0)
    assert e.extras["num_masks"] == [17, 17]
    assert e.patch_relevance.flatten(1).argmax(1).tolist() == [6, 6]
    s = e.extras["scores"][0]
    assert s.max() > 0.99 and s.median() < 0.6


def test_constant_features_give_no_masks_and_a_zero_map():
    model = region_vit(6)
    model[0].weight.data.zero_()  # every token is 0 before the norm -> every feature map is constant
    model[1].embed.data.zero_()
    with pytest.warns(UserWarning, match="no informative feature map"):
        e = ViTCX(model, seed=0, progress=False)(X)
    assert e.extras["num_masks"] == [0, 0] and torch.equal(e.relevance, torch.zeros(2, 1, 32, 32))


def test_a_constant_non_zero_map_is_left_out_like_a_removed_channel():
    # LayerNorm weight 0 on channel 5 of the feature layer (blocks.1.norm1): that channel's map is its bias, 0.3, on
    # every patch. Upsampled bilinearly it is no longer exactly constant (float32 rounding, a ripple of 1-2 ulp),
    # and min-max normalisation would stretch the ripple to [0, 1]: a noise map that joins a cluster and changes
    # its mask by about 0.35. Left out, the result equals ViT-CX on the same model with channel 5 removed from the
    # features.
    c = 5
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].norm1.weight[c] = 0.0
        model.blocks[1].norm1.bias[c] = 0.3

    class WithoutChannel(ViTCX):
        def features(self, x):
            logits, grid = super().features(x)
            return logits, torch.cat([grid[:, :c], grid[:, c + 1:]], 1)

    method = ViTCX(model, seed=0, keep_masks=True, progress=False)
    _, grid = method.features(X)
    assert torch.equal(grid[:, c], torch.full((2, 4, 4), 0.3))  # constant and non-zero on the patch grid
    up = nn.functional.interpolate(grid[:, c:c + 1], size=(32, 32), mode="bilinear", align_corners=False)
    assert up.amax() > up.amin()  # the trap is real: the upsampled map is not exactly constant
    e = method(X)
    want = WithoutChannel(model, seed=0, keep_masks=True, progress=False)(X)
    assert e.extras["num_masks"] == want.extras["num_masks"]
    for b in range(2):
        err = (e.extras["masks"][b] - want.extras["masks"][b]).abs().max()
        assert err < 1e-6, f"sample {b}: masks differ by {err:.3g} from those without the constant channel"
    assert torch.allclose(e.relevance, want.relevance, atol=1e-7, rtol=0)


def test_progress_bar_can_be_turned_off(capsys):
    model = tiny_vit()
    ViTCX(model, seed=0, progress=False)(X[:1])
    assert "ViT-CX" not in capsys.readouterr().err
    ViTCX(model, seed=0, progress=True)(X[:1])
    assert "ViT-CX" in capsys.readouterr().err


def test_clear_errors():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="vision transformer"):
        ViTCX(cnn.eval())
    model = tiny_vit()
    for kw, match in [(dict(distance_threshold=-1), "distance_threshold"), (dict(noise_std=-0.1), "noise_std"),
                      (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            ViTCX(model, **kw)
    with pytest.raises(TypeError, match="seed"):
        ViTCX(model, seed=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    model = tiny_vit().cuda()
    method = ViTCX(model, seed=0, progress=False)
    a, b = method(X.cuda()), method(X.cuda())
    assert a.relevance.device.type == "cuda" and torch.equal(a.relevance, b.relevance)
    assert torch.isfinite(a.relevance).all() and a.extras["images_per_second"] > 0
