"""The Vision Transformer image tower of Radford et al. (2021)."""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Patchify by strided conv, prepend a class token, add positions, ln_pre, blocks, ln_post(cls) @ proj."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        assert cfg.patch_size is not None
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, quick_gelu)  # type: ignore[arg-type]
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, G*G+1, W]
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x[:, 0])  # [B, W]
        return x @ self.proj  # [B, D]
