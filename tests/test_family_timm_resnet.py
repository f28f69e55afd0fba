"""The ``timm-resnet`` family (lrpkit/families/timm_resnet.py): timm's ResNet, its variants and options canonized
exactly, clear errors for what is not supported, LRP-ε → 0 equal to the reference of tests/reference_cnn.py, the
presets on grouped convolutions and gates, batch independence, the user's model untouched, edge inputs, the CLI.

Named models are built with random weights and randomised BatchNorm statistics; most with ``layers=[1, 1, 1, 1]``
(one block per stage: every option of the named model, a fraction of the time).
"""

import copy

import pytest
import timm
import torch

import lrpkit
from lrpkit import presets, rules
from lrpkit.canonize import CanonizationError
from lrpkit.families import family_of
from lrpkit.layers import Multiply
from helpers import assert_batch_independent, assert_finite, cnn_presets, edge_inputs, epsilon_everywhere
from reference_cnn import max_relative_error, reference_relevance

SMALL = dict(layers=[1, 1, 1, 1])

# name: (timm model name, create_model kwargs)
CONFIGS = {
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", SMALL),
    "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", SMALL),
    "resnet50d": ("resnet50d", SMALL),  # deep stem, avg-pool downsample
    "resnet26t": ("resnet26t", SMALL),  # deep tiered stem
    "resnet18d": ("resnet18d", SMALL),  # BasicBlock, deep stem, avg-pool downsample
    "seresnet50": ("seresnet50", SMALL),  # SE with timm's Sigmoid gate
    "seresnext26d_32x4d": ("seresnext26d_32x4d", SMALL),  # SE, grouped convolutions, deep stem
    "ecaresnet50d": ("ecaresnet50d", SMALL),  # ECA (Conv1d over the channel means)
    "ecaresnet26t": ("ecaresnet26t", SMALL),
    "ecaresnetlight": ("ecaresnetlight", SMALL),
    "ecam": ("resnet18", dict(SMALL, block_args=dict(attn_layer="ecam"))),  # ECA with its MLP
    "resnext50_32x4d": ("resnext50_32x4d", SMALL),
    "wide_resnet50_2": ("wide_resnet50_2", SMALL),
    "resnetaa50d": ("resnetaa50d", SMALL),  # anti-aliasing: AvgPool2d
    "resnetblur18": ("resnetblur18", SMALL),  # anti-aliasing: BlurPool2d (reflect-padded depthwise blur)
    "resnetrs50": ("resnetrs50", SMALL),  # replaced stem pool, SE
    "max-pool-head": ("resnet18", dict(SMALL, global_pool="max")),
    "headless": ("resnet18", dict(SMALL, num_classes=0)),
    "drop-path-drop-block": ("resnet50", dict(SMALL, drop_path_rate=0.2, drop_block_rate=0.2, drop_rate=0.3)),
    "silu": ("resnet18", dict(SMALL, act_layer="silu")),
}


def build(config, randomize_bn, dtype=torch.float32, seed=0):
    name, kwargs = CONFIGS[config]
    kwargs = dict(kwargs)
    kwargs.setdefault("num_classes", 10)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize_bn(model, seed + 1).to(dtype).eval()


