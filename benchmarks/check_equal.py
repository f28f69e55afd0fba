"""Bitwise equality of today's package with an earlier revision: the safety net of a redesign (issue 12).

    uv run python benchmarks/check_equal.py --against c5a6677            # everything (a few minutes on 2 cores)
    uv run python benchmarks/check_equal.py --against c5a6677 --quick    # ResNet-18 and a small ViT only

For ResNet-18/50 and VGG16 (torchvision, random weights and randomised BatchNorm statistics) and ViT-B (timm,
random weights), every preset: the relevance, the layerwise relevance and the accounting (per layer and per sink)
of ``lrpkit.LRP`` and of the reference package must be ``torch.equal``. Then every method in ``lrpkit.methods``
on a ViT (and the gradient methods on a CNN): every tensor of the Explanation. Then every preset on a small model
of each timm family (the tests' configurations; ``--no-families`` leaves them out). Exit status 1 on any
difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import randomize_bn  # noqa: E402  (the tests' BatchNorm randomiser, so that fusion is exercised)
from reference import load_reference  # noqa: E402

import lrpkit  # noqa: E402


def build(name: str):
    torch.manual_seed(0)
    if name.startswith("vit"):
        import timm
        kw = {} if name == "vit_base_patch16_224" else {"img_size": 64, "depth": 3}
        return timm.create_model(name if name != "vit_small" else "vit_small_patch16_224", pretrained=False,
                                 **kw).eval()
    import torchvision
    return randomize_bn(getattr(torchvision.models, name)(), seed=3).eval()


def families():
    """(name, model, input, transformer?) for the timm families beyond torchvision's CNNs and the ViT: the small
    random-weight configurations of their tests (non-trivial norms, layer scales, bias tables, shifted windows,
    randomised BatchNorm statistics)."""
    import timm
    from test_family_timm_beit import small_beit
    from test_family_timm_convnext import small_convnext
    from test_family_timm_efficientnet import tiny
    from test_family_timm_eva import small_eva
    from test_family_timm_swin import small_swin
    from test_family_timm_vit_map import small_map_vit

    g = torch.Generator().manual_seed(2)
    image = lambda size: torch.randn(2, 3, size, size, generator=g)  # noqa: E731
    torch.manual_seed(0)
    resnet = randomize_bn(timm.create_model("seresnet50", pretrained=False, num_classes=10, layers=[1, 1, 1, 1]),
                          seed=3).eval()
    return [("timm-swin", small_swin(), image(32), True), ("timm-eva", small_eva(), image(42), True),
            ("timm-beit", small_beit(), image(32), True), ("timm-siglip-map", small_map_vit(), image(32), True),
            ("timm-convnext", small_convnext(), image(32), False), ("timm-efficientnet", tiny(), image(48), False),
            ("timm-seresnet", resnet, image(64), False)]


def composites(pkg, vit: bool):
    """Name -> composite built by package ``pkg`` (the new or the reference one)."""
    P, C, R = pkg.presets, pkg.composites, pkg.rules
    out = {"epsilon": C.Composite(C.GlobalMap(R.EpsilonRule())),
           "EpsilonPlus": P.EpsilonPlus(), "EpsilonPlusFlat": P.EpsilonPlusFlat(),
           "EpsilonAlpha2Beta1": P.EpsilonAlpha2Beta1(), "EpsilonAlpha2Beta1Flat": P.EpsilonAlpha2Beta1Flat(),
           "EpsilonGammaBox": P.EpsilonGammaBox(-3.0, 3.0)}
    if vit:
        out.update({"CPLRP": P.CPLRP(), "CPLRP-gamma": P.CPLRP(gamma=0.25), "AttnLRP": P.AttnLRP(),
                    "AttnLRP-gamma": P.AttnLRP(gamma=0.25), "CPLRP-zbox": P.CPLRP(first_layer=R.ZBoxRule(-3., 3.)),
                    "chefer": pkg.methods.chefer_composite()})
    return out


def fields_of(result) -> dict:
    """A dataclass's fields by name, read through ``getattr`` (a deferred accounting is worked out on reading)."""
    return {name: getattr(result, name) for name in result.__dataclass_fields__}


