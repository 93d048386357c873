"""Fine-tuning from an existing checkpoint, and locking towers (LiT: Zhai et al., 2022)."""

from __future__ import annotations

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

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
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
    from ..models.lock import lock_image_tower, lock_text_tower  # noqa: PLC0415

    if cfg.lock_image:
        lock_image_tower(model, unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        lock_text_tower(model, unlocked_layers=cfg.lock_text_unlocked_layers)
    return model
