"""``lrpkit.catalog``, kept for compatibility: the names it had before it was split into three modules, one
concern each.

- :mod:`lrpkit.app.preprocess`: :class:`~lrpkit.app.preprocess.Preprocess`, :data:`~lrpkit.app.preprocess.CROP_MODES`;
- :mod:`lrpkit.app.zoo`: :func:`~lrpkit.app.zoo.load_model`, :func:`~lrpkit.app.zoo.class_names`,
  :func:`~lrpkit.app.zoo.model_names_like`, :data:`~lrpkit.app.zoo.DEMO_MODELS`,
  :data:`~lrpkit.app.zoo.TORCHVISION_MODELS`;
- :mod:`lrpkit.app.method_registry`: :data:`~lrpkit.app.method_registry.METHODS`,
  :func:`~lrpkit.app.method_registry.make_method`.

Each name here is the very object of its module (``lrpkit.catalog.load_model is lrpkit.app.zoo.load_model``).
New code imports from those modules; to replace a function (a test's monkeypatch), replace it in its module, where
the command line and :func:`lrpkit.evaluate.run_evaluation` look it up.
"""

from .method_registry import METHODS, make_method
from .preprocess import CROP_MODES, Preprocess
from .zoo import DEMO_MODELS, TORCHVISION_MODELS, class_names, load_model, model_names_like

__all__ = ["DEMO_MODELS", "TORCHVISION_MODELS", "CROP_MODES", "METHODS", "Preprocess", "load_model",
           "make_method", "model_names_like", "class_names"]
