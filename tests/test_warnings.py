"""Every warning lrpkit raises names the user's line, not a line inside lrpkit: ``LRP``, ``analyze`` and every
explainer of :mod:`lrpkit.methods` (enumerated from the package) on a model in training mode, ViT-CX's warning
for a sample without an informative feature map, and the helper :func:`lrpkit._warnings.warn` itself.

Global state: warning filters live inside ``warnings.catch_warnings``; the models are built inside
``torch.random.fork_rng`` (``tiny_vit`` reseeds torch's global generator), so both are as before afterwards."""

import inspect
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import lrpkit
from lrpkit import methods
from lrpkit._warnings import user_stacklevel, warn
from helpers import tiny_vit


def explainer_classes() -> list[type]:
    """The explainer classes :mod:`lrpkit.methods` exports (every subclass of ``Explainer`` in ``__all__``)."""
    found = (getattr(methods, name) for name in methods.__all__)
    return sorted((obj for obj in found if inspect.isclass(obj) and issubclass(obj, methods.Explainer)
                   and obj is not methods.Explainer), key=lambda cls: cls.__name__)


def here() -> int:
    """The caller's line number."""
    return sys._getframe(1).f_lineno


def recorded(call) -> list[warnings.WarningMessage]:
    """Every warning ``call()`` raises, each one shown (filters restored afterwards)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


def training_warnings(caught) -> list[warnings.WarningMessage]:
    return [w for w in caught if "training mode" in str(w.message)]


@pytest.fixture(scope="module")
def models():
    """A tiny timm ViT (for the methods that need attention) and a tiny CNN, both in training mode."""
    with torch.random.fork_rng(devices=[]):
        vit = tiny_vit().train()
        torch.manual_seed(0)
        cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2)).train()
    return {"vit": vit, "cnn": cnn}


def test_every_exported_explainer_is_enumerated():
    # a public explainer class defined in lrpkit.methods but missing from its __all__ would escape the test below
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    defined = {cls for cls in subclasses(methods.Explainer)
               if cls.__module__.startswith("lrpkit.") and not cls.__name__.startswith("_")}
    assert defined and defined <= set(explainer_classes())


@pytest.mark.parametrize("cls", explainer_classes(), ids=lambda cls: cls.__name__)
def test_the_training_mode_warning_of_every_method_names_the_callers_line(cls, models):
    # ViT-CX needs a transformer (self-attention layers) but not global attention (it runs on Swin too)
    model = models["vit"] if cls.needs_attention or cls is methods.ViTCX else models["cnn"]
    line, caught = here(), recorded(lambda: cls(model))
    (w,) = training_warnings(caught)
    assert (w.filename, w.lineno) == (__file__, line), f"{cls.__name__}'s warning points at {w.filename}:{w.lineno}"


def test_the_training_mode_warning_of_lrp_and_analyze_names_the_callers_line(models):
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lrp_line, lrp = here(), lambda: lrpkit.LRP(models["cnn"])
    analyze_line, analyze = here(), lambda: lrpkit.analyze(models["cnn"], x)
    for name, line, call in [("LRP", lrp_line, lrp), ("analyze", analyze_line, analyze)]:
        (w,) = training_warnings(recorded(call))
        assert (w.filename, w.lineno) == (__file__, line), f"{name}'s warning points at {w.filename}:{w.lineno}"


def test_vitcx_warning_for_constant_features_names_the_callers_line():
    with torch.random.fork_rng(devices=[]):
        model = tiny_vit()
    with torch.no_grad():  # every feature map of the last block's first norm is its bias: constant
        model.blocks[1].norm1.weight.zero_()
        model.blocks[1].norm1.bias.fill_(0.3)
    method = methods.ViTCX(model, seed=0, progress=False)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    line, caught = here(), recorded(lambda: method(x))
    (w,) = [w for w in caught if "no informative feature map" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line)


def test_warn_skips_every_frame_inside_the_package():
    # two functions compiled as if they were lrpkit's own code (their file lies in the package directory): the
    # warning skips both and names this function's line
    package = os.path.dirname(os.path.abspath(lrpkit.__file__))
    source = ("def inner(warn):\n    warn('from inside', RuntimeWarning)\n\n"
              "def outer(warn):\n    inner(warn)\n\n"
              "def direct(warnings, user_stacklevel):\n    warnings.warn('direct', stacklevel=user_stacklevel())\n\n"
              "def outer_direct(warnings, user_stacklevel):\n    direct(warnings, user_stacklevel)\n")
    space: dict = {}
    exec(compile(source, os.path.join(package, "not_a_module.py"), "exec"), space)
    line, caught = here(), recorded(lambda: space["outer"](warn))
    (w,) = caught
    assert (w.category, str(w.message)) == (RuntimeWarning, "from inside")
    assert (w.filename, w.lineno) == (__file__, line)
    # the same walk for a plain warnings.warn call with stacklevel=user_stacklevel()
    line, caught = here(), recorded(lambda: space["outer_direct"](warnings, user_stacklevel))
    assert [(w.category, str(w.message), w.filename, w.lineno) for w in caught] == [(UserWarning, "direct", __file__,
                                                                                    line)]
    # called from outside the package, it names its caller
    line, caught = here(), recorded(lambda: warn("direct"))
    assert [(w.category, w.filename, w.lineno) for w in caught] == [(UserWarning, __file__, line)]
