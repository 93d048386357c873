"""Building models by name, with their preprocessing and optional pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .models.clip import CLIP
from .models.config import ModelConfig
from .registry import get_model_config


def build_model(cfg: ModelConfig) -> CLIP:
    """A randomly initialised CLIP for `cfg`; with `text_cfg.hf_model_path`, its text tower is that local
    Hugging Face encoder (pretrained weights) and the model a `models.hf_text.HFTextCLIP`."""
    if cfg.text_cfg.hf_model_path is not None:
        from .models.hf_text import HFTextCLIP  # noqa: PLC0415 - needs transformers, only for such configs

        return HFTextCLIP(cfg)
    return CLIP(cfg)


def create_model(
    name: str | ModelConfig, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> CLIP:
    """A CLIP with the architecture `name` (random init), or loaded from the local checkpoint `pretrained`."""
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name)
    if pretrained is not None:
        from .convert import load_model  # noqa: PLC0415

        model = load_model(pretrained, expected=cfg)
    else:
        model = build_model(cfg)
    return model.to(device)


def create_model_and_transforms(
    name: str | ModelConfig, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[CLIP, Callable, Callable]:
    """(model, preprocess_train, preprocess_val), as open_clip's function of the same name."""
    from .transforms import image_transform  # noqa: PLC0415

    model = create_model(name, pretrained, device)
    size = model.image_size
    return model, image_transform(size, train=True), image_transform(size, train=False)