def image(n=2, size=64, dtype=torch.float32, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- canonization -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_equals_the_timm_model(config, randomize_bn):
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = build(config, randomize_bn, dtype)
        chain = lrpkit.canonize(model)
        x = image(2, dtype=dtype)
        with torch.no_grad():
            expected, got = model(x), chain(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= rtol * expected.abs().max(), (config, dtype)
    assert family_of(model).name == "timm-resnet"


def test_the_chain_has_the_documented_structure(randomize_bn):
    chain = lrpkit.canonize(build("seresnext26d_32x4d", randomize_bn))
    kinds = [type(m).__name__ for m in chain]
    # deep stem (3 convs, 2 ReLUs), act1, maxpool, 4 blocks each followed by its ReLU, pool, flatten, fc
    assert kinds == (["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"] + ["Sum", "ReLU"] * 4
                     + ["AdaptiveAvgPool2d", "Flatten", "Linear"])
    block = chain[7]
    inner, shortcut = block.branches
    assert [type(m).__name__ for m in shortcut] == ["Conv2d"]  # first stage: stride 1, no avg pool
    assert [type(m).__name__ for m in chain[9].branches[1]] == ["AvgPool2d", "Conv2d"]  # avg-pool downsample
    assert isinstance(inner[len(inner) - 1], Multiply)
    se = inner[len(inner) - 1]
    assert len(se.signal) == 0
    assert [type(m).__name__ for m in se.gate] == ["AdaptiveAvgPool2d", "Conv2d", "ReLU", "Conv2d", "Sigmoid"]
    assert [type(m).__name__ for m in inner] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "Multiply"]
    assert inner[2].groups == 32  # grouped 3x3


def test_eca_gate_is_timm_conv1d_between_two_views(randomize_bn):
    chain = lrpkit.canonize(build("ecaresnet26t", randomize_bn))
    gate = next(m for m in chain.modules() if isinstance(m, Multiply)).gate
    assert [type(m).__name__ for m in gate] == ["AdaptiveAvgPool2d", "Flatten", "Unflatten", "Conv1d", "Sigmoid",
                                                "Flatten", "Unflatten"]


@pytest.mark.parametrize("name, kwargs, message", [
    ("resnet50_gn", SMALL, "GroupNorm"),
    ("skresnet18", SMALL, "SelectiveKernelBasic"),
    ("resnet18", dict(SMALL, global_pool="avgmax"), "global_pool='avgmax'"),
    ("resnet18", dict(SMALL, global_pool="catavgmax"), "global_pool='catavgmax'"),
    ("resnet18", dict(SMALL, block_args=dict(attn_layer="cbam")), "CbamModule"),
    ("resnet18", dict(SMALL, block_args=dict(attn_layer="ceca")), "CecaModule"),
    ("resnet18", dict(SMALL, block_args=dict(attn_layer="gc")), "GlobalContext"),
])
def test_unsupported_options_are_clear_errors(name, kwargs, message):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    with pytest.raises(CanonizationError, match=message):
        lrpkit.canonize(model)


def test_se_with_max_pool_squeeze_and_subclasses_are_refused():
    from timm.layers import SEModule
    from timm.models.resnet import ResNet

    model = timm.create_model("seresnet50", pretrained=False, num_classes=10, **SMALL).eval()
    model.layer1[0].se = SEModule(model.layer1[0].conv3.out_channels, add_maxpool=True)
    with pytest.raises(CanonizationError, match="add_maxpool"):
        lrpkit.canonize(model)

    class Mine(ResNet):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits) * 2

    from timm.models.resnet import BasicBlock
    with pytest.raises(CanonizationError, match="overrides forward_head"):
        lrpkit.canonize(Mine(BasicBlock, [1, 1, 1, 1], num_classes=10).eval())


def test_batchnorm_act_is_refused_not_fused_without_its_activation():
    from timm.layers import BatchNormAct2d

    model = timm.create_model("resnet18", pretrained=False, num_classes=10, **SMALL).eval()
    model.layer1[0].bn1 = BatchNormAct2d(model.layer1[0].bn1.num_features)
    with pytest.raises(CanonizationError, match="BatchNormAct2d"):
        lrpkit.canonize(model)


# -- the ε → 0 reference ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("composite", ["epsilon-everywhere", "CPLRP"])
@pytest.mark.parametrize("config", ["resnet18", "seresnext26d_32x4d", "ecaresnet26t", "ecam", "resnetblur18",
                                    "resnetaa50d", "max-pool-head", "silu"])
def test_lrp_epsilon_limit_is_gradient_times_input_of_the_detached_model(config, composite, randomize_bn):
    make = epsilon_everywhere if composite == "epsilon-everywhere" else (lambda e: presets.CPLRP(epsilon=e))
    model = build(config, randomize_bn, torch.float64)
    x = image(2, dtype=torch.float64)
    ref, target = reference_relevance(model, x)
    errors = {}
    for eps in (1e-16, 1e-10, 1e-8):
        e = lrpkit.LRP(model, make(eps))(x, normalize_output=False)
        assert torch.equal(e.target, target)
        errors[eps] = max_relative_error(e.relevance, ref)
    assert errors[1e-16] <= 1e-9, errors
    assert 10 < errors[1e-8] / errors[1e-10] < 1000, errors  # the deviation scales with ε


