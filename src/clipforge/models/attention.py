"""Scaled dot-product attention kernels: the fastest choice per device and dtype, and one query per row.

On CPU in bf16 (weights or autocast) PyTorch's fused attention kernel is 1.5-4x slower, forward and backward,
than two batched matmuls and a softmax for CLIP's short sequences (50-257 tokens; measured with torch 2.13 on
AVX-512 BF16), so those use `explicit_attention`; fp32 on CPU and every other device keep
`F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Longest sequence for which bf16 attention on CPU is computed with explicit matmuls: the L x L weights are
# kept for backward, which past this length costs more memory than the fused kernel's speed is worth.
CPU_EXPLICIT_ATTENTION_MAX_LEN = 256


def _explicit_is_faster(q: torch.Tensor, length: int) -> bool:
    return (
        q.device.type == "cpu"
        and length <= CPU_EXPLICIT_ATTENTION_MAX_LEN
        and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"))
    )


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the softmax in fp32.

    q [B, H, Lq, d], k and v [B, H, L, d] -> [B, H, Lq, d]. `causal` masks keys after each query (Lq = L);
    `allowed` (bool, broadcastable to [B, H, Lq, L]) keeps only the keys where it is True.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Lq, L]
    if causal:
        length = k.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)  # [L, L]
        scores = scores.masked_fill(future, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return weights @ v


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """PyTorch's fused kernel, with the backend it picks for the device (the one name `benchmarks/bench_gpu.py`
    swaps to compare backends under torch.compile)."""
    return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Self-attention over q, k, v [B, H, L, d] -> [B, H, L, d] with the faster kernel (module docstring)."""
    if _explicit_is_faster(q, q.shape[-2]):
        return explicit_attention(q, k, v, causal)
    return _fused(q, k, v, is_causal=causal)


def attention_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                 causal: bool) -> torch.Tensor:
    """Attention for one query per row: q [B, H, 1, d] at sequence position positions[b], over k, v
    [B, H, L, d]; with `causal`, the query sees keys 0..positions[b] only, as in full causal attention."""
    allowed = None
    if causal:
        keys = torch.arange(k.shape[-2], device=k.device)
        allowed = (keys[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
    if _explicit_is_faster(q, k.shape[-2]):
        return explicit_attention(q, k, v, allowed=allowed)
    return _fused(q, k, v, attn_mask=allowed)
