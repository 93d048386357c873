"""Fine-tuning from an existing checkpoint, locking towers (LiT: Zhai et al., 2022), and LoRA adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import ConfigError


@dataclass(frozen=True)
class FinetuneConfig:
    """Where the weights start, and which parts of the model stay frozen.

    `init` is any checkpoint `clipforge.load_model` reads (OpenAI, OpenCLIP, Hugging Face, clipforge); its
    architecture must match `model`. A locked tower is frozen except its last `*_unlocked_*` groups, kept in
    eval mode (BatchNorm statistics frozen too) and left out of the optimizer.
    """

    init: str | None = None
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # LoRA (models/lora.py): rank 0 is off; otherwise every base weight is frozen and only the adapters of the
    # matrices `lora_targets` selects train (presets attn, mlp, visual.attn, text.mlp, ... or name patterns).
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("attn", "mlp")
    # BatchNorm layers stay in eval mode: their running statistics keep the start model's values (weights still
    # train). Fine-tuning on a narrow target otherwise replaces them within tens of steps.
    freeze_bn_stats: bool = False

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.lora_rank < 0:
            raise ConfigError(f"config key '{p}lora_rank': expected an integer >= 0 (0: no LoRA), got {self.lora_rank}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"config key '{p}lora_alpha': expected a positive number, got {self.lora_alpha}")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError(f"config key '{p}lora_targets': name at least one target (e.g. attn, mlp)")
        if self.lora_rank and (self.lock_image or self.lock_text):
            raise ConfigError(f"config key '{p}lora_rank': LoRA already freezes every base weight; drop "
                              f"{p}lock_image / {p}lock_text")
        if self.init is not None and not Path(self.init).exists():
            raise ConfigError(f"config key '{p}init': checkpoint {self.init} does not exist")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{p}{name}': expected >= 0, got {getattr(self, name)}")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ConfigError(f"config key '{p}lock_image_unlocked_groups': only applies with {p}lock_image: true")
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ConfigError(f"config key '{p}lock_text_unlocked_layers': only applies with {p}lock_text: true")


def apply_locks(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Freeze what `cfg` asks for; the optimizer then sees only parameters that still require gradients."""
    from ..models.lock import freeze_batchnorm_stats, lock_image_tower, lock_text_tower  # noqa: PLC0415

    if cfg.lock_image:
        lock_image_tower(model, unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        lock_text_tower(model, unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.freeze_bn_stats:
        freeze_batchnorm_stats(model)
    if cfg.lora_rank:
        from ..models.lora import add_lora  # noqa: PLC0415

        # Every base module is locked (BatchNorm statistics included), then only the adapters train.
        lock_image_tower(model)
        lock_text_tower(model)
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return model
