"""Model architectures by name, read from `model_configs/*.json`."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .config import ConfigError, from_dict
from .models.config import ModelConfig


@lru_cache(maxsize=1)
def _config_files() -> dict[str, str]:
    root = resources.files("clipforge") / "model_configs"
    return {Path(p.name).stem: p.read_text() for p in root.iterdir() if p.name.endswith(".json")}


def list_models() -> list[str]:
    """Names of every built-in architecture."""
    return sorted(_config_files())


def get_model_config(name: str | Path) -> ModelConfig:
    """The architecture called `name`, or the one in a JSON file at that path."""
    files = _config_files()
    text: str
    if str(name) in files:
        text = files[str(name)]
        where = f"model config '{name}'"
    elif Path(name).suffix == ".json" and Path(name).is_file():
        text = Path(name).read_text()
        where = str(name)
    else:
        raise ConfigError(f"unknown model '{name}'; known models: {', '.join(list_models())} (or a path to a .json)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@lru_cache(maxsize=1)
def registered_hf_text_paths() -> frozenset[str]:
    """The Hugging Face text-encoder locations the built-in architectures name (e.g. the MiniLM that a pip
    package ships): the only ones a model file may select without the caller naming a folder."""
    paths = set()
    for name in list_models():
        path = get_model_config(name).text_cfg.hf_model_path
        if path is not None:
            paths.add(path)
    return frozenset(paths)
