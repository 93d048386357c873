"""Checkpoints people already have, in and out: the one boundary where other projects' formats meet ours.

`load_model(path)` reads, without executing anything from the file (`formats.layouts` recognises the layout):

- an OpenAI TorchScript archive (the released `ViT-B-32.pt`…): only its tensors, via a tensors-only unpickler;
- an OpenAI state dict (`torch.save(model.state_dict())`);
- an OpenCLIP checkpoint: a bare state dict, or a training checkpoint with `state_dict`, `module.` prefixes;
- a `.safetensors` file in the OpenAI/OpenCLIP or Hugging Face layout;
- a Hugging Face `CLIPModel` folder (config.json + model.safetensors or pytorch_model.bin);
- an OpenCLIP hub folder (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin);
- clipforge's own model file: a `.safetensors` whose metadata has `format: clipforge` and `model_config`.

The architecture is never guessed. Shapes fix widths, depths and sizes; the activation and the head counts
come from the file's config (clipforge metadata, config.json, open_clip_config.json, the `FILE.json` sidecar
our exports write, or OpenAI's fixed conventions for a TorchScript archive), else from the architecture the
caller names (`model_name=`, `quick_gelu=`). A file without either is refused with an error saying what to pass.
A file never chooses what is imported or which folders are read: a Hugging Face text tower named by a file is
used only where the caller allows it (`hf_text_path=`) or it is one of clipforge's own registered encoders.

`export_openai`, `export_openclip` and `export_hf` write the three layouts other tools read, each with the
architecture and preprocessing beside the weights (sidecar, or config.json + preprocessor_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import atomic_directory, atomic_write, atomic_write_text
from .formats import CheckpointFormatError
from .formats import hf as hf_layout
from .formats import openclip as openclip_layout
from .formats.infer import check_consistent, flatten, shape_facts
from .formats.layouts import Checkpoint, read_checkpoint
from .models.clip import CLIP
from .models.config import ModelConfig
from .transforms import PreprocessConfig, model_preprocess

__all__ = ["CheckpointFormatError", "load_model", "read_checkpoint", "export_hf", "export_openclip", "export_openai",
           "openai_format_gaps"]


def load_model(
    path: str | Path, model_name: str | ModelConfig | None = None, *, quick_gelu: bool | None = None,
    hf_text_path: str | Path | None = None,
) -> CLIP:
    """The CLIP stored at `path` (file or folder), in eval mode with fp32 weights, with the eval preprocessing
    the file stores as `model.preprocess_cfg` (`transforms.PreprocessConfig`).

    `model_name` (a registered architecture name or a ModelConfig) names the architecture of a file that does
    not determine it, and must agree with every value a file does determine (else an error names the first key
    that differs). `quick_gelu` sets the activation of such a file, overriding the named architecture's.
    `hf_text_path` is the local folder of the Hugging Face text encoder for a file whose config names one.
    """
    from .factory import build_model  # noqa: PLC0415 - factory imports this module lazily too

    path = Path(path)
    checkpoint = read_checkpoint(path)
    where = f"{path} (read as {checkpoint.kind})"
    expected = _named_config(model_name)
    cfg = resolve_config(checkpoint, expected, quick_gelu, where)
    cfg = _text_tower(cfg, expected, hf_text_path, from_file=checkpoint.config is not None, where=where)
    if cfg.text_cfg.hf_model_path is None:
        # Every tensor is about to be overwritten: allocate without running the random initialisation.
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device="cpu")
    else:  # the Hugging Face encoder loads its own folder
        model = build_model(cfg)
    load_weights(model, checkpoint.state_dict, where)
    model.preprocess_cfg = checkpoint.preprocess or PreprocessConfig(checkpoint.preprocess_mode,
                                                                     cfg.vision_cfg.image_size)
    return model.eval()


def _named_config(model_name: str | ModelConfig | None) -> ModelConfig | None:
    if model_name is None or isinstance(model_name, ModelConfig):
        return model_name
    from .registry import get_model_config  # noqa: PLC0415

    return get_model_config(model_name)


def _ambiguous(where: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{where}: the file does not say its activation (QuickGELU or GELU) or attention head counts, and "
        "clipforge does not guess them; name the architecture: load_model(path, model_name=NAME, "
        "quick_gelu=True|False) or create_model(NAME, pretrained=path), NAME from clipforge.list_models() or "
        "a ModelConfig (command line: --arch NAME [--quick-gelu | --gelu]); OpenCLIP's plain models are GELU "
        "(quick_gelu=False), OpenAI's QuickGELU"
    )


def _comparable(cfg: ModelConfig) -> dict[str, Any]:
    """flatten(cfg) where the text tower's folder counts only by its presence (paths differ by machine)."""
    out = flatten(cfg)
    out["text_cfg.hf_model_path"] = out["text_cfg.hf_model_path"] is not None
    return out


