"""Transformer building blocks with OpenAI CLIP's parameter names.

Names (`attn.in_proj_weight`, `attn.out_proj`, `ln_1`, `mlp.c_fc`, `mlp.c_proj`, `ln_2`, `resblocks.N`) match
OpenAI's checkpoints so that their state dicts load one-to-one.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, attention_at


class _Packed(NamedTuple):
    """A weight packed into oneDNN's blocked layout, and the parameter as it was when packed."""

    param: weakref.ref  # the parameter, weakly
    blocked: torch.Tensor
    data_ptr: int
    version: int


# By id of the parameter (`pack_linear_weights`). A parameter changed since (copy_, a new .data) no longer
# matches and computes with F.linear, as does a deep copy of the model (new parameters).
_PACKED: dict[int, _Packed] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or, for a packed bf16 weight where no gradient is recorded, oneDNN's linear on the packed copy,
    which skips re-laying out the weight on every call. The result can differ from F.linear's by bf16 rounding
    where the two pick different kernels (it did for 64 rows of the pooled last block; the full-sequence layers of
    ViT-B-32 gave identical bits on an AMX Xeon). Under torch.compile always F.linear."""
    # Under torch.compile the packed call is left out: Inductor cannot lower it with a blocked weight, and it lays
    # out (with freezing, prepacks) the weights of its own linear kernels.
    entry = _PACKED.get(id(weight)) if _PACKED and not torch.compiler.is_compiling() else None
    if (entry is not None and entry.param() is weight and weight.data_ptr() == entry.data_ptr
            and weight._version == entry.version and x.dtype == torch.bfloat16 and x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, entry.blocked, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `linear`, so `pack_linear_weights` applies to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack the bf16 CPU weights of the transformer blocks' linear layers (Linear, the attention's q/k/v
    projection) for `linear`; returns how many (0 where oneDNN has no bf16 kernels here). Costs one more copy of
    those weights in memory."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    packed = 0
    for module in model.modules():
        if isinstance(module, Linear):
            weight = module.weight
        elif isinstance(module, MultiheadAttention):
            weight = module.in_proj_weight
        else:
            continue
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            continue
        key = id(weight)
        _PACKED[key] = _Packed(weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)),
                               torch.ops.mkldnn._reorder_linear_weight(weight.detach()), weight.data_ptr(),
                               weight._version)
        packed += 1
    return packed


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (or float64 for float64 input) and returned in the input's dtype, so
    low-precision weights or activations stay stable.

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
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 stays float64
        out = F.layer_norm(
            x.to(compute), self.normalized_shape, self.weight.to(compute), self.bias.to(compute), self.eps
        )
        return out.to(x.dtype)


class MultiheadAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter layout (one fused q/k/v projection)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3W]
        # [B, L, 3, H, W/H] -> 3 x [B, H, L, W/H]
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal)  # [B, H, L, W/H]
        out = out.transpose(1, 2).reshape(batch, length, width)  # [B, L, W]
        return self.out_proj(out)

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """forward(x)[b, positions[b]] for every row b -> [B, W], projecting queries only at those positions."""
        batch, length, width = x.shape
        head = width // self.heads
        rows = torch.arange(batch, device=x.device)
        query = F.linear(x[rows, positions], self.in_proj_weight[:width], self.in_proj_bias[:width])  # [B, W]
        kv = F.linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:])  # [B, L, 2W]
        k, v = kv.view(batch, length, 2, self.heads, head).permute(2, 0, 3, 1, 4)  # 2 x [B, H, L, W/H]
        out = attention_at(query.view(batch, self.heads, 1, head), k, v, positions, causal)  # [B, H, 1, W/H]
        return self.out_proj(out.reshape(batch, width))  # [B, W]


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
                    ("c_fc", Linear(width, hidden)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """forward(x)[b, positions[b]] -> [B, W]: keys and values from every token, the rest at one token."""
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, positions] + self.attn.forward_at(self.ln_1(x), positions, causal)  # [B, W]
        return y + self.mlp(self.ln_2(y))


def _pooled_block(block: ResidualAttentionBlock, positions: torch.Tensor, x: torch.Tensor,
                  causal: bool = False) -> torch.Tensor:
    return block.forward_at(x, positions, causal)


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

    def forward(self, x: torch.Tensor, causal: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W]; or, given `positions` [B], only the output at positions[b] of each row,
        [B, W], for which the last block needs its query, attention output and MLP at that token alone
        (a twelfth of a 12-layer tower's work, nearly all of it on tokens that pooling then drops)."""
        for i, block in enumerate(self.resblocks):
            last = positions is not None and i == len(self.resblocks) - 1
            fn = partial(_pooled_block, block, positions) if last else block
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(fn, x, causal, use_reentrant=False)
            else:
                x = fn(x, causal=causal)
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
