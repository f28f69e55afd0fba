"""Canonization of plain and convolutional networks: a new, flat, eval-mode Chain with BatchNorm fused, the same
function as the original, the user's model untouched, and clear errors."""

import pytest
import torch
import torchvision
from torch import nn

import lrpkit
from lrpkit.layers import Chain, SkipConnection, Sum
from helpers import relative


# --------------------------------------------------------------------------------------------------------------
# the user's model is never modified
# --------------------------------------------------------------------------------------------------------------

def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_user_model_untouched(randomize_bn):
    model = randomize_bn(_small_cnn())  # in training mode
    model[0].weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model[3][0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}

    chain = lrpkit.canonize(model)
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="training mode"):
        expl = lrpkit.LRP(model)(x)  # canonizes and analyses
    chain(x)

    assert calls == []  # the copy carries no hooks
    assert len(model[0]._forward_hooks) == 1 and len(model[3][0]._forward_pre_hooks) == 1
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    for k, v in model.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, state[k]), k
    assert not chain.training and not any(m.training for m in chain.modules())
    assert not any(p.requires_grad for p in chain.parameters())
    assert not any(p is q for p in chain.parameters() for q in model.parameters())
    # the canonized chain computes the eval-mode model
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(chain(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(expl.output, model(x), rtol=1e-5, atol=1e-6)
    assert calls == ["fwd", "pre", "fwd", "pre"]  # the user's hooks still work on the user's model


def test_canonize_returns_a_new_module_each_time():
    model = _small_cnn().eval()
    a, b = lrpkit.canonize(model), lrpkit.canonize(model)
    assert isinstance(a, Chain) and a is not b and a[0] is not b[0]
    c = lrpkit.canonize(a)  # a Chain is copied, not returned
    assert c is not a and c[0] is not a[0]


# --------------------------------------------------------------------------------------------------------------
# flattening, dropping, BatchNorm fusion
# --------------------------------------------------------------------------------------------------------------

def test_flattens_nested_sequentials_and_drops_dropout_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Dropout(0.3), nn.Linear(5, 5))),
                          nn.Identity(), nn.AlphaDropout(0.1), nn.Linear(5, 2)).eval()
    chain = lrpkit.canonize(model)
    assert [type(m) for m in chain] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert chain.names == ["0", "1.0", "1.1.1", "4"]
    x = torch.rand(3, 4)
    torch.testing.assert_close(chain(x), model(x))


def test_batchnorm_fusion_by_hand():
    # Linear w = 2, b = 1; BatchNorm mean 1, var 3, eps 1, γ = 4, β = 0.5: factor γ/√(var + eps) = 4/2 = 2
    # w' = 2·2 = 4, b' = (1 − 1)·2 + 0.5 = 0.5
    linear, bn = nn.Linear(1, 1), nn.BatchNorm1d(1, eps=1.0)
    with torch.no_grad():
        linear.weight.fill_(2.0)
        linear.bias.fill_(1.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(4.0)
        bn.bias.fill_(0.5)
    chain = lrpkit.canonize(nn.Sequential(linear, bn).eval())
    assert len(chain) == 1
    assert chain[0].weight.item() == 4.0 and chain[0].bias.item() == 0.5


def _bn_case(kind, bias, affine):
    conv = {"linear": (nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5, eps=0.1, affine=affine), (4, 6)),
            "conv1d": (nn.Conv1d(3, 5, 3, bias=bias), nn.BatchNorm1d(5, eps=0.1, affine=affine), (4, 3, 9)),
            "conv2d": (nn.Conv2d(3, 5, 3, bias=bias), nn.BatchNorm2d(5, eps=0.1, affine=affine), (4, 3, 7, 7)),
            "conv3d": (nn.Conv3d(2, 5, 3, bias=bias), nn.BatchNorm3d(5, eps=0.1, affine=affine), (2, 2, 5, 5, 5))}
    return conv[kind]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
def test_batchnorm_fusion(kind, bias, affine):
    # eps = 0.1 against running variances in [0.05, 0.2]: fusing with the default eps (1e-5) would be far off
    torch.manual_seed(0)
    layer, bn, shape = _bn_case(kind, bias, affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.05, 0.2)
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    model = nn.Sequential(layer, bn).eval()
    chain = lrpkit.canonize(model)
    assert len(chain) == 1 and type(chain[0]) is type(layer)
    x = torch.randn(shape)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5


def test_batchnorm_without_a_linear_before_it_is_kept(randomize_bn):
    # BN at the input and BN after a ReLU cannot be fused: they stay layers of their own (and get a rule)
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),
                                       nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(8, 2))).eval()
    chain = lrpkit.canonize(model)
    assert [type(m) for m in chain] == [nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.Flatten,
                                        nn.Linear]
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-5
    expl = lrpkit.analyze(model, x)
    assert torch.isfinite(expl.relevance).all()


def _linear_bn1d_on_tokens(tokens, features):
    # Linear on (B, L, 3) tokens, then BatchNorm1d(L): it normalises dim 1 (the L tokens), not the features
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, features), nn.BatchNorm1d(tokens), nn.Flatten(),
                          nn.Linear(tokens * features, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, tokens, 3)


def test_batchnorm1d_over_tokens_after_a_linear_is_kept():
    # BatchNorm1d(5) after Linear(3, 4): 5 features ≠ 4 outputs, so it cannot be folded into the Linear
    model, x = _linear_bn1d_on_tokens(5, 4)
    chain = lrpkit.canonize(model)
    assert [type(m) for m in chain] == [nn.Linear, nn.BatchNorm1d, nn.Flatten, nn.Linear]
    with torch.no_grad():
        assert relative(chain(x), model(x)) < 1e-6


