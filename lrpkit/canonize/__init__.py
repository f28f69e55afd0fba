"""Canonization: turn a model into a flat :class:`~lrpkit.layers.Chain` of explicit layers.

``canonize(model)`` dispatches on the model's type (torchvision VGG/ResNet, timm VisionTransformer, any
``nn.Sequential``), flattens nested ``nn.Sequential``, fuses BatchNorm into the preceding Linear/Conv, drops
Dropout/Identity and makes residual structure explicit. It builds a new module: the user's model is untouched.
Add a model family with a canonizer in a :class:`lrpkit.Registry` (active in a ``with`` block), or process-wide with
:func:`register_canonizer`.
"""

from .core import CanonizationError, canonize, flatten, join, make_chain, register_canonizer
from . import torchvision as _torchvision  # noqa: F401  (registers VGG / ResNet)
from . import timm_vit as _timm_vit  # noqa: F401  (registers timm VisionTransformer)

__all__ = ["CanonizationError", "canonize", "flatten", "join", "make_chain", "register_canonizer"]
