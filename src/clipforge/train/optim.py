"""AdamW with CLIP's parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, the temperature (and other 0-/1-d parameters such as the class token) are not decayed."""
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name or name.endswith(".bias")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay only on matrices and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass: ~10x faster than the per-tensor loop on CPU.
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    A checkpoint stores tensors contiguous, so moments loaded for a channels-last conv weight come back in NCHW
    order. The fused CPU AdamW kernel walks parameter, gradient and moments by storage offset, not by index: with
    mismatched layouts it pairs each weight with another element's moments, and the resumed run departs from
    the uninterrupted one at its second step.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
