"""The ``torchvision-cnn`` family: torchvision's VGG and ResNet (BasicBlock and Bottleneck), canonized; default
composite EpsilonPlusFlat; no patch geometry.

VGG: ``features, avgpool, flatten, classifier``. ResNet: ``conv1, bn1, relu, maxpool, layer1..4, avgpool,
flatten, fc``; a block ``relu(f(x) + shortcut(x))`` becomes ``SkipConnection(f)`` (identity shortcut) or
``Sum(f, downsample)``, followed by the ReLU.
"""

from __future__ import annotations

from torch import nn

from ..layers import SkipConnection, Sum
from ..canonize.core import copy_layer, flatten, join, make_chain
from . import GENERIC, Family, Geometry, preset_composite, register_family


def _vgg(model, path):
    return (flatten(model.features, join(path, "features")) + flatten(model.avgpool, join(path, "avgpool"))
            + [(join(path, "flatten"), nn.Flatten())] + flatten(model.classifier, join(path, "classifier")))


def _resnet(model, path):
    out = []
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
        out += flatten(getattr(model, name), join(path, name))
    return out + [(join(path, "flatten"), nn.Flatten())] + flatten(model.fc, join(path, "fc"))


def _block(parts):
    def canonize_block(block, path):
        residual = []
        for i, part in enumerate(parts):
            residual += flatten(getattr(block, part), join(path, part))
            if i < len(parts) - 2 and part.startswith("bn"):
                residual.append((join(path, "relu"), copy_layer(block.relu)))
        inner = make_chain(residual)
        if block.downsample is None:
            merged = SkipConnection(inner)
        else:
            merged = Sum(inner, make_chain(flatten(block.downsample, join(path, "downsample"))))
        return [(path, merged), (join(path, "relu"), copy_layer(block.relu))]
    return canonize_block


try:
    from torchvision.models import resnet as _tv_resnet
    from torchvision.models import vgg as _tv_vgg
except ImportError:  # torchvision is optional for canonization
    pass
else:
    register_family(Family(
        "torchvision-cnn", (_tv_vgg.VGG, _tv_resnet.ResNet),
        {_tv_vgg.VGG: _vgg, _tv_resnet.ResNet: _resnet,
         _tv_resnet.BasicBlock: _block(("conv1", "bn1", "conv2", "bn2")),
         _tv_resnet.Bottleneck: _block(("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"))},
        composite=preset_composite("EpsilonPlusFlat"), geometry=lambda model, chain=None: Geometry(),
        methods=GENERIC.methods))
