"""A model from its config: the one constructor that `factory` (by name) and `convert` (from a file) share."""

from __future__ import annotations

from .clip import CLIP
from .config import ModelConfig


def build_model(cfg: ModelConfig) -> CLIP:
    """A randomly initialised CLIP for `cfg`; with `text_cfg.hf_model_path`, its text tower is that local
    Hugging Face encoder (pretrained weights) and the model a `models.hf_text.HFTextCLIP`."""
    if cfg.text_cfg.hf_model_path is not None:
        from .hf_text import HFTextCLIP  # noqa: PLC0415 - needs transformers, only for such configs

        return HFTextCLIP(cfg)
    return CLIP(cfg)