# -- presets, batches, the user's model, edge inputs -------------------------------------------------------------------

PRESETS = {**cnn_presets(-4.0, 4.0), "CPLRP": presets.CPLRP}


@pytest.fixture(scope="module")
def senext(randomize_bn):
    """SE + grouped convolutions + deep stem + avg-pool downsample, float32."""
    return build("seresnext26d_32x4d", randomize_bn)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_on_grouped_convolutions_and_gates(senext, preset):
    x = image(2)
    e = lrpkit.LRP(senext, PRESETS[preset]())(x)
    assert torch.isfinite(e.relevance).all()
    assert (e.relevance.flatten(1).abs().sum(1) > 0).all()
    # the SE gate is held constant (ProductRule gate mode) by every preset
    lrp = lrpkit.LRP(senext, PRESETS[preset]())
    gates = [s.rule for s in lrp.composite.assign(lrp.chain) if isinstance(s.layer, Multiply)]
    assert gates and all(isinstance(r, rules.ProductRule) and r.mode == "gate" for r in gates)


def test_default_composite_is_epsilon_plus_flat_and_conserves_through_the_gates(senext):
    lrp = lrpkit.LRP(senext)
    names = [type(s.rule).__name__ for s in lrp.composite.assign(lrp.chain)]
    assert names[0] == "FlatRule" and "MaxPoolRule" in names and "ZPlusRule" in names


def test_batch_equals_single_samples(senext):
    assert_batch_independent(lrpkit.LRP(senext, presets.EpsilonPlusFlat()), image(3), target=torch.tensor([1, 4, 7]))


def test_the_users_model_is_untouched(randomize_bn):
    model = build("seresnext26d_32x4d", randomize_bn).train()
    state = copy.deepcopy(model.state_dict())
    calls = []
    handle = model.layer1[0].se.register_forward_hook(lambda *a: calls.append(1))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.warns(UserWarning):  # explaining a model in training mode is announced
        lrpkit.LRP(model)(image(1))
    assert model.training and all(m.training for m in model.modules())
    assert calls == []  # the canonized copy has no hooks: the user's hook was never called
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    handle.remove()


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "EpsilonGammaBox", "CPLRP"])
def test_finite_for_zeros_constants_and_extremes(senext, preset):
    assert_finite(lrpkit.LRP(senext, PRESETS[preset]())(edge_inputs(image(1))))


# -- command line -----------------------------------------------------------------------------------------------------

def test_timm_prefix_names_timm_models_that_torchvision_has_too():
    from timm.models.resnet import ResNet
    from torchvision.models.resnet import ResNet as TorchvisionResNet

    from lrpkit.app import zoo

    timm_model, prep = zoo.load_model("timm:resnet18", num_classes=10)
    assert isinstance(timm_model, ResNet) and prep.size == (224, 224)
    assert isinstance(zoo.load_model("resnet18", num_classes=10)[0], TorchvisionResNet)  # unchanged
    assert isinstance(zoo.load_model("resnet18.a1_in1k", num_classes=10)[0], ResNet)  # a timm tag is timm's


def test_cli_explains_a_timm_resnet_with_local_weights(tmp_path, capsys):
    import csv

    from PIL import Image
    from safetensors.torch import save_file

    from lrpkit import cli
    from lrpkit.app import zoo

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(weights))
    png = tmp_path / "img.png"
    Image.fromarray((torch.rand(96, 128, 3) * 255).byte().numpy()).save(png)
    out = tmp_path / "out"
    code = cli.main(["explain", str(png), "--model", "timm:resnet18", "--weights", str(weights), "--method", "lrp",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" not in captured.err
    with Image.open(out / "lrp" / "img.png") as result:
        assert result.size == (224, 224)  # timm's data config for resnet18: resize, center-crop 224
    _, prep = zoo.load_model("timm:resnet18")
    with torch.no_grad():
        expected = source(prep.normalize(prep.load(png))[None])[0]
    with (out / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["predicted"]) == int(expected.argmax())  # timm's model with the weights from the file
    assert float(row["predicted_logit"]) == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-6)
