"""Checkpoints people already have, in and out: the one boundary where other projects' formats meet ours.

`load_model(path)` reads, without executing anything from the file:

- an OpenAI TorchScript archive (the released `ViT-B-32.pt`…): only its tensors, via a tensors-only unpickler;
- an OpenAI state dict (`torch.save(model.state_dict())`);
- an OpenCLIP checkpoint: a bare state dict, or a training checkpoint with `state_dict`, `module.` prefixes;
- a `.safetensors` file in the OpenAI/OpenCLIP or Hugging Face layout;
- a Hugging Face `CLIPModel` folder (config.json + model.safetensors or pytorch_model.bin);
- an OpenCLIP hub folder (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin);
- clipforge's own model file: a `.safetensors` whose metadata has `format: clipforge` and `model_config`.

Without a stored config the architecture is inferred from tensor shapes (`formats.infer`). What shapes cannot
tell comes from `expected` when given, else from the format's convention: OpenAI files (TorchScript, bare state
dicts) use QuickGELU as OpenAI's models do, OpenCLIP training checkpoints and safetensors use GELU as OpenCLIP's
default; `quick_gelu=` overrides either. Pickles are only read with `torch.load(weights_only=True)`.

`export_openai`, `export_openclip` and `export_hf` write the three layouts other tools read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import FORMAT_TAG as CLIPFORGE_FORMAT
from .checkpoint import atomic_directory, atomic_write
from .config import ConfigError, from_dict
from .formats import CheckpointFormatError
from .formats import hf as hf_layout
from .formats.infer import check_consistent, config_from_facts, flatten, shape_facts
from .formats.readers import load_weights_file, read_json
from .models.clip import CLIP
from .models.config import ModelConfig

__all__ = ["CheckpointFormatError", "load_model", "read_checkpoint", "export_hf", "export_openclip", "export_openai"]

# Non-weight entries some files carry: OpenAI's archives keep their sizes as tensors; masks and position ids
# are recomputed by every implementation.
_OPENAI_EXTRAS = {"input_resolution", "context_length", "vocab_size"}
_IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class Checkpoint:
    """Tensors under our names, the config the file carries (if any) and how the file was recognised."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig | None
    quick_gelu: bool  # the format's convention, used only when neither the file nor the caller says
    kind: str


def load_model(
    path: str | Path, expected: ModelConfig | None = None, *, quick_gelu: bool | None = None
) -> CLIP:
    """The CLIP stored at `path` (file or folder), in eval mode with fp32 weights.

    `expected`, when given, must agree with every architecture value the file determines; otherwise a
    CheckpointFormatError names the first key that differs. It also supplies what shapes cannot determine
    (attention heads, activation). `quick_gelu` overrides the activation for files without a stored config.
    """
    from .factory import build_model  # noqa: PLC0415 - factory imports this module lazily too

    path = Path(path)
    checkpoint = read_checkpoint(path)
    where = f"{path} (read as {checkpoint.kind})"
    cfg = resolve_config(checkpoint, expected, quick_gelu, where)
    if cfg.text_cfg.hf_model_path is None:
        # Every tensor is about to be overwritten: allocate without running the random initialisation.
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device="cpu")
    else:  # the Hugging Face encoder loads its own folder
        model = build_model(cfg)
    load_weights(model, checkpoint.state_dict, where)
    return model.eval()


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
        return Checkpoint(normalise(content, where), None, True, "OpenAI TorchScript archive")
    if kind == "safetensors":
        if metadata.get("format") == CLIPFORGE_FORMAT:
            from .models.lora import merge_lora_state_dict  # noqa: PLC0415

            # A LoRA run's file holds base weights and adapters: merged here, so it loads as a plain model.
            merged = merge_lora_state_dict(content)
            return Checkpoint(_float32(merged), _stored_config(metadata, where), False, "clipforge model file")
        return Checkpoint(normalise(content, where), None, False, "safetensors")
    state, wrapped = _unwrap(content, where)
    kind = "OpenCLIP checkpoint" if wrapped else "state dict"
    return Checkpoint(normalise(state, where), None, not wrapped, kind)


