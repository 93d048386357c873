"""The learning rate as a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0,
          schedule: str = "cosine") -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio * base_lr` (or constant).

    `step` counts optimizer steps from 0; the first step uses lr = base_lr / warmup_steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
