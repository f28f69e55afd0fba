"""Canonization: turn a model into a flat :class:`~lrpkit.layers.Chain` of explicit layers.

``canonize(model)`` dispatches on the model's type (torchvision VGG/ResNet, timm VisionTransformer, any
``nn.Sequential``), flattens nested ``nn.Sequential``, fuses BatchNorm into the preceding Linear/Conv, drops
Dropout/Identity and makes residual structure explicit. It builds a new module: the user's model is untouched.
Teach it a module type with a canonizer in a :class:`lrpkit.Registry` (active in a ``with`` block), or process-wide
with :func:`register_canonizer`; a whole model family (canonizers, default composite, geometry, methods) is one
:func:`lrpkit.families.register_family`.
"""

from .core import CanonizationError, canonize, flatten, join, make_chain, register_canonizer

__all__ = ["CanonizationError", "canonize", "flatten", "join", "make_chain", "register_canonizer"]
