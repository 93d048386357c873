"""Recognising a checkpoint's layout and bringing its tensors to clipforge's names (`read_checkpoint`).

What a file says about its architecture is kept apart from what it cannot say. A `Checkpoint` has a `config`
only when the file determines the whole architecture (activation and head counts included):

- clipforge's model file (config in its safetensors metadata), a Hugging Face CLIPModel folder (config.json),
  an OpenCLIP hub folder (open_clip_config.json) or any file with a sidecar written by our exports;
- an OpenAI TorchScript archive: OpenAI's `build_model` is the only reader of those, and it always builds
  QuickGELU towers with 64-wide heads, so the archive's shapes determine the rest.

Bare state dicts, OpenCLIP training checkpoints and plain safetensors files have no config: the same tensors
fit a QuickGELU or a GELU model and any head count, so the caller must name the architecture.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import FORMAT_TAG
from ..config import ConfigError, from_dict
from ..models.config import ModelConfig
from ..transforms import PreprocessConfig
from . import CheckpointFormatError
from . import hf as hf_layout
from . import openclip as openclip_layout
from .infer import config_from_facts, shape_facts
from .readers import load_weights_file, read_json

# Non-weight entries some files carry: OpenAI's archives keep their sizes as tensors; masks and position ids
# are recomputed by every implementation.
_OPENAI_EXTRAS = {"input_resolution", "context_length", "vocab_size"}
_IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class Checkpoint:
    """Tensors under our names, the architecture if the file determines it, the eval preprocessing the file
    stores (else the pipeline of the tool that wrote it), and how the file was recognised."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig | None
    preprocess_mode: str
    preprocess: PreprocessConfig | None
    kind: str


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Recognise the format at `path` and return its tensors under clipforge's names."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such file or folder")
    content, metadata, kind = load_weights_file(path)
    where = str(path)
    if kind == "torchscript":
        state = normalise(content, where)
        bias = state.get("logit_bias")
        cfg = config_from_facts(shape_facts(state, where), True, None if bias is None else float(bias))
        return Checkpoint(state, cfg, "openai", None, "OpenAI TorchScript archive")
    if kind == "safetensors" and metadata.get("format") == FORMAT_TAG:
        cfg = _stored_config(metadata, where)
        preprocess = _stored_preprocess(metadata, where)
        from ..models.lora import merge_lora_state_dict  # noqa: PLC0415

        # A LoRA run's file holds base weights and adapters: merged here, so it loads as a plain model.
        return Checkpoint(_float32(merge_lora_state_dict(content)), cfg, "clipforge", preprocess,
                          "clipforge model file")
    if kind == "safetensors":
        state, label = content, "safetensors file"
    else:
        state, wrapped = _unwrap(content, where)
        label = "OpenCLIP checkpoint" if wrapped else "state dict"
    sidecar = openclip_layout.read_sidecar(path)
    if sidecar is None:
        return Checkpoint(normalise(state, where), None, "openai", None, label)
    cfg, preprocess = sidecar
    sidecar_name = openclip_layout.sidecar_path(path).name
    return Checkpoint(normalise(state, where), cfg, preprocess.mode, preprocess, f"{label} + {sidecar_name}")


def _stored_config(metadata: Mapping[str, str], where: str) -> ModelConfig:
    text = metadata.get("model_config")
    if text is None:
        raise CheckpointFormatError(f"{where}: clipforge model file without 'model_config' in its metadata")
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("expected a JSON object")
        return from_dict(ModelConfig, data, prefix="model_config")
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointFormatError(f"{where}: bad stored model config ({exc})") from None


def _stored_preprocess(metadata: Mapping[str, str], where: str) -> PreprocessConfig | None:
    text = metadata.get("preprocess")
    if text is None:  # written before preprocessing was stored: clipforge's pipeline at the model's size
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("expected a JSON object")
        return PreprocessConfig.from_dict(data, "preprocess")
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointFormatError(f"{where}: bad stored preprocessing ({exc})") from None