def _stored_config(metadata: Mapping[str, str], where: str) -> ModelConfig:
    text = metadata.get("model_config")
    if text is None:
        raise CheckpointFormatError(f"{where}: clipforge model file without 'model_config' in its metadata")
    try:
        return from_dict(ModelConfig, json.loads(text), prefix="model_config")
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointFormatError(f"{where}: bad stored model config ({exc})") from None


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
        tensors = _folder_weights(path, ("model.safetensors", "pytorch_model.bin"))
        return Checkpoint(normalise(tensors, where), cfg, cfg.quick_gelu, "Hugging Face CLIPModel folder")
    if (path / "open_clip_config.json").is_file():
        model_cfg = read_json(path / "open_clip_config.json").get("model_cfg") or {}
        tensors = _folder_weights(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        quick = bool(model_cfg.get("quick_gelu", False))
        return Checkpoint(normalise(tensors, where), None, quick, "OpenCLIP hub folder")
    raise CheckpointFormatError(
        f"{path}: a folder must be a Hugging Face CLIPModel (config.json) or OpenCLIP hub folder "
        "(open_clip_config.json)"
    )


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


def resolve_config(
    checkpoint: Checkpoint, expected: ModelConfig | None, quick_gelu: bool | None, where: str
) -> ModelConfig:
    """The architecture to build: the file's own config, or one inferred from shapes; checked against
    `expected`."""
    cfg = checkpoint.config
    if cfg is not None:
        if cfg.text_cfg.hf_model_path is None:  # a standard CLIP: its tensors must match its own config
            check_consistent(shape_facts(checkpoint.state_dict, where), flatten(cfg), where, "the file's config")
        if quick_gelu is not None and quick_gelu != cfg.quick_gelu:
            raise CheckpointFormatError(f"{where}: quick_gelu={quick_gelu} contradicts the file's config")
        if expected is not None:
            check_consistent(flatten(cfg), flatten(expected), where, "the expected config")
        return cfg
    facts = shape_facts(checkpoint.state_dict, where)
    if expected is not None:
        check_consistent(facts, flatten(expected), where, "the expected config")
        return expected if quick_gelu is None else dataclasses.replace(expected, quick_gelu=quick_gelu)
    bias = checkpoint.state_dict.get("logit_bias")
    gelu = checkpoint.quick_gelu if quick_gelu is None else quick_gelu
    return config_from_facts(facts, gelu, None if bias is None else float(bias))


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Strict loading with one-line errors naming the first missing, unexpected or misshapen tensor."""
    own = model.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    # BatchNorm's step counter is bookkeeping that some exporters drop; everything else must be present.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    missing_counters = [k for k in own if k not in state_dict and k.endswith("num_batches_tracked")]
    for problem, keys in (("unexpected tensor", unexpected), ("missing tensor", missing)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointFormatError(f"{where}: {problem} '{keys[0]}'{more} for this architecture")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointFormatError(
                f"{where}: tensor '{key}' has shape {list(tensor.shape)}, the model expects {list(own[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        for key in missing_counters:
            own[key].zero_()


def _plain_state_dict(model: torch.nn.Module, layout: str, where: str) -> dict[str, torch.Tensor]:
    """Our state dict, for a layout that has no place for a foreign text tower or a logit bias."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    if cfg.text_cfg.hf_model_path is not None:
        raise CheckpointFormatError(f"{where}: the {layout} layout has no Hugging Face text tower; use save_model")
    if cfg.init_logit_bias is not None:
        raise CheckpointFormatError(f"{where}: the {layout} layout has no logit_bias; use save_model")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def export_openai(model: CLIP, path: str | Path) -> Path:
    """Write OpenAI's state-dict layout (`clip.model.build_model(torch.load(path))` reads it)."""
    state = _plain_state_dict(model, "OpenAI", str(path))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def export_openclip(model: CLIP, path: str | Path) -> Path:
    """Write an OpenCLIP checkpoint (`{"state_dict": …}`, as its training script saves and
    `open_clip.load_checkpoint` reads). The activation is not part of this layout: OpenCLIP names it in the
    model config (`-quickgelu` architectures)."""
    payload = {"state_dict": _plain_state_dict(model, "OpenCLIP", str(path))}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def export_hf(model: CLIP, folder: str | Path) -> Path:
    """Write a Hugging Face CLIPModel folder (config.json + model.safetensors) for `CLIPModel.from_pretrained`."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    where = str(folder)
    config = hf_layout.config_to_hf(model.config, where)
    tensors = hf_layout.to_hf(_plain_state_dict(model, "Hugging Face", where), where)
    with atomic_directory(folder) as tmp:  # a crash never leaves a half-written folder behind
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return folder