def resolve_config(
    checkpoint: Checkpoint, expected: ModelConfig | None, quick_gelu: bool | None, where: str
) -> ModelConfig:
    """The architecture to build: the file's own config, or the caller's checked against the shapes."""
    cfg = checkpoint.config
    if cfg is not None:
        if cfg.text_cfg.hf_model_path is None:  # a standard CLIP: its tensors must match its own config
            check_consistent(shape_facts(checkpoint.state_dict, where), flatten(cfg), where, "the file's config")
        if quick_gelu is not None and quick_gelu != cfg.quick_gelu:
            raise CheckpointFormatError(f"{where}: quick_gelu={quick_gelu} contradicts the file's config "
                                        f"(quick_gelu={cfg.quick_gelu})")
        if expected is not None:
            check_consistent(_comparable(cfg), _comparable(expected), where, "the named architecture")
        return cfg
    facts = shape_facts(checkpoint.state_dict, where)  # a malformed file is reported as such first
    if expected is None:
        raise _ambiguous(where)
    if expected.text_cfg.hf_model_path is None:
        check_consistent(facts, flatten(expected), where, "the named architecture")
    return expected if quick_gelu is None else dataclasses.replace(expected, quick_gelu=quick_gelu)


def _text_tower(
    cfg: ModelConfig, expected: ModelConfig | None, hf_text_path: str | Path | None, from_file: bool, where: str
) -> ModelConfig:
    """`cfg` with the text-tower folder the caller allows: a folder named by a file is never used as such,
    unless it is the one a registered clipforge architecture names."""
    from .registry import registered_hf_text_paths  # noqa: PLC0415

    stored = cfg.text_cfg.hf_model_path
    if stored is None:
        if hf_text_path is not None:
            raise CheckpointFormatError(f"{where}: hf_text_path was given but this model's text tower is CLIP's own")
        return cfg
    chosen: str | None = None
    if hf_text_path is not None:
        chosen = str(hf_text_path)
    elif expected is not None and expected.text_cfg.hf_model_path is not None:
        chosen = expected.text_cfg.hf_model_path  # the caller's own config
    elif not from_file or stored in registered_hf_text_paths():
        chosen = stored
    if chosen is None:
        raise CheckpointFormatError(
            f"{where}: its text tower is a Hugging Face encoder the file locates as {stored!r}; a model file "
            "does not choose folders or code to load: pass hf_text_path=DIR (command line: --hf-text-path DIR), "
            "the local folder holding that encoder"
        )
    return dataclasses.replace(cfg, text_cfg=dataclasses.replace(cfg.text_cfg, hf_model_path=chosen))


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