def _unwrap(content: Any, where: str) -> tuple[Mapping[str, Any], bool]:
    """(state dict, whether it came from an OpenCLIP-style training wrapper)."""
    if not isinstance(content, Mapping):
        raise CheckpointFormatError(f"{where}: expected a state dict (name -> tensor), found {type(content).__name__}")
    wrapped = False
    if isinstance(content.get("state_dict"), Mapping):
        content, wrapped = content["state_dict"], True
    if any(str(k).startswith(_WRAPPER_PREFIXES) for k in content):
        wrapped = True
    return content, wrapped


def _float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def normalise(state_dict: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Any supported layout -> our names, fp32, without wrapper prefixes or non-weight extras."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = str(key)
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith("text."):
            name = name[len("text."):]  # OpenCLIP's CustomTextCLIP nests the same text tower under `text`
        if name in _OPENAI_EXTRAS or _IGNORED.search(name):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"{where}: entry '{key}' is a {type(value).__name__}, not a tensor")
        out[name] = value
    if hf_layout.is_hf_layout(list(out)):
        out = hf_layout.from_hf(out, where)
    return _float32(out)


def _read_folder(path: Path) -> Checkpoint:
    where = str(path)
    if (path / "config.json").is_file():
        data = read_json(path / "config.json")
        if data.get("model_type") != "clip":
            raise CheckpointFormatError(
                f"{path / 'config.json'}: model_type is {data.get('model_type')!r}; a CLIPModel folder has 'clip'"
            )
        cfg = hf_layout.config_from_hf(data, str(path / "config.json"))
        ours = data.get("clipforge")  # written by clipforge's export_hf: the preprocessing choice
        stored = ours.get("preprocess") if isinstance(ours, dict) else None
        preprocess = None if stored is None else _preprocess(stored, path / "config.json", openclip=False)
        tensors = _folder_weights(path, ("model.safetensors", "pytorch_model.bin"))
        mode = preprocess.mode if preprocess else "openai"
        return Checkpoint(normalise(tensors, where), cfg, mode, preprocess, "Hugging Face CLIPModel folder")
    if (path / "open_clip_config.json").is_file():
        config_path = path / "open_clip_config.json"
        data = read_json(config_path)
        model_cfg = data.get("model_cfg")
        if not isinstance(model_cfg, Mapping):
            raise CheckpointFormatError(f"{config_path}: no 'model_cfg' object (OpenCLIP's architecture config)")
        cfg = openclip_layout.from_openclip(model_cfg, str(config_path))
        ours = data.get("clipforge")  # written by clipforge's export_openclip: the preprocessing choice
        if isinstance(ours, dict) and ours.get("preprocess") is not None:
            preprocess = _preprocess(ours["preprocess"], config_path, openclip=False)
        else:
            preprocess = _preprocess(data.get("preprocess_cfg") or {}, config_path, openclip=True)
        tensors = _folder_weights(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        return Checkpoint(normalise(tensors, where), cfg, preprocess.mode, preprocess, "OpenCLIP hub folder")
    raise CheckpointFormatError(
        f"{path}: a folder must be a Hugging Face CLIPModel (config.json) or OpenCLIP hub folder "
        "(open_clip_config.json)"
    )


def _preprocess(data: Any, where: Path, openclip: bool) -> PreprocessConfig:
    if not isinstance(data, Mapping):
        raise CheckpointFormatError(f"{where}: the preprocessing config must be a JSON object")
    try:
        return PreprocessConfig.from_dict(data, str(where), openclip)
    except ConfigError as exc:
        raise CheckpointFormatError(str(exc)) from None


def _folder_weights(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The weights of a folder: one file, or shards listed by `<name>.index.json`."""
    for name in names:
        if (path / name).is_file():
            content, _, _ = load_weights_file(path / name)
            state, _ = _unwrap(content, str(path / name))
            return dict(state)
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            merged: dict[str, Any] = {}
            for shard in shards:
                content, _, _ = load_weights_file(path / Path(shard).name)
                merged.update(_unwrap(content, str(path / shard))[0])
            return merged
    raise CheckpointFormatError(f"{path}: no weights file ({' or '.join(names)})")
