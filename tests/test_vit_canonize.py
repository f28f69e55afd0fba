"""Canonization of timm VisionTransformer / VisionTransformerDistilled: same logits as the original model for every
supported option, a clear CanonizationError for every unsupported one, and the user's model left as it was."""

from functools import partial

import pytest
import timm
import torch
from timm.layers import HybridEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer
from torch import nn

import lrpkit
from lrpkit import CanonizationError
from lrpkit.layers import (ClassToken, LayerNormalize, PatchFlatten, PositionalEmbedding, Scale, SelectClassToken,
                           SelfAttention, SkipConnection, Sum, TokenMean)


SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def small_vit(cls=VisionTransformer, seed=0, **kw):
    """A small timm ViT in eval mode with every parameter perturbed (timm initialises biases to 0, LayerNorm to
    1/0 and the class token to ~1e-6: a forward-equality test on such a model would not see some mistakes)."""
    torch.manual_seed(seed)
    model = cls(**{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_logits(model, x, chain=None):
    chain = lrpkit.canonize(model) if chain is None else chain
    with torch.no_grad():
        expected, got = model(x), chain(x)
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    assert (got - expected).abs().max() <= 1e-5 * scale, ((got - expected).abs().max() / scale).item()
    return chain


def image(batch=2, size=(32, 32), seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *size)


CONFIGS = {
    "default": {},
    "no-class-token-avg": dict(class_token=False, global_pool="avg"),
    "reg-tokens": dict(reg_tokens=3),
    "reg-tokens-no-class-token": dict(reg_tokens=2, class_token=False, global_pool="avg"),
    "no_embed_class": dict(no_embed_class=True),
    "no_embed_class-reg": dict(no_embed_class=True, reg_tokens=2),
    "layer-scale": dict(init_values=0.3),
    "qk_norm": dict(qk_norm=True),
    "no-qkv-bias": dict(qkv_bias=False),
    "no-proj-bias": dict(proj_bias=False),
    "avg": dict(global_pool="avg"),
    "avg-no-fc_norm": dict(global_pool="avg", fc_norm=False),
    "avg-include-prefix": dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1),
    "token-fc_norm": dict(fc_norm=True),
    "pre_norm": dict(pre_norm=True),
    "no-final-norm": dict(final_norm=False),
    "no-final-norm-avg": dict(final_norm=False, global_pool="avg"),
    "no-pos-embed": dict(pos_embed="none"),
    "scale_mlp_norm": dict(scale_mlp_norm=True),
    "mlp_ratio-heads": dict(mlp_ratio=2.5, num_heads=4),
    "silu": dict(act_layer="silu"),
    "timm-gelu": dict(act_layer="gelu"),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    "quick_gelu": dict(act_layer="quick_gelu"),
    "headless": dict(num_classes=0),
    "dynamic": dict(dynamic_img_size=True),
    "everything": dict(reg_tokens=2, no_embed_class=True, init_values=0.3, qk_norm=True, qkv_bias=False,
                       pre_norm=True, global_pool="avg", fc_norm=True, dynamic_img_size=True),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_equality(config):
    assert_same_logits(small_vit(**CONFIGS[config]), image(2))


@pytest.mark.parametrize("patch, size", [(8, 32), (14, 28), (14, 32), (16, 32), (32, 64)])
def test_patch_sizes(patch, size):
    # (14, 32): the grid is 32 // 14 = 2 and the last 4 pixel rows/columns are not seen, as in timm
    model = small_vit(patch_size=patch, img_size=size)
    chain = assert_same_logits(model, image(2, (size, size)))
    assert chain[0].stride == (patch, patch)


@pytest.mark.parametrize("kw", [{}, dict(no_embed_class=True, reg_tokens=2), dict(class_token=False,
                                                                                     global_pool="avg")],
                         ids=["class", "no_embed_class-reg", "no-class-avg"])
def test_dynamic_img_size_other_and_non_square_inputs(kw):
    model = small_vit(dynamic_img_size=True, **kw)
    chain = lrpkit.canonize(model)
    for size in ((32, 32), (48, 48), (16, 40), (40, 24), (8, 8)):
        assert_same_logits(model, image(1, size), chain)


def test_fixed_img_size_refuses_other_sizes_clearly():
    chain = lrpkit.canonize(small_vit())
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        chain(image(1, (48, 32)))


# -- distilled -------------------------------------------------------------------------------------------------------

def test_distilled_eval_head_average():
    model = small_vit(VisionTransformerDistilled)
    chain = assert_same_logits(model, image(2))
    head = chain[len(chain) - 1]
    assert isinstance(head, Sum)
    # by hand: the two branches are head(x_cls)/2 and head_dist(x_dist)/2
    with torch.no_grad():
        feats = model.forward_features(image(2))
        halves = [branch(feats) for branch in head.branches]
        assert torch.allclose(halves[0], model.head(feats[:, 0]) / 2, atol=1e-6)
        assert torch.allclose(halves[1], model.head_dist(feats[:, 1]) / 2, atol=1e-6)


def test_distilled_training_mode_is_explained_in_eval_mode():
    # distilled_training=True and train(): timm returns (logits_cls, logits_dist) separately; the canonized model
    # (and LRP, with a warning) always computes the eval-mode average, and the user's flags stay as they were.
    model = small_vit(VisionTransformerDistilled)
    model.set_distilled_training(True)
    model.train()
    x = image(2)
    with torch.no_grad():
        cls_logits, dist_logits = model(x)  # training mode (no dropout in this model): the two heads apart
    chain = lrpkit.canonize(model)
    assert model.training and model.distilled_training
    with torch.no_grad():
        assert torch.allclose(chain(x), (cls_logits + dist_logits) / 2, atol=1e-6)
    with pytest.warns(UserWarning, match="training mode"):
        lrp = lrpkit.LRP(model)
    assert model.training
    assert torch.isfinite(lrp(x).relevance).all()
    assert_same_logits(model.eval(), x, chain)


def test_distilled_variants():
    for kw in (dict(dynamic_img_size=True), dict(num_classes=0), dict(qk_norm=True, init_values=0.2)):
        model = small_vit(VisionTransformerDistilled, **kw)
        assert_same_logits(model, image(2))
    # timm's distilled model ignores reg_token in its forward pass (and its pos_embed has 2 prefix entries): so
    # does the canonization
    model = small_vit(VisionTransformerDistilled, reg_tokens=2)
    chain = assert_same_logits(model, image(2))
    assert next(m for m in chain if isinstance(m, ClassToken)).kinds == ["class", "distillation"]


# -- structure ----------------------------------------------------------------------------------------------------

def test_chain_structure_and_names():
    chain = lrpkit.canonize(small_vit(init_values=0.3, reg_tokens=1))
    types = [type(m) for m in chain]
    assert types == [nn.Conv2d, PositionalEmbedding, PatchFlatten, ClassToken] + [SkipConnection] * 4 + \
        [LayerNormalize, Scale, SelectClassToken, nn.Linear]
    assert chain.names[:4] == ["patch_embed.proj", "pos_embed", "patch_embed", "cls_token"]
    assert chain.names[4:8] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    attn, mlp = chain[4].inner, chain[5].inner
    assert [type(m) for m in attn] == [LayerNormalize, Scale, SelfAttention, Scale]
    assert [type(m) for m in mlp] == [LayerNormalize, Scale, nn.Linear, nn.GELU, nn.Linear, Scale]
    assert mlp.names == ["blocks.0.norm2", "blocks.0.norm2", "blocks.0.mlp.fc1", "blocks.0.mlp.act",
                         "blocks.0.mlp.fc2", "blocks.0.ls2"]
    assert chain[3].kinds == ["class", "register"]
    assert all(not p.requires_grad for p in chain.parameters())
    # every layer is in eval mode (the top-level Chain's own flag is set by lrpkit/canonize/core.py)
    assert not any(m.training for layer in chain for m in layer.modules())


def test_chain_structure_avg_pool_and_pre_norm():
    chain = lrpkit.canonize(small_vit(global_pool="avg", pre_norm=True, reg_tokens=2))
    types = [type(m) for m in chain]
    assert types == [nn.Conv2d, PositionalEmbedding, PatchFlatten, ClassToken, LayerNormalize, Scale] + \
        [SkipConnection] * 4 + [TokenMean, LayerNormalize, Scale, nn.Linear]  # final norm moved to fc_norm
    assert chain[10].start == 3  # class + 2 registers are not averaged
    assert chain[0].bias is None  # pre_norm: timm's patch projection has no bias


def test_sequential_head_is_flattened():
    model = small_vit()
    model.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5)).eval()
    chain = assert_same_logits(model, image(2))
    assert [type(m) for m in list(chain)[-3:]] == [nn.Linear, nn.ReLU, nn.Linear]
    assert chain.names[-3:] == ["head.0", "head.1", "head.3"]


