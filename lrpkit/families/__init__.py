"""Model families: everything lrpkit knows about one kind of model, in one registration.

A :class:`Family` names the model types it canonizes and their canonizers, its default composite, its geometry
(patch size and prefix tokens of a patch-token model, or none) and which methods apply to it. The analyzer, the
methods, ``lrpkit evaluate`` and the command line ask the family (:func:`family_of`) instead of looking for layers
or attribute names. Adding a family is one module that calls :func:`register_family`, plus its tests; see
docs/canonization.md ("Adding a model family") for a worked example.

Built in:

- transformers: ``timm-vit`` (:mod:`lrpkit.families.timm_vit`: ViT, DeiT, registers, distilled, and attention
  pooling ``global_pool='map'`` as in SigLIP), ``timm-swin`` (:mod:`~lrpkit.families.timm_swin`), ``timm-eva``
  (:mod:`~lrpkit.families.timm_eva`: EVA-02), ``timm-beit`` (:mod:`~lrpkit.families.timm_beit`);
- CNNs: ``torchvision-cnn`` (:mod:`lrpkit.families.torchvision_cnn`: VGG, ResNet), ``timm-resnet``
  (:mod:`~lrpkit.families.timm_resnet`: ResNet, ResNet-D, SE/ECA-ResNet, ResNeXt, Wide ResNet),
  ``timm-efficientnet`` (:mod:`~lrpkit.families.timm_efficientnet`: EfficientNet, MobileNetV3), ``timm-convnext``
  (:mod:`~lrpkit.families.timm_convnext`: ConvNeXt V1 and V2);
- ``generic``: any ``nn.Sequential`` or :class:`~lrpkit.layers.Chain` of layers that have rules, which answers
  every question from the canonized chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..registry import active


@dataclass(frozen=True)
class Geometry:
    """What a patch-token model's explanations need to know of its layout: ``patch_size`` (ph, pw), the number of
    prefix tokens (class, distillation, register) before the patch tokens, and whether its attention is global
    (token-to-token), which the attention methods need. ``Geometry()`` is a model without patches (a CNN)."""

    patch_size: tuple[int, int] | None = None
    num_prefix: int = 0
    global_attention: bool = False

    def grid(self, x) -> tuple[int, int]:
        """(grid_h, grid_w): the patch grid of an image batch ``x`` (B, C, H, W)."""
        if self.patch_size is None:
            raise ValueError("this model has no patch grid")
        ph, pw = self.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring).

    - ``name``: a short name (``"timm-vit"``).
    - ``types``: the model classes that belong to it (instances of subclasses too).
    - ``canonizers``: ``{module type: fn(module, path) -> [(name, layer), ...]}`` for the model and its blocks
      (see :func:`lrpkit.canonize.register_canonizer`).
    - ``composite``: ``fn(chain) -> Composite``, what ``analyze`` uses without a composite.
    - ``geometry``: ``fn(model, chain) -> Geometry``.
    - ``methods``: the command-line names of the methods ``lrpkit evaluate`` runs by default on it
      (:data:`lrpkit.catalog.METHODS`).
    """

    name: str
    types: tuple[type, ...]
    canonizers: dict = field(default_factory=dict)
    composite: Callable = None
    geometry: Callable = None
    methods: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise TypeError(f"a Family needs a name, got {self.name!r}")
        bad = [t for t in tuple(self.types) + tuple(self.canonizers)
               if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"Family {self.name!r}: types and canonizer keys must be nn.Module subclasses, got {bad}")
        if not callable(self.composite) or not callable(self.geometry):
            raise TypeError(f"Family {self.name!r} needs callables composite(chain) and geometry(model, chain)")


def register_family(family: Family) -> Family:
    """Make ``family`` known: its canonizers are registered and :func:`family_of` answers with it for its types
    (a family registered later wins for the same type). Like :func:`lrpkit.register_rule` this is process-wide
    outside a ``with`` block and adds to the innermost block inside one; ``lrpkit.Registry().family(f)`` keeps it
    to a block or one analyzer."""
    active()[-1].family(family)
    return family


def family_of(model: nn.Module) -> Family:
    """The family of ``model`` in the active registries (the innermost block first), else :data:`GENERIC`."""
    for registry in reversed(active()):
        for family in registry.families:
            if isinstance(model, family.types):
                return family
    return GENERIC


def preset_composite(name: str) -> Callable:
    """A family's ``composite``: ``fn(chain)`` that returns the preset ``name`` of :mod:`lrpkit.presets` with its
    default arguments, e.g. ``Family(..., composite=preset_composite("EpsilonPlusFlat"))``. (The presets are
    looked up when it is called: they import the rules, which need the layers that the family modules build.)"""
    def composite(chain):
        from .. import presets
        return getattr(presets, name)()

    composite.__name__ = composite.__qualname__ = f"preset_composite({name!r})"
    return composite


def _generic_composite(chain):
    from ..presets import default_composite
    return default_composite(chain)


def _generic_geometry(model, chain) -> Geometry:
    """From the canonized chain: a Conv2d patch projection followed by PatchFlatten gives the patch size; a
    ClassToken the prefix tokens; SelfAttention layers global attention."""
    from ..canonize import canonize
    from ..layers import ClassToken, PatchFlatten, SelfAttention

    chain = canonize(model) if chain is None else chain
    head = list(chain)[:3]
    patch = None
    if head and isinstance(head[0], nn.Conv2d) and any(isinstance(m, PatchFlatten) for m in head[1:]):
        patch = tuple(head[0].stride)
    prefix = next((m.num_prefix for m in chain.modules() if isinstance(m, ClassToken)), 0)
    return Geometry(patch, prefix, any(isinstance(m, SelfAttention) for m in chain.modules()))


#: Any model made of layers that have rules: the answers come from the canonized chain.
GENERIC = Family("generic", (), composite=_generic_composite, geometry=_generic_geometry,
                 methods=("lrp", "epsilon-plus", "epsilon-gamma-box", "epsilon-alpha2-beta1", "gradient",
                          "input-x-gradient", "integrated-gradients", "smoothgrad"))

from . import torchvision_cnn, timm_vit  # noqa: E402,F401  (the built-in families register themselves)
from . import timm_efficientnet  # noqa: E402,F401
from . import timm_convnext  # noqa: E402,F401
from . import timm_resnet  # noqa: E402,F401
from . import timm_beit  # noqa: E402,F401
from . import timm_eva  # noqa: E402,F401
from . import timm_swin  # noqa: E402,F401

__all__ = ["Family", "Geometry", "GENERIC", "family_of", "preset_composite", "register_family"]
