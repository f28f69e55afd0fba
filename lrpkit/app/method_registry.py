"""Every explainer of the library by a short command-line name: what ``lrpkit explain --method`` and
``lrpkit evaluate --method`` take, usable from Python too.

:data:`METHODS` maps each name to its description and factory; :func:`make_method` builds the explainer for a
model and its :class:`~lrpkit.app.preprocess.Preprocess` (from :func:`lrpkit.app.zoo.load_model`).
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import nn

from .. import methods, presets
from ..analyzer import LRP
from .preprocess import Preprocess

__all__ = ["METHODS", "make_method"]


def _lrp(composite: Callable) -> Callable:
    return lambda model, prep, seed: LRP(model, composite(prep) if composite else None)


def _box(prep: Preprocess):
    """EpsilonGammaBox with the z^B bounds of pixel values 0 and 1 after normalisation."""
    low = ((0.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(1, 3, 1, 1)
    high = ((1.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(1, 3, 1, 1)
    return presets.EpsilonGammaBox(low, high)


#: Command-line name → (description, factory(model, preprocess, seed) → explainer(x, target) → Explanation).
METHODS: dict[str, tuple[str, Callable]] = {
    "lrp": ("LRP with lrpkit's default composite (CP-LRP on transformers, EpsilonPlusFlat otherwise)", _lrp(None)),
    "cplrp": ("LRP, CP-LRP preset with ε (transformers)", _lrp(lambda p: presets.CPLRP())),
    "cplrp-gamma": ("LRP, CP-LRP preset with γ = 0.25 (transformers)", _lrp(lambda p: presets.CPLRP(gamma=0.25))),
    "attnlrp": ("LRP, AttnLRP preset (transformers)", _lrp(lambda p: presets.AttnLRP())),
    "epsilon-plus": ("LRP, EpsilonPlus preset", _lrp(lambda p: presets.EpsilonPlus())),
    "epsilon-plus-flat": ("LRP, EpsilonPlusFlat preset", _lrp(lambda p: presets.EpsilonPlusFlat())),
    "epsilon-alpha2-beta1": ("LRP, EpsilonAlpha2Beta1 preset", _lrp(lambda p: presets.EpsilonAlpha2Beta1())),
    "epsilon-gamma-box": ("LRP, EpsilonGammaBox preset with the bounds of pixel values [0, 1]", _lrp(_box)),
    "transformer-attribution": ("Chefer et al. 2021, transformer attribution",
                                lambda m, p, s: methods.TransformerAttribution(m)),
    "partial-lrp": ("Voita et al. 2019, partial LRP (last block's heads)", lambda m, p, s: methods.PartialLRP(m)),
    "rollout": ("Abnar & Zuidema 2020, attention rollout", lambda m, p, s: methods.AttentionRollout(m)),
    "gradient-rollout": ("attention rollout weighted by gradients", lambda m, p, s: methods.GradientRollout(m)),
    "raw-attention": ("the last block's class-token attention", lambda m, p, s: methods.RawAttention(m)),
    "attention-gradcam": ("Grad-CAM on the last block's attention", lambda m, p, s: methods.AttentionGradCAM(m)),
    "generic-attention": ("Chefer et al. 2021b, generic attention explainability",
                          lambda m, p, s: methods.GenericAttention(m)),
    "gradient": ("the input gradient", lambda m, p, s: methods.Gradient(m)),
    "input-x-gradient": ("input × gradient", lambda m, p, s: methods.InputXGradient(m)),
    "smoothgrad": ("SmoothGrad, 16 noisy samples", lambda m, p, s: methods.SmoothGrad(m, n=16, seed=s)),
    "integrated-gradients": ("integrated gradients, 16 steps, zero baseline",
                             lambda m, p, s: methods.IntegratedGradients(m, steps=16)),
    "vitcx": ("ViT-CX, Xie et al. 2023", lambda m, p, s: methods.ViTCX(m, seed=s, progress=False)),
}


def make_method(name: str, model: nn.Module, prep: Preprocess, seed: int = 0) -> Callable:
    """The explainer called ``name`` in :data:`METHODS`, built for ``model``: ``explainer(x, target)`` returns an
    :class:`~lrpkit.Explanation` whose ``heatmap`` is (B, H, W)."""
    if name not in METHODS:
        like = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" (did you mean {', '.join(like)}?)" if like else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose from {', '.join(METHODS)}")
    from ..canonize import CanonizationError
    from ..methods.base import NotApplicableError
    from ..rules import IncompatibleRuleError

    try:
        return METHODS[name][1](model, prep, seed)
    except (NotApplicableError, CanonizationError, IncompatibleRuleError) as err:  # e.g. attention on a CNN
        raise ValueError(f"method {name!r} does not apply to {type(model).__name__}: {err}") from err
