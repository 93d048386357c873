"""Architecture configs: frozen dataclasses loaded strictly from `model_configs/*.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. A ViT when `patch_size` is set; a modified ResNet when `layers` is a list."""

    image_size: int = 224
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 32
    heads: int | None = None  # default: width // 64 (ViT) or width * 32 // 64 (ResNet)
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width * 32 // 64 if self.is_resnet else max(1, self.width // 64)

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("image_size", "width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{p}{name}': expected a positive integer, got {getattr(self, name)}")
        if self.is_resnet:
            self._validate_resnet(p)
        else:
            if self.patch_size is None or self.patch_size <= 0:
                raise ConfigError(f"config key '{p}patch_size': a ViT needs a positive patch size")
            if self.image_size % self.patch_size:
                raise ConfigError(
                    f"config key '{p}patch_size': {self.patch_size} does not divide image_size {self.image_size}"
                )
            if self.width % self.num_heads:
                raise ConfigError(f"config key '{p}heads': {self.num_heads} does not divide width {self.width}")

    def _validate_resnet(self, p: str) -> None:
        layers = self.layers
        assert isinstance(layers, tuple)
        if len(layers) != 4 or any(depth <= 0 for depth in layers):
            raise ConfigError(f"config key '{p}layers': a ResNet needs four positive stage depths, got {list(layers)}")
        if self.image_size % 32:
            raise ConfigError(f"config key '{p}image_size': a ResNet needs a multiple of 32, got {self.image_size}")
        if self.width % 2:
            raise ConfigError(f"config key '{p}width': a ResNet needs an even stem width, got {self.width}")
        if (self.width * 32) % self.num_heads:
            # Attention pooling runs over the last stage's 32 * width channels.
            raise ConfigError(
                f"config key '{p}heads': {self.num_heads} does not divide the pooled width {self.width * 32}"
            )


@dataclass(frozen=True)
class TextConfig:
    """Causal text transformer over OpenAI's byte-level BPE, or a local Hugging Face encoder.

    With `hf_model_path` set, the text tower is that folder's encoder (`models.hf_text`) pooled by
    `hf_pooler` ("mean" over the attention mask, or "cls") and tokenized by the folder's own tokenizer to
    `context_length` tokens; `vocab_size`, `width`, `heads`, `layers` and `mlp_ratio` then do not apply.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    hf_model_path: str | None = None
    hf_pooler: Literal["mean", "cls"] = "mean"

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.hf_model_path is not None:
            if self.context_length <= 0:
                raise ConfigError(f"config key '{p}context_length': expected a positive integer")
            return
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{p}{name}': expected a positive integer, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"config key '{p}heads': {self.heads} does not divide width {self.width}")
        if self.context_length > 77 and self.vocab_size == 49408:
            # Longer contexts are possible with a retrained positional table, but never for the BPE default.
            raise ConfigError(f"config key '{p}context_length': at most 77 for the CLIP BPE, got {self.context_length}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole CLIP: two towers and the shared embedding size."""

    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = 2.659260036932778  # ln(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP-style models

    def validate(self, prefix: str = "") -> None:
        if self.embed_dim <= 0:
            raise ConfigError(f"config key '{prefix + '.' if prefix else ''}embed_dim': expected a positive integer")
