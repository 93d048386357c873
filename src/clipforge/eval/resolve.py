"""The model an evaluation reads (run directory, checkpoint or architecture name), its device and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError
from ..factory import LoadOptions
from ..factory import resolve_model as resolve_model_spec
from ..speed import channels_last
from ..tokenizer import tokenizer_for


def resolve_model(spec: str, device: torch.device | None = None, load: LoadOptions = LoadOptions()
                  ) -> tuple[torch.nn.Module, Path | None]:
    """(model in eval mode, on `device` if given; run directory if any) from a run directory, a checkpoint
    file or an architecture name (`factory.resolve_model`). Evaluation inputs follow the model's device
    (`features.input_device`). ResNet towers get NHWC convolutions (`speed.channels_last`), as in training:
    same values, faster oneDNN / cuDNN kernels."""
    model, run_dir = resolve_model_spec(spec, load)
    channels_last(model)
    return (model.to(device) if device is not None else model), run_dir


def model_tokenizer(model: torch.nn.Module, spec: str = "the model") -> Callable:
    """The tokenizer of a loaded model, derived from its config (`tokenizer.tokenizer_for`)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"model {spec}: it carries no model config to derive its tokenizer from")
    return tokenizer_for(config)


def eval_device(requested: str | None) -> torch.device:
    """The device to evaluate on: the one asked for, else the first GPU when CUDA is available, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
    return device