# -- unsupported -----------------------------------------------------------------------------------------------------

class _OwnHead(VisionTransformer):
    def forward_head(self, x, pre_logits=False):
        return super().forward_head(x, pre_logits) * 2


class _OnlyAMethod(VisionTransformer):
    def describe(self):
        return "a subclass that does not change the forward pass"


UNSUPPORTED = {
    "prr": (dict(global_pool="prr"), "global_pool='prr'"),
    "max": (dict(global_pool="max"), "global_pool='max'"),
    "avgmax": (dict(global_pool="avgmax"), "global_pool='avgmax'"),
    "no-pool": (dict(global_pool=""), "global_pool=''"),
    "ResPostBlock": (dict(block_fn=ResPostBlock), "ResPostBlock"),
    "ParallelScalingBlock": (dict(block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
    "scale_attn_norm": (dict(scale_attn_norm=True), "scale_attn_norm"),
    "embed_norm_layer": (dict(embed_norm_layer="layernorm"), "norm inside the patch embedding"),
    "dynamic_img_pad": (dict(dynamic_img_pad=True), "dynamic_img_pad"),
    "rmsnorm": (dict(norm_layer="rmsnorm"), "RmsNorm"),
    "diff-attention": (dict(attn_layer="diff"), "DiffAttention"),
    "swiglu": (dict(mlp_layer=timm.layers.SwiGLU), "SwiGLU"),
    "hybrid-embed": (dict(embed_layer=partial(HybridEmbed, backbone=nn.Conv2d(3, 8, 2, stride=2)), patch_size=2),
                     "HybridEmbed"),
}


@pytest.mark.parametrize("config", UNSUPPORTED)
def test_unsupported_options_are_clear_errors(config):
    kw, message = UNSUPPORTED[config]
    model = VisionTransformer(**{**SMALL, **kw}).eval()
    with pytest.raises(CanonizationError, match=message):
        lrpkit.canonize(model)
    with pytest.raises(CanonizationError):
        lrpkit.analyze(model, image(1))


def test_subclasses_overriding_the_forward_pass_are_refused():
    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(_OwnHead(**SMALL))
    model = _OnlyAMethod(**SMALL).eval()
    assert_same_logits(model, image(1))


def test_distilled_model_with_an_unsupported_head():
    model = small_vit(VisionTransformerDistilled)
    model.head_dist = nn.Sequential(nn.Linear(32, 5))
    with pytest.raises(CanonizationError, match="head_dist"):
        lrpkit.canonize(model)


# -- the user's model is untouched -----------------------------------------------------------------------------------

def test_user_model_is_untouched():
    model = small_vit(init_values=0.3, reg_tokens=1)
    model.train()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    calls = []
    handle = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: calls.append(1))
    pre = model.blocks[1].attn.register_forward_pre_hook(lambda m, i: calls.append(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="training mode"):
        lrp = lrpkit.LRP(model, lrpkit.presets.AttnLRP())
    lrp(image(2))
    lrpkit.canonize(model)(image(1))
    assert calls == []  # the copies carry no hooks
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the hooks are still there, and the chain shares no storage with the model
    model.eval()
    with torch.no_grad():
        model(image(1))
    assert calls == [1, 2]
    handle.remove()
    pre.remove()
    with torch.no_grad():
        lrp.chain[0].weight.add_(1.0)
    assert torch.equal(model.patch_embed.proj.weight, before["patch_embed.proj.weight"])


# -- named timm models (random weights; built once each) -------------------------------------------------------------

NAMED = {
    # name: create_model kwargs (smaller img_size where the architecture allows it: the pos_embed is built for it)
    "vit_tiny_patch16_224": {},
    "vit_small_patch16_224": dict(img_size=64),
    "vit_base_patch16_224": {},
    "deit_tiny_patch16_224": dict(img_size=64),
    "deit_small_patch16_224": dict(img_size=48),
    "deit_tiny_distilled_patch16_224": dict(img_size=64),
    "deit_small_distilled_patch16_224": dict(img_size=48),
    "deit3_small_patch16_224": dict(img_size=64),
    "vit_small_patch14_reg4_dinov2": dict(img_size=56),
}


@pytest.fixture(scope="module")
def named_models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = timm.create_model(name, pretrained=False, **NAMED[name]).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMED)
def test_named_models(name, named_models):
    model = named_models(name)
    size = model.patch_embed.img_size
    chain = assert_same_logits(model, image(1, size))
    kinds = next((m.kinds for m in chain if isinstance(m, ClassToken)), [])
    expected = {"deit_tiny_distilled_patch16_224": ["class", "distillation"],
                "deit_small_distilled_patch16_224": ["class", "distillation"],
                "vit_small_patch14_reg4_dinov2": ["class"] + ["register"] * 4}.get(name, ["class"])
    assert kinds == expected
    if name == "vit_base_patch16_224":
        assert size == (224, 224) and sum(isinstance(m, SkipConnection) for m in chain) == 24
