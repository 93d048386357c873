"""Building models by name, with their preprocessing and optional pretrained weights."""

from __future__ import annotations

from dataclasses import dataclass
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
    """A CLIP with the architecture `name` (random init), or loaded from the local checkpoint `pretrained`
    (`load_model(pretrained, model_name=name)`: `name` must agree with whatever the file determines)."""
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name)
    if pretrained is not None:
        from .convert import load_model  # noqa: PLC0415

        model = load_model(pretrained, model_name=cfg)
    else:
        model = build_model(cfg)
    return model.to(device)


def create_model_and_transforms(
    name: str | ModelConfig, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[CLIP, Callable, Callable]:
    """(model, preprocess_train, preprocess_val), as open_clip's function of the same name; preprocess_val is
    the pipeline stored with `pretrained` (`transforms.model_preprocess`)."""
    from .transforms import image_transform, model_preprocess  # noqa: PLC0415

    model = create_model(name, pretrained, device)
    return model, image_transform(model.image_size, train=True), model_preprocess(model).eval_transform()


@dataclass(frozen=True)
class LoadOptions:
    """What the caller says about a checkpoint that the file may not (see `convert.load_model`)."""

    model_name: str | None = None  # the architecture of a file that does not determine it
    quick_gelu: bool | None = None  # its activation, when it differs from the named architecture's
    hf_text_path: str | None = None  # the local folder of a Hugging Face text tower the file names


def resolve_model(spec: str, load: LoadOptions = LoadOptions()) -> tuple[CLIP, Path | None]:
    """(model in eval mode, run directory if any) from a run directory, a checkpoint file or folder, or an
    architecture name (random weights, seeded: the floor any training must beat). Every command that takes
    `--model` resolves it here."""
    from .convert import load_model  # noqa: PLC0415
    from .registry import list_models  # noqa: PLC0415

    path = Path(spec)
    kwargs = {"quick_gelu": load.quick_gelu, "hf_text_path": load.hf_text_path}
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / "config.json").is_file():
        return load_model(path / "model.safetensors", load.model_name, **kwargs).eval(), path
    if path.exists():
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return load_model(path, load.model_name, **kwargs).eval(), run_dir
    if spec in list_models():
        torch.manual_seed(0)
        return create_model(spec).eval(), None
    raise FileNotFoundError(spec)