def test_batchnorm1d_fused_into_a_linear_refuses_token_input():
    # BatchNorm1d(4) after Linear(3, 4) is fused (exact on (B, 4) features), but on (B, 4, 4) tokens it normalised
    # dim 1: the fused Linear refuses such input instead of computing something else than the model
    model, x = _linear_bn1d_on_tokens(4, 4)
    chain = lrpkit.canonize(model)
    assert [type(m) for m in chain] == [nn.Linear, nn.Flatten, nn.Linear]
    with pytest.raises(lrpkit.CanonizationError, match=r"BatchNorm1d '1'.*\(2, 4, 3\).*normalises dim 1"):
        chain(x)
    with pytest.raises(lrpkit.CanonizationError, match="exact for"):
        lrpkit.analyze(model, x)
    # on (B, C) input the same fusion is exact, and LRP runs through the fused layer
    flat = nn.Sequential(model[0], model[1]).eval()
    x2 = torch.randn(3, 3)
    with torch.no_grad():
        assert relative(lrpkit.canonize(flat)(x2), flat(x2)) < 1e-6
    assert lrpkit.analyze(flat, x2, target=0).relevance.shape == (3, 3)


def test_batchnorm_without_running_statistics_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(lrpkit.CanonizationError, match="track_running_stats=False"):
        lrpkit.canonize(model)


# --------------------------------------------------------------------------------------------------------------
# torchvision VGG and ResNet
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet50"])
def test_torchvision_forward_equality(name, randomize_bn):
    torch.manual_seed(0)
    kwargs = {"init_weights": False} if name.startswith("vgg") else {}  # default init: faster, still random
    model = randomize_bn(getattr(torchvision.models, name)(num_classes=10, **kwargs)).eval()
    chain = lrpkit.canonize(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1e-6
        assert relative(chain(x), expected) < 1e-5
    leaves = [m for m in chain.modules() if not isinstance(m, (Chain, SkipConnection, Sum, nn.ModuleList))]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in leaves)
    if name.startswith("resnet"):
        skips = [m for m in chain if isinstance(m, SkipConnection)]
        sums = [m for m in chain if isinstance(m, Sum)]
        # resnet18: 8 BasicBlocks, downsampling in layer2.0, layer3.0, layer4.0;
        # resnet50: 16 Bottlenecks, downsampling in layer1.0 .. layer4.0
        assert (len(skips), len(sums)) == ((5, 3) if name == "resnet18" else (12, 4))
        assert all(len(s.branches) == 2 and len(s.branches[1]) == 1 for s in sums)  # shortcut: the fused 1x1 conv
        index = chain.names.index("layer1.0")
        assert isinstance(chain[index + 1], nn.ReLU)  # relu(f(x) + x) after the block


def test_resnet_block_names_and_inner_layers():
    model = torchvision.models.resnet18(num_classes=3).eval()
    chain = lrpkit.canonize(model)
    assert chain.names[:4] == ["conv1", "relu", "maxpool", "layer1.0"]
    block = chain[chain.names.index("layer2.0")]
    assert isinstance(block, Sum)
    assert block.branches[0].names == ["layer2.0.conv1", "layer2.0.relu", "layer2.0.conv2"]
    assert block.branches[1].names == ["layer2.0.downsample.0"]
    assert chain.names[-3:] == ["avgpool", "flatten", "fc"]


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------

class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Gate(nn.Module):
    def forward(self, x):
        return x.clamp(min=0)


def test_unsupported_layers_are_listed_with_path_and_type():
    model = nn.Sequential(nn.Linear(4, 4), Swish(), nn.Sequential(nn.Linear(4, 4), Gate()), nn.Linear(4, 2))
    with pytest.raises(lrpkit.CanonizationError) as err:
        lrpkit.canonize(model)
    msg = str(err.value)
    assert f"1: {__name__}.Swish" in msg and f"2.1: {__name__}.Gate" in msg
    assert "lrpkit.register_rule(" in msg
    assert "0:" not in msg and "3:" not in msg  # only the offending layers


@pytest.mark.parametrize("softmax", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1)])
def test_softmax_at_the_output(softmax):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), softmax).eval()
    with pytest.raises(lrpkit.CanonizationError, match="strip_softmax=True"):
        lrpkit.canonize(model)
    with pytest.raises(lrpkit.CanonizationError, match="strip_softmax=True"):
        lrpkit.analyze(model, torch.rand(1, 4))
    chain = lrpkit.canonize(model, strip_softmax=True)
    assert [type(m) for m in chain] == [nn.Linear, nn.ReLU, nn.Linear]
    x = torch.rand(2, 4)
    expl = lrpkit.analyze(model, x, strip_softmax=True)
    torch.testing.assert_close(expl.output, model[:3](x))


def test_canonize_needs_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lrpkit.canonize(lambda x: x)


def test_overridden_names_the_first_method_a_subclass_redefines():
    from lrpkit.canonize.core import overridden

    class Base(nn.Module):
        def forward(self, x):
            return x

        def forward_head(self, x):
            return x

    class Same(Base):
        pass

    class Other(Base):
        def forward_head(self, x):
            return 2 * x

    assert overridden(Same(), Base, ("forward", "forward_head")) is None
    assert overridden(Other(), Base, ("forward", "forward_head")) == "forward_head"
    assert overridden(Other(), Base) is None  # only forward is asked by default
