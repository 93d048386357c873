"""Transformer building blocks with OpenAI CLIP's parameter names.

Names (`attn.in_proj_weight`, `attn.out_proj`, `ln_1`, `mlp.c_fc`, `mlp.c_proj`, `ln_2`, `resblocks.N`) match
OpenAI's checkpoints so that their state dicts load one-to-one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input's dtype, so low-precision weights or activations
    stay stable.

    On CPU the kernel takes bf16 input with fp32 or bf16 weights and accumulates in fp32 itself, so bf16
    activations are normalised without the two full-tensor casts (and, under autocast, without autocast's
    fp32 round trip, which is slow on CPU and returns fp32 where the next matmul wants bf16).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return out.to(x.dtype)


# Longest sequence for which bf16 attention on CPU is computed with explicit matmuls (see `attention`).
CPU_EXPLICIT_ATTENTION_MAX_LEN = 256


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v with the softmax in fp32; q, k, v [B, H, L, d] -> [B, H, L, d]."""
    length = q.shape[-2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, L, L]
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)  # [L, L]
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return weights @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention over [B, H, L, d], choosing the faster kernel for the device and dtype.

    On CPU in bf16 (weights or autocast) PyTorch's fused attention kernel is 1.5-4x slower, forward and
    backward, than two batched matmuls and a softmax for CLIP's short sequences (50-257 tokens), so those use
    `explicit_attention`; fp32 on CPU and every other device keep `F.scaled_dot_product_attention`.
    """
    if (
        q.device.type == "cpu"
        and q.shape[-2] <= CPU_EXPLICIT_ATTENTION_MAX_LEN
        and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"))
    ):
        return explicit_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class MultiheadAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter layout (one fused q/k/v projection)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3W]
        # [B, L, 3, H, W/H] -> 3 x [B, H, L, W/H]
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal)  # [B, H, L, W/H]
        out = out.transpose(1, 2).reshape(batch, length, width)  # [B, L, W]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks over batch-first sequences [B, L, W]."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's initialisation: std shrinks with width and depth for the residual projections."""
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