def differences(a, b, where: str) -> list[str]:
    """Where two results differ: tensors by torch.equal, containers element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or \
                a.dtype != b.dtype or not torch.equal(a, b):
            detail = ""
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                detail = f" (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
            return [f"{where}: differs{detail}"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a if k not in TIMINGS for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if hasattr(a, "__dataclass_fields__") and hasattr(b, "__dataclass_fields__"):
        return differences(fields_of(a), fields_of(b), where)
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _build(pkg, model, composite):
    try:
        return pkg.LRP(model, composite)
    except pkg.rules.IncompatibleRuleError as error:
        return error


def compare_lrp(new, old, model, x, name: str, vit: bool) -> list[str]:
    problems = []
    new_c, old_c = composites(new, vit), composites(old, vit)
    for key in new_c:
        built = [_build(pkg, model, c[key]) for pkg, c in ((new, new_c), (old, old_c))]
        if any(isinstance(b, Exception) for b in built):  # refused (Chefer's rules on windowed attention): by both
            same = all(isinstance(b, Exception) for b in built) and str(built[0]) == str(built[1])
            problems += [] if same else [f"{name} {key}: built {built[0]!r} vs {built[1]!r}"]
            print(f"  {name} {key}: {'refused by both' if same else 'DIFFERS'}", flush=True)
            continue
        a_lrp, b_lrp = built
        for kwargs in ({"layerwise": True}, {"normalize_output": False}):
            a, b = a_lrp(x, **kwargs), b_lrp(x, **kwargs)
            problems += differences(fields_of(a), fields_of(b), f"{name} {key} {kwargs}")
        print(f"  {name} {key}: {'ok' if not problems else 'DIFFERS'}", flush=True)
    return problems


METHOD_OPTIONS = {"SmoothGrad": {"n": 4}, "IntegratedGradients": {"steps": 8}}
TIMINGS = ("masked_seconds", "images_per_second")  # wall-clock figures a method reports: not results


def compare_methods(new, old, model, x, name: str, names) -> list[str]:
    problems = []
    for method in names:
        kw = METHOD_OPTIONS.get(method, {})
        torch.manual_seed(0)
        b = getattr(old.methods, method)(model, **kw)(x)
        torch.manual_seed(0)
        a = getattr(new.methods, method)(model, **kw)(x)
        found = differences(fields_of(a), fields_of(b), f"{name} {method}")
        print(f"  {name} {method}: {'ok' if not found else 'DIFFERS'}", flush=True)
        problems += found
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision of the reference package")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and a small ViT (and the small families)")
    parser.add_argument("--no-families", action="store_true",
                        help="leave out the timm families (small Swin, EVA-02, BEiT, SigLIP 'map', ConvNeXt, "
                             "EfficientNet, SE-ResNet); for a revision that has none of them")
    args = parser.parse_args()
    old = load_reference(args.against)
    start = time.perf_counter()
    cnns = ["resnet18"] if args.quick else ["resnet18", "resnet50", "vgg16"]
    vits = ["vit_small"] if args.quick else ["vit_base_patch16_224"]
    problems = []
    g = torch.Generator().manual_seed(1)
    for name in cnns:
        model, x = build(name), torch.randn(2, 3, 224, 224, generator=g)
        problems += compare_lrp(lrpkit, old, model, x, name, vit=False)
        if name == "resnet18":
            problems += compare_methods(lrpkit, old, model, x[:1], name,
                                        ["Gradient", "InputXGradient", "SmoothGrad", "IntegratedGradients"])
    for name in vits:
        model = build(name)
        size = 224 if name == "vit_base_patch16_224" else 64
        x = torch.randn(2, 3, size, size, generator=g)
        problems += compare_lrp(lrpkit, old, model, x, name, vit=True)
        small = build("vit_small")
        xs = torch.randn(2, 3, 64, 64, generator=g)
        problems += compare_methods(lrpkit, old, small, xs, "vit_small", [m for m in lrpkit.methods.__all__
                                    if m not in ("Explainer", "NotApplicableError", "chefer_composite")])
        problems += compare_methods(lrpkit, old, model, x[:1], name, ["TransformerAttribution", "PartialLRP",
                                                                       "AttentionRollout", "GradientRollout"])
    if not args.no_families:
        for name, model, x, transformer in families():
            problems += compare_lrp(lrpkit, old, model, x, name, vit=transformer)
    print(f"\n{len(problems)} differences in {time.perf_counter() - start:.0f} s")
    for p in problems:
        print("  " + p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
