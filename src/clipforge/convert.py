"""Checkpoint format detection and conversion (interim: clipforge's own format only)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import is_clipforge_file, read_model_file
from .models.clip import CLIP
from .models.config import ModelConfig


def load_model(path: str | Path, expected: ModelConfig | None = None) -> CLIP:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    if not is_clipforge_file(path):
        raise ValueError(f"{path}: unrecognised checkpoint format")
    state, cfg = read_model_file(path)
    model = CLIP(cfg)
    model.load_state_dict(state)
    return model