def openai_format_gaps(cfg: ModelConfig) -> list[str]:
    """What OpenAI's `clip.load`/`build_model` would build differently from `cfg` (it infers everything from
    shapes with fixed conventions: QuickGELU, 64-wide heads, MLP ratio 4)."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    gaps = []
    openai_vision_heads = v.width * 32 // 64 if v.is_resnet else v.width // 64
    if v.num_heads != openai_vision_heads:
        gaps.append(f"{v.num_heads} image attention heads (OpenAI's code builds {openai_vision_heads})")
    if t.heads != t.width // 64:
        gaps.append(f"{t.heads} text attention heads (OpenAI's code builds {t.width // 64})")
    if not cfg.quick_gelu:
        gaps.append("GELU (OpenAI's code builds QuickGELU)")
    if (not v.is_resnet and v.mlp_ratio != 4.0) or t.mlp_ratio != 4.0:
        gaps.append("an MLP ratio other than 4")
    return gaps


def _write_sidecar(model: CLIP, weights: Path) -> Path:
    text = openclip_layout.write_sidecar_text(model.config, model_preprocess(model), weights)
    return atomic_write_text(openclip_layout.sidecar_path(weights), text)


def export_openai(model: CLIP, path: str | Path) -> Path:
    """Write OpenAI's state-dict layout (`clip.model.build_model(torch.load(path))` reads it) and the sidecar
    `PATH.json` with the exact architecture and preprocessing. Warns (UserWarning) when OpenAI's code would
    build a different model from the file alone (`openai_format_gaps`); clipforge and OpenCLIP read the
    sidecar."""
    path = Path(path)
    state = _plain_state_dict(model, "OpenAI", str(path))
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    sidecar = _write_sidecar(model, path)
    gaps = openai_format_gaps(model.config)
    if gaps:
        warnings.warn(f"{path}: OpenAI's clip.load cannot represent {', '.join(gaps)} and would build a different "
                      f"model from this file; clipforge.load_model reads the architecture from {sidecar.name}",
                      UserWarning, stacklevel=2)
    return path


def export_openclip(model: CLIP, path: str | Path) -> Path:
    """Write an OpenCLIP checkpoint (`{"state_dict": …}`, as its training script saves and
    `open_clip.load_checkpoint` reads) and the sidecar `PATH.json` holding OpenCLIP's `model_cfg` and
    `preprocess_cfg` (the content of an `open_clip_config.json`) plus clipforge's exact config.

    A `path` without a file extension becomes OpenCLIP's hub folder instead (`open_clip_config.json` +
    `open_clip_model.safetensors`), which `open_clip.create_model("local-dir:PATH")` reads as it is."""
    path = Path(path)
    state = _plain_state_dict(model, "OpenCLIP", str(path))
    if not path.suffix:
        return _export_openclip_folder(model, state, path)
    atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
    _write_sidecar(model, path)
    return path


def _export_openclip_folder(model: CLIP, state: dict[str, torch.Tensor], folder: Path) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    with atomic_directory(folder) as tmp:  # a crash never leaves a half-written folder behind
        weights = tmp / "open_clip_model.safetensors"
        save_file({k: v.clone() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
        text = openclip_layout.write_sidecar_text(model.config, model_preprocess(model), weights)
        (tmp / "open_clip_config.json").write_text(text)
    return folder


def _hf_image_processor(preprocess: PreprocessConfig) -> dict[str, Any]:
    """transformers' CLIPImageProcessor settings for the same resize, crop and normalisation."""
    size = preprocess.size
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(preprocess.mean), "image_std": list(preprocess.std),
    }


def export_hf(model: CLIP, folder: str | Path) -> Path:
    """Write a Hugging Face CLIPModel folder (config.json + model.safetensors + preprocessor_config.json) for
    `CLIPModel.from_pretrained`; config.json also keeps clipforge's preprocessing choice under `clipforge`."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    where = str(folder)
    preprocess = model_preprocess(model)
    config = {**hf_layout.config_to_hf(model.config, where), "clipforge": {"preprocess": preprocess.to_dict()}}
    tensors = hf_layout.to_hf(_plain_state_dict(model, "Hugging Face", where), where)
    with atomic_directory(folder) as tmp:  # a crash never leaves a half-written folder behind
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(_hf_image_processor(preprocess), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return folder
