"""Models by name: what ``lrpkit explain`` and ``lrpkit evaluate`` build from ``--model``, usable from Python too.

- :func:`load_model` builds a model by name (a timm model, a supported torchvision CNN, or the bundled demo models
  ``demo_vit`` / ``demo_cnn``) with random weights, then loads a local weight file when given one (safetensors, or
  a state dict read with ``torch.load(weights_only=True)``, so no pickled code runs), and gives it its
  :class:`~lrpkit.app.preprocess.Preprocess`. Nothing is downloaded.
- :func:`class_names` gives the class names of a model when they are known (demo classes, ImageNet).
- :func:`model_names_like` suggests known names for a misspelt one.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from .preprocess import Preprocess

__all__ = ["DEMO_MODELS", "TORCHVISION_MODELS", "load_model", "model_names_like", "class_names"]

#: The bundled demo models (:mod:`lrpkit.models`).
DEMO_MODELS = ("demo_vit", "demo_cnn")

#: The torchvision CNNs that :func:`lrpkit.canonize` supports.
TORCHVISION_MODELS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                      "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def model_names_like(name: str, n: int = 5) -> list[str]:
    """Up to ``n`` known model names close to ``name`` (for error messages)."""
    import timm

    known = list(DEMO_MODELS) + list(TORCHVISION_MODELS) + timm.list_models()
    return difflib.get_close_matches(name, known, n=n, cutoff=0.6)


def _classifier_key(model: nn.Module) -> str | None:
    """The state-dict key of the classifier's weight: timm's ``get_classifier()`` (the first head of a distilled
    model); for a headless timm model (``num_classes=0``: the head is an Identity, as in the SigLIP image towers)
    the key its pretrained config names, where a weight file with a head has it (``head.weight``); else the last
    ``nn.Linear`` in module order (torchvision: ``fc``, ``classifier.6``)."""
    head = None
    if callable(getattr(model, "get_classifier", None)):
        try:
            head = model.get_classifier()
        except Exception:  # a model whose get_classifier needs more: fall back to the last Linear
            head = None
        if isinstance(head, (tuple, list)):
            head = head[0] if head else None
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, nn.Identity) and isinstance(classifier, str):
        return f"{classifier}.weight"
    last = None
    for name, module in model.named_modules():
        if head is not None and module is head and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{name}.weight"
        if isinstance(module, nn.Linear):
            last = f"{name}.weight"
    return last


def _num_classes_in(weights: Path, model: nn.Module) -> int | None:
    """The number of classes of the classifier stored in a weight file: the first dimension of the tensor under
    ``model``'s classifier key (:func:`_classifier_key`), or None when the file has no such tensor."""
    from .models import _read_state_dict

    key = _classifier_key(model)
    state = _read_state_dict(weights)
    if key is None or key not in state or state[key].ndim == 0:
        return None
    return int(state[key].shape[0])


def load_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
               ) -> tuple[nn.Module, Preprocess]:
    """Build the model called ``name`` in eval mode and its :class:`Preprocess`.

    ``name`` is ``demo_vit`` / ``demo_cnn`` (trained weights shipped with lrpkit), a torchvision CNN in
    :data:`TORCHVISION_MODELS`, or any timm model name (``timm.list_models()``, a pretrained tag such as
    ``vit_base_patch16_224.augreg_in21k`` selects that tag's preprocessing). ``timm:NAME`` is always timm's model,
    for the names torchvision has too (``timm:resnet50`` is timm's ResNet-50 with timm's data config, ``resnet50``
    torchvision's). Without ``weights`` the timm and
    torchvision models have random weights (from torch's global random state; nothing is downloaded).
    ``weights`` is a local file loaded with :func:`lrpkit.models.load_weights` (strict: names and shapes must fit;
    safetensors, or a state dict read with ``torch.load(weights_only=True)``, so no pickled code runs).
    ``num_classes`` defaults to the size of the classifier in the weight file (the tensor under the model's
    classifier key), else to the architecture's default; the demo models have their fixed 6 classes.
    """
    from . import data, models

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            what = "is a folder, not a file" if weights.is_dir() else "not found"
            raise FileNotFoundError(f"weights file {what}: {weights}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    name, timm_only = (name[len("timm:"):], True) if name.startswith("timm:") else (name, False)
    if name in DEMO_MODELS and not timm_only:
        fixed = len(data.CLASS_NAMES)
        if num_classes is not None and num_classes != fixed:
            raise ValueError(f"{name} has {fixed} classes ({', '.join(data.CLASS_NAMES)}); it cannot be built with "
                             f"num_classes={num_classes}")
        model = models.load_demo_vit() if name == "demo_vit" else models.load_demo_cnn()
        prep = Preprocess(size=(64, 64), resize=64, mean=data.MEAN, std=data.STD, interpolation="bilinear")
    else:
        if name in TORCHVISION_MODELS and not timm_only:
            import torchvision

            def build(**kwargs):
                return torchvision.models.get_model(name, weights=None, **kwargs)

            prep = Preprocess(size=(224, 224), resize=256, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                              interpolation="bilinear")
        else:
            import timm

            if not timm.is_model(name):
                like = model_names_like(name)
                hint = f"; did you mean {', '.join(like)}?" if like else ""
                raise ValueError(f"unknown model name {name!r}: not a bundled demo model ({', '.join(DEMO_MODELS)}), "
                                 f"a supported torchvision CNN or a timm model{hint} (list timm's with "
                                 f"timm.list_models())")

            def build(**kwargs):
                return timm.create_model(name, pretrained=False, **kwargs)

            prep = None
        model = build() if num_classes is None else build(num_classes=num_classes)
        if num_classes is None and weights is not None:
            found = _num_classes_in(weights, model)
            own = model.state_dict().get(_classifier_key(model))  # None for a headless model
            if found is not None and (own is None or found != own.shape[0]):
                model = build(num_classes=found)
        if prep is None:
            prep = Preprocess.from_timm(model)
    if weights is not None:
        models.load_weights(model, weights)
    return model.eval(), prep


def class_names(name: str, model: nn.Module) -> list[str] | None:
    """Names of the classes of the model called ``name``: :data:`lrpkit.data.CLASS_NAMES` for the demo models,
    the ImageNet class descriptions shipped with timm for a classifier with 1000 (ImageNet-1k) or another ImageNet
    subset's number of outputs, else None (the command line then takes names from ``--labels``)."""
    from . import data

    if name in DEMO_MODELS:
        return list(data.CLASS_NAMES)
    key = _classifier_key(model)
    state = model.state_dict()
    if key is None or key not in state:  # no classifier (a headless model: its output is an embedding)
        return None
    n = int(state[key].shape[0])
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset({"num_classes": n})
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(n)]
    except Exception:  # an older timm without the bundled label files
        return None
