"""Cascading model-parameter randomisation (Adebayo et al. 2018)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .correlation import spearman

ROOT = "<root>"


@dataclass
class RandomizationResult:
    """Result of :func:`model_randomization`.

    layers: names of the layers randomised, in order; step i has layers[0..i] randomised.
    correlation (L, B): Spearman rank correlation between the original heatmap and the heatmap after step i.
    original (B, ...): the heatmap of the unmodified model.
    heatmaps (L, B, ...) or None: the heatmap after each step, when ``keep_heatmaps=True``.
    """

    layers: list[str]
    correlation: torch.Tensor
    original: torch.Tensor
    heatmaps: torch.Tensor | None = field(default=None)


def parameterized_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in registration order (roughly input to output).

    The model itself is named ``"<root>"`` when it holds parameters directly (e.g. a ViT's class token and
    positional embedding).
    """
    return [name or ROOT for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def _default_reinit(name: str, module: nn.Module) -> None:
    own = list(module.parameters(recurse=False))
    leaf = len(own) == len(list(module.parameters()))
    if leaf and callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    with torch.no_grad():
        for p in own:
            std = p.std().item() if p.numel() > 1 else 0.0
            p.normal_(0.0, std if std > 0 else 0.02)


def model_randomization(model: nn.Module, explain: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                        x: torch.Tensor, *, layers: Sequence[str] | None = None, seed: int = 0,
                        absolute: bool = False, keep_heatmaps: bool = False,
                        reinit: Callable[[str, nn.Module], None] | None = None) -> RandomizationResult:
    """Cascading (top-down) parameter randomisation sanity check.

    On a deep copy of ``model`` (the given model is never modified), the parameterised layers are re-initialised
    one after the other from the output down to the input, cumulatively; after each step the explanation is
    recomputed with ``explain(model_copy, x)`` -> heatmap (B, H, W) (any (B, ...) shape works) and compared
    with the original heatmap h⁰ by Spearman rank correlation, per sample:

        ρ_{i,b} = Spearman(h⁰_b, h^{(i)}_b),   h^{(i)}: layers[0..i] randomised

    (on |h| with ``absolute=True``). An explanation that stays highly correlated while the weights are random
    does not depend on what the model learned and fails the check.

    ``layers``: names (as in ``named_modules``, ``"<root>"`` for the model's own parameters) in the order to
    randomise; default :func:`parameterized_layers` reversed (output first). Re-initialisation (``reinit``
    overrides it): a module whose parameters are all its own and that has ``reset_parameters()`` gets its
    PyTorch default initialisation (a LayerNorm / BatchNorm thus returns to weight 1, bias 0 and fresh running
    statistics); any other parameter p is drawn from N(0, σ²), σ = std(p) before the step (0.02 if undefined).
    All random draws, including those of ``explain``, happen in a forked RNG seeded with ``seed``: results are
    reproducible and the caller's RNG state is untouched. The copy keeps the model's train/eval mode.

    Reference: Adebayo et al. 2018, "Sanity Checks for Saliency Maps", §3 (cascading randomisation).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    work = copy.deepcopy(model)
    modules = {name or ROOT: m for name, m in work.named_modules()}
    names = list(reversed(parameterized_layers(work))) if layers is None else list(layers)
    for name in names:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model; parameterised layers: "
                             f"{parameterized_layers(work)}")
        if next(modules[name].parameters(recurse=False), None) is None:
            raise ValueError(f"layer {name!r} holds no parameters of its own")
    reinit = reinit or _default_reinit
    devices = sorted({t.device.index or 0 for t in [*work.parameters(), x] if t.device.type == "cuda"})

    def run(m):
        h = explain(m, x)
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[0] != x.shape[0]:
            raise ValueError("explain(model, x) must return a tensor (B, ...) with x's batch size, got "
                             f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
        h = h.detach()
        return h.abs() if absolute else h

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        original = run(work)
        corr, kept = [], []
        for name in names:
            reinit(name, modules[name])
            h = run(work)
            if h.shape != original.shape:
                raise ValueError(f"heatmap shape changed from {tuple(original.shape)} to {tuple(h.shape)}")
            corr.append(spearman(original, h))
            if keep_heatmaps:
                kept.append(h)
    correlation = torch.stack(corr) if corr else original.new_zeros(0, x.shape[0])
    return RandomizationResult(names, correlation, original, torch.stack(kept) if keep_heatmaps and kept else None)
