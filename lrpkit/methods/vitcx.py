"""ViT-CX: causal explanation of vision transformers (Xie, Chen, Zhang, Chen 2023, "ViT-CX: Causal Explanation of
Vision Transformers", IJCAI; reference code github.com/vaynexie/CausalX-ViT).

For each sample x with target class c (argmax unless given) and ``p = softmax(model(x))``:

1. ``p_c(x)``.
2. The output of a feature layer (default: the input of the last block's attention, i.e. the output of its first
   norm), prefix tokens (class, distillation, register) dropped, patch tokens reshaped to D maps (D, h, w). Feature
   maps are read along their channel axis (:func:`lrpkit.channels.channel_axis_after`, followed through the chain):
   (B, D, h, w), or (B, h, w, D) where the layer's output is channels last (Swin after its patch projection's
   Permute); there (h, w) is the grid of the layer's stage (7×7 for the last stage of a Swin at 224 px), which
   step 3 upsamples like a patch grid.
3. Each map upsampled bilinearly to the image size and min-max normalised to [0, 1]. A map that is constant on the
   patch grid (:func:`constant_maps`, decided before the upsampling) carries no spatial information and is left out.
4. The D maps clustered by agglomerative clustering with complete linkage on the cosine distance
   ``1 − cos(m_d, m_e)``, cut at ``distance_threshold``; each cluster's mask ``M_i`` is the sum of its members,
   min-max normalised again (K masks).
5. For each mask a noise image ``ε_i ~ N(0, noise_std²)`` (input space, all channels);
   ``x̃_i = x ⊙ M_i + ε_i ⊙ (1 − M_i)`` (the mask kept, noise elsewhere) and
   ``x̂_i = x + ε_i ⊙ (1 − M_i)``
   (the same noise added to the whole image); both run through the model in batches.
6. ``s_i = p_c(x̃_i) − p_c(x̂_i) + p_c(x)`` (the kept region's effect, corrected for the noise's own effect) and
   ``S(u) = (1/K) Σ_i s_i M_i(u) / Σ_j M_j(u)`` (0 where no mask covers u).

Cost: one forward pass for the features and 2K forward passes (K ≈ 40 on an ImageNet image with ViT-B).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from einops import rearrange
import torch.nn.functional as F
from torch import nn

from .._warnings import warn
from ..analyzer import resolve_target
from ..explanation import Explanation
from ..layers import Chain, SelfAttention
from ..channels import channel_axis_after
from ..walk import run, walk
from .base import Explainer, NotApplicableError

__all__ = ["ViTCX", "constant_maps", "normalize_maps", "cosine_distances", "cluster_masks", "causal_scores",
           "vitcx_saliency"]


# ------------------------------------------------------------------------------------------------- the math
def constant_maps(grid: torch.Tensor) -> torch.Tensor:
    """Which maps of a feature grid (D, h, w) are constant: a (D,) bool tensor, True where
    ``max m − min m <= 4 · eps · max |m|``, with ``eps = torch.finfo(grid.dtype).eps`` (float32: 1.2e-7, so a
    relative spread of 4.8e-7). An all-zero map is constant.

    Why on the patch grid: bilinear upsampling of a constant map is not exactly constant in floating point (a
    ripple of an ulp or two), and min-max normalisation stretches that ripple to [0, 1]: a noise mask, or a noise
    member of a cluster. On the grid a constant feature is constant to the last bit. Why a tolerance, and why
    relative: a map that is constant in exact arithmetic but was computed token by token can differ by a few units
    in the last place, and an ulp scales with the values' magnitude; a spread of four ulps of the largest value is
    rounding, not a spatial pattern (real feature maps vary by many orders of magnitude more).
    """
    flat = grid.flatten(1)
    eps = torch.finfo(flat.dtype).eps if flat.is_floating_point() else 0.0
    span = flat.amax(1) - flat.amin(1)
    return span <= 4 * eps * flat.abs().amax(1)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (K, H, W) to [0, 1]: ``(m − min m) / (max m − min m)``; a constant map
    (max = min) becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.view_as(maps)


def cosine_distances(flat: torch.Tensor) -> np.ndarray:
    """The condensed vector of pairwise cosine distances ``1 − <a, b>/(|a||b|)`` between the rows of (D, P),
    in the order of :func:`scipy.spatial.distance.pdist` (``metric='cosine'`` gives the same numbers; this
    computes the Gram matrix on the tensor's device, which is much faster for image-sized maps). Rows must be
    non-zero."""
    from scipy.spatial.distance import squareform

    work = flat.to(torch.promote_types(flat.dtype, torch.float32))
    unit = work / work.norm(dim=1, keepdim=True)
    dist = (1.0 - unit @ unit.T).clamp_(min=0.0, max=2.0).double().cpu().numpy()
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return squareform(dist, checks=False)


def cluster_masks(maps: torch.Tensor, distance_threshold: float = 0.1) -> tuple[torch.Tensor, np.ndarray]:
    """ViT-CX step 4: cluster normalised maps (D, H, W) and return (masks (K, H, W), labels (D,)).

    Agglomerative clustering (``scipy.cluster.hierarchy.linkage``, ``method='complete'``) on the cosine
    distances, cut with ``fcluster(criterion='distance', t=distance_threshold)``: within a cluster every pair of
    maps is at most ``distance_threshold`` apart. Mask i = the sum of cluster i's maps, min-max normalised.
    All-zero maps (normalised constant features; :class:`ViTCX` zeroes the maps that :func:`constant_maps` finds
    constant on the patch grid) carry no spatial information and get label 0 (no cluster); masks that normalise to
    all zeros are dropped.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    d = maps.shape[0]
    flat = maps.reshape(d, -1)
    valid = (flat.abs().amax(1) > 0).cpu().numpy()
    labels = np.zeros(d, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if len(idx) == 1:
        labels[idx] = 1
    elif len(idx) > 1:
        z = linkage(cosine_distances(flat[torch.as_tensor(idx, device=flat.device)]), method="complete")
        labels[idx] = fcluster(z, t=distance_threshold, criterion="distance")
    k = int(labels.max())
    if k == 0:
        return maps.new_zeros((0,) + tuple(maps.shape[1:])), labels
    onehot = torch.zeros(k, d, dtype=maps.dtype, device=maps.device)
    cols = torch.as_tensor(idx, device=maps.device)
    onehot[torch.as_tensor(labels[idx] - 1, device=maps.device), cols] = 1  # onehot[i, d] = 1: map d in cluster i
    masks = normalize_maps((onehot @ flat).view(k, *maps.shape[1:]))
    keep = masks.flatten(1).amax(1) > 0
    return masks[keep], labels


def causal_scores(p_kept: torch.Tensor, p_noisy: torch.Tensor, p_x) -> torch.Tensor:
    """ViT-CX step 6, the causal impact score of each mask: ``s_i = p_c(x̃_i) − p_c(x̂_i) + p_c(x)``."""
    return p_kept - p_noisy + p_x


def vitcx_saliency(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """ViT-CX step 6, ``S(u) = (1/K) Σ_i s_i M_i(u) / Σ_j M_j(u)`` for scores (K,) and masks (K, H, W); pixels no
    mask covers (Σ_j M_j(u) = 0) get 0. Returns (H, W)."""
    k = masks.shape[0]
    if k == 0:
        return masks.new_zeros(masks.shape[1:])
    num = torch.einsum("k,khw->hw", scores.to(masks.dtype), masks) / k
    den = masks.sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


# ----------------------------------------------------------------------------------------- feature capture
class _Captured(Exception):
    pass


def _completion_order(chain: Chain) -> list:
    """(name, layer, is_leaf) of every layer in the order their outputs are produced (post-order)."""
    return [(v.name, v.layer, not v.is_container) for v in walk(chain, post_order=True)]


def _run_capture(chain: Chain, x: torch.Tensor, target: nn.Module, when: str, box: list) -> torch.Tensor:
    """``chain(x)``, storing the input (``when='input'``) or output of ``target`` in ``box``."""
    def seen(layer, x_in, y):
        if layer is target:
            box.append(x_in if when == "input" else y)

    return run(chain, x, seen=seen)


def _channel_axis(chain: Chain, target: nn.Module, when: str) -> int:
    """The channel axis (1 or -1) of ``target``'s input (``when='input'``) or output in ``chain``, followed from the
    chain's input (channels in dim 1) through the leaves before it (:func:`lrpkit.channels.channel_axis_after`)."""
    axis = 1
    for v in walk(chain):  # depth-first: a container before its contents, which end in the layout they began in
        if v.layer is target:
            return axis if when == "input" or v.is_container else channel_axis_after(v.layer, axis)
        if not v.is_container:
            axis = channel_axis_after(v.layer, axis)
    raise ValueError("the ViT-CX feature layer is not in the chain")  # pragma: no cover (resolved from the chain)


def _features_to_grid(feats: torch.Tensor, num_prefix: int, grid: tuple[int, int],
                      channel_axis: int = 1) -> torch.Tensor:
    """Tokens (B, N, D) without the prefix tokens -> (B, D, gh, gw); a (B, D, gh, gw) grid is taken as it is, a
    channels-last one (B, gh, gw, D) (``channel_axis=-1``: Swin's feature maps after its Permute) moved to
    (B, D, gh, gw)."""
    if feats.ndim == 4:
        return feats.permute(0, 3, 1, 2) if channel_axis == -1 else feats
    if feats.ndim != 3:
        raise ValueError(f"the ViT-CX feature layer gives shape {tuple(feats.shape)}; it needs tokens (B, N, D) or "
                         f"a grid (B, D, h, w): choose a layer before the pooling")
    b, n, d = feats.shape
    gh, gw = grid
    if n - num_prefix != gh * gw:
        raise ValueError(f"the feature layer gives {n} tokens; minus {num_prefix} prefix tokens they do not fill "
                         f"the {gh}x{gw} patch grid")
    return rearrange(feats[:, num_prefix:], "b (h w) d -> b d h w", h=gh, w=gw)


# ---------------------------------------------------------------------------------------------- explainer
class ViTCX(Explainer):
    """ViT-CX (Xie et al. 2023), steps 1-6 of the module docstring; a pixel-level map.

    ``ViTCX(model, layer=None, distance_threshold=0.1, noise_std=0.1, batch_size=50, seed=None, progress=True,
    keep_masks=False)``, then ``vitcx(x, target=None)``.

    - ``layer``: where the feature maps come from. None: the input of the last block's attention (the output of
      its first norm, ``blocks[-1].norm1`` in timm). A module of the original model (e.g.
      ``model.blocks[-1].norm1``, as in the reference code) or its name (``"blocks.5.norm1"``): the output of
      the canonized layer(s) it became — for a name that canonization turned into a residual branch
      (``"blocks.5.attn"``'s SkipConnection when no layer carries exactly that name) or a whole block
      (``"blocks.5"``) the residual stream after it. An int: the output of that top-level layer of the chain.
      On Swin (windowed attention; ``layers.3.blocks.1.norm1`` is the default there) any layer after the patch
      projection's ``Permute`` and before the pooling gives channels-last maps (B, h, w, D), the projection
      itself (``"patch_embed.proj"``) channels-first ones; both are read as D maps.
    - ``distance_threshold``: the clustering cut (cosine distance, default 0.1).
    - ``noise_std``: σ of the noise in the model's input space (default 0.1, for normalised inputs).
    - ``batch_size``: images per masked forward pass (x̃ and x̂ of batch_size // 2 masks).
    - ``seed``: None draws from torch's global generator; an int reseeds a generator on x's device for every
      sample, and ε_i is the i-th draw ``randn(x.shape[1:])·noise_std`` from it (deterministic; a sample's map
      does not depend on the rest of the batch).
    - ``progress``: a tqdm bar over the masked passes; ``keep_masks``: keep the masks in ``extras["masks"]``.

    ``Explanation.relevance`` is the map S as (B, 1, H, W) (so ``heatmap`` is (B, H, W)); ``extras`` holds
    ``num_masks`` (K per sample), ``scores`` (s per sample), ``masked_images``, ``masked_seconds`` and
    ``images_per_second`` of the masked passes. The model's output is taken as logits (softmax applied).
    """

    name = "ViT-CX"

    def __init__(self, model, layer=None, distance_threshold: float = 0.1, noise_std: float = 0.1,
                 batch_size: int = 50, seed: int | None = None, progress: bool = True, keep_masks: bool = False):
        if not isinstance(distance_threshold, (int, float)) or distance_threshold < 0:
            raise ValueError(f"distance_threshold must be a number >= 0, got {distance_threshold!r}")
        if not isinstance(noise_std, (int, float)) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        super().__init__(model)
        if not any(isinstance(m, SelfAttention) for m in self.chain.modules()):
            raise NotApplicableError(f"{self.name} needs a vision transformer (a model with self-attention layers); "
                                     f"got {type(model).__name__}")
        self.distance_threshold, self.noise_std = float(distance_threshold), float(noise_std)
        self.batch_size, self.seed, self.progress, self.keep_masks = batch_size, seed, progress, keep_masks
        self.feature_layer, self.capture_when = self._resolve_layer(model, layer)
        self._channel_axis = _channel_axis(self.chain, self.feature_layer, self.capture_when)  # of the features

    # -- the feature layer ---------------------------------------------------------------------------------
    def _resolve_layer(self, model, layer):
        order = _completion_order(self.chain)
        if layer is None:
            attns = [m for _, m, _ in order if isinstance(m, SelfAttention)]
            return attns[-1], "input"
        if isinstance(layer, bool) or not isinstance(layer, (int, str, nn.Module)):
            raise TypeError(f"layer must be None, an int, a layer name or a module, got {type(layer).__name__}")
        if isinstance(layer, int):
            n = len(self.chain)
            if not -n <= layer < n:
                raise ValueError(f"layer index {layer} out of range for a chain of {n} top-level layers")
            return self.chain[layer], "output"
        if isinstance(layer, nn.Module):
            if any(layer is m for _, m, _ in order):
                return layer, "output"
            name = next((n for n, m in model.named_modules() if m is layer), None)
            if name is None:
                raise ValueError("layer is a module that is neither part of the model nor of its canonized chain")
            layer = name
        exact_leaves = [m for n, m, leaf in order if n == layer and leaf]
        exact = [m for n, m, _ in order if n == layer]
        below = [m for n, m, _ in order if n.startswith(layer + ".")] if layer else []
        found = exact_leaves or exact or below
        if not found:
            names = sorted({n for n, _, _ in order})
            raise ValueError(f"no layer named {layer!r} in the canonized model; names: {names}")
        return found[-1], "output"

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), feature grid (B, D, gh, gw)) from one forward pass."""
        box: list = []
        out = _run_capture(self.chain, x, self.feature_layer, self.capture_when, box)
        return out, _features_to_grid(box[0], self.num_prefix(), self.grid(x), self._channel_axis)

    # -- the explanation -----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        from tqdm.auto import tqdm

        self.check_input(x)
        b, _, h, w = x.shape
        with torch.no_grad():
            logits, feats = self.features(x)
            t = resolve_target(logits, target)
            p_x = torch.softmax(logits, -1).gather(1, t[:, None])[:, 0]
            masks = []
            for i in range(b):
                maps = F.interpolate(feats[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
                maps = normalize_maps(maps).masked_fill(constant_maps(feats[i])[:, None, None], 0)  # left out
                m, _ = cluster_masks(maps, self.distance_threshold)
                masks.append(m.to(x.dtype))
                if m.shape[0] == 0:
                    warn(f"ViT-CX found no informative feature map for sample {i} (all constant); its map is zero")

            gens = [self._generator(x) for _ in range(b)]
            pairs = [(i, k) for i in range(b) for k in range(masks[i].shape[0])]
            p_kept, p_noisy = [], []  # p_c of x̃_i and x̂_i, in the order of ``pairs``
            per_pass = max(1, self.batch_size // 2)
            bar = tqdm(total=2 * len(pairs), disable=not self.progress, desc="ViT-CX masked passes", unit="img")
            _sync(x)
            start = time.perf_counter()
            for lo in range(0, len(pairs), per_pass):
                chunk = pairs[lo:lo + per_pass]
                n = len(chunk)
                rows = torch.as_tensor([i for i, _ in chunk], device=x.device)
                eps = torch.stack([self._noise(x.shape[1:], gens[i], x) for i, _ in chunk])
                mask = torch.stack([masks[i][k] for i, k in chunk])[:, None]  # (n, 1, H, W): all channels
                outside = eps * (1 - mask)
                batch = torch.cat([x[rows] * mask + outside, x[rows] + outside])  # x̃ then x̂
                p_c = torch.softmax(self.chain(batch), -1).gather(1, t[rows].repeat(2)[:, None])[:, 0]
                p_kept.append(p_c[:n])
                p_noisy.append(p_c[n:])
                bar.update(2 * n)
            _sync(x)
            seconds = time.perf_counter() - start
            bar.close()

            sizes = [m.shape[0] for m in masks]
            p_kept = torch.cat(p_kept).split(sizes) if pairs else [x.new_empty(0)] * b
            p_noisy = torch.cat(p_noisy).split(sizes) if pairs else [x.new_empty(0)] * b
            scores = [causal_scores(p_kept[i], p_noisy[i], p_x[i]) for i in range(b)]
            saliency = torch.stack([vitcx_saliency(scores[i], masks[i]) for i in range(b)])
        extras = {"num_masks": [m.shape[0] for m in masks], "scores": scores, "masked_images": 2 * len(pairs),
                  "masked_seconds": seconds,
                  "images_per_second": 2 * len(pairs) / seconds if seconds > 0 else float("nan"),
                  "distance_threshold": self.distance_threshold, "noise_std": self.noise_std}
        if self.keep_masks:
            extras["masks"] = masks
        return Explanation(relevance=saliency[:, None], output=logits, target=t, method=self.name,
                           patch_size=self.patch_size, input_size=(h, w), extras=extras)

    def _generator(self, x: torch.Tensor):
        if self.seed is None:
            return None
        gen = torch.Generator(device=x.device)
        gen.manual_seed(self.seed)
        return gen

    def _noise(self, shape, gen, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=x.device, dtype=x.dtype) * self.noise_std


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
