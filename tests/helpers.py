"""Small models shared by the method tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(seed=0, **kw):
    """A seeded 2-block timm ViT on 32x32 images, patch 8, width 32, 5 classes, in eval mode."""
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()
