"""The Vision Transformer image tower of Radford et al. (2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Patchify (a stride-p p x p convolution), prepend a class token, add positions, ln_pre, blocks, ln_post(cls) @ proj."""

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

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """conv1(x) flattened to tokens, [B, 3, H, W] -> [B, G*G, W], computed as one matrix product over the
        flattened patches with conv1's weights. Same result; but cuDNN runs this stride-p convolution with a
        kernel that took 13% of a ViT-B-32 bf16 training step on an H100 (batch 512), where a GEMM takes a fraction."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        rows, cols = height // p, width // p  # like the convolution, drop a remainder of fewer than p pixels
        x = x[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p)  # [B, C, Gh, p, Gw, p]
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)  # [B, G*G, C*p*p]
        return F.linear(x, self.conv1.weight.flatten(1))  # [B, G*G, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_patches(x)  # [B, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, G*G+1, W]
        x = self.ln_pre(x)
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # [B]: the class token's position
        x = self.transformer(x, positions=cls)  # [B, W]
        x = self.ln_post(x)
        return x @ self.proj  # [B, D]
