"""Building models by name, with their preprocessing and optional pretrained weights.

Imports run one way: `models` (architectures) <- `convert` (files) <- `factory` (names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .convert import load_model
from .models.build import build_model
from .models.clip import CLIP
from .models.config import ModelConfig
from .registry import get_model_config


def create_model(
    name: str | ModelConfig, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> CLIP:
    """A CLIP with the architecture `name` (random init), or loaded from the local checkpoint `pretrained`."""
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name)
    if pretrained is not None:
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
