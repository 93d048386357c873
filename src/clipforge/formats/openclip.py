"""OpenCLIP's architecture config (`model_cfg`, as in `open_clip_config.json`) <-> ModelConfig, and the sidecar
file that carries a model's architecture and preprocessing beside a weights file that cannot hold them.

OpenCLIP keeps architectures as JSON (`model_cfg`) and preprocessing as `preprocess_cfg`, together in the
`open_clip_config.json` of its hub folders. clipforge writes the same two sections in a sidecar `FILE.json`
beside every `.pt` export (OpenAI or OpenCLIP layout), adds its own exact config under `clipforge`, and records
the size and sha256 of the weights file so that a sidecar never describes a different file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, from_dict, to_dict
from ..models.config import ModelConfig, TextConfig, VisionConfig
from ..transforms import PreprocessConfig
from . import CheckpointFormatError
from .readers import read_json

SIDECAR_SUFFIX = ".json"

# OpenCLIP's dataclass defaults (open_clip/model.py CLIPVisionCfg / CLIPTextCfg) for the keys we map.
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0}
# Other OpenCLIP keys are accepted only at values that build the plain CLIP towers clipforge implements.
_NEUTRAL = {"pool_type": ("tok", "argmax"), "pos_embed_type": ("learnable",), "proj_type": ("linear",),
            "patch_dropout": (0, 0.0), "output_tokens": (False,), "pad_id": (0,), "embed_cls": (False,),
            "no_causal_mask": (False,), "proj_bias": (False,), "final_ln_after_pool": (False,),
            "attentional_pool": (False,), "global_average_pool": (False,), "no_ln_pre": (False,)}
_TOP_NEUTRAL = {"custom_text": (False,), "init_logit_scale": None, "cast_dtype": None}


def sidecar_path(weights: str | Path) -> Path:
    """`model.pt` -> `model.pt.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name + SIDECAR_SUFFIX)


def to_openclip(cfg: ModelConfig) -> dict[str, Any]:
    """OpenCLIP's `model_cfg` for a plain CLIP (`open_clip.create_model` builds the same architecture)."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    vision: dict[str, Any] = {"image_size": v.image_size, "width": v.width, "mlp_ratio": v.mlp_ratio}
    if v.is_resnet:  # OpenCLIP: heads = width * 32 // head_width over the last stage's channels
        vision.update(layers=list(v.layers), head_width=v.width * 32 // v.num_heads)  # type: ignore[arg-type]
    else:
        vision.update(layers=v.layers, patch_size=v.patch_size, head_width=v.width // v.num_heads)
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision, "text_cfg": text}


def _check_neutral(section: Mapping[str, Any], known: Mapping[str, Any], where: str, prefix: str) -> None:
    for key, value in section.items():
        if key in known:
            continue
        allowed = _NEUTRAL.get(key)
        if value is None or (allowed is not None and value in allowed):
            continue
        raise CheckpointFormatError(f"{where}: '{prefix}{key}' is {value!r}; clipforge builds plain CLIP towers only")


def from_openclip(model_cfg: Mapping[str, Any], where: str) -> ModelConfig:
    """A ModelConfig from OpenCLIP's `model_cfg`; keys that would build another architecture are refused."""
    vision_in = model_cfg.get("vision_cfg") or {}
    text_in = model_cfg.get("text_cfg") or {}
    if not isinstance(vision_in, Mapping) or not isinstance(text_in, Mapping):
        raise CheckpointFormatError(f"{where}: 'model_cfg.vision_cfg' and 'model_cfg.text_cfg' must be objects")
    _check_neutral(vision_in, _VISION_DEFAULTS, where, "model_cfg.vision_cfg.")
    _check_neutral(text_in, _TEXT_DEFAULTS, where, "model_cfg.text_cfg.")
    top = {k: v for k, v in model_cfg.items() if k not in ("vision_cfg", "text_cfg", "embed_dim", "quick_gelu")}
    for key, value in top.items():
        allowed = _TOP_NEUTRAL.get(key, ())
        if value is not None and allowed is not None and value not in allowed:
            raise CheckpointFormatError(f"{where}: 'model_cfg.{key}' is {value!r}; clipforge cannot build it")
    v = {**_VISION_DEFAULTS, **{k: vision_in[k] for k in _VISION_DEFAULTS if k in vision_in}}
    t = {**_TEXT_DEFAULTS, **{k: text_in[k] for k in _TEXT_DEFAULTS if k in text_in}}
    try:
        resnet = isinstance(v["layers"], (list, tuple))
        pooled = int(v["width"]) * 32 if resnet else int(v["width"])
        if pooled % int(v["head_width"]):
            raise ValueError(f"vision head_width {v['head_width']} does not divide width {pooled}")
        vision = VisionConfig(
            image_size=int(v["image_size"]), layers=tuple(int(x) for x in v["layers"]) if resnet else int(v["layers"]),
            width=int(v["width"]), patch_size=None if resnet else int(v["patch_size"]),
            heads=pooled // int(v["head_width"]), mlp_ratio=float(v["mlp_ratio"]),
        )
        text = TextConfig(context_length=int(t["context_length"]), vocab_size=int(t["vocab_size"]),
                          width=int(t["width"]), heads=int(t["heads"]), layers=int(t["layers"]),
                          mlp_ratio=float(t["mlp_ratio"]))
        vision.validate("model_cfg.vision_cfg")
        text.validate("model_cfg.text_cfg")
        return ModelConfig(embed_dim=int(model_cfg.get("embed_dim", 512)), vision_cfg=vision, text_cfg=text,
                           quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise CheckpointFormatError(f"{where}: bad OpenCLIP model config ({exc})") from None


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sidecar_payload(cfg: ModelConfig, preprocess: PreprocessConfig, weights: Path) -> dict[str, Any]:
    """The sidecar for `weights` (already written): OpenCLIP's two sections plus clipforge's exact config."""
    return {
        "model_cfg": to_openclip(cfg),
        "preprocess_cfg": preprocess.to_openclip(),
        "clipforge": {
            "model_config": to_dict(cfg),
            "preprocess": preprocess.to_dict(),
            "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": _digest(weights)},
        },
    }


def read_sidecar(weights: Path) -> tuple[ModelConfig, PreprocessConfig] | None:
    """The architecture and preprocessing a sidecar beside `weights` carries; None without a sidecar. A
    sidecar written for other bytes (the weights were replaced after the export) is an error."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    data = read_json(path)
    where = str(path)
    ours = data.get("clipforge")
    if not isinstance(ours, Mapping) or not isinstance(ours.get("weights"), Mapping):
        raise CheckpointFormatError(f"{where}: not a clipforge sidecar (no 'clipforge.weights' section)")
    record = ours["weights"]
    size = weights.stat().st_size
    if record.get("bytes") != size or record.get("sha256") != _digest(weights):
        raise CheckpointFormatError(
            f"{where}: describes other bytes than {weights.name} ({record.get('bytes')} bytes recorded, {size} "
            "found): the weights were replaced after the export; delete the sidecar and name the architecture"
        )
    if not isinstance(ours.get("model_config"), Mapping):
        raise CheckpointFormatError(f"{where}: no 'clipforge.model_config' object")
    try:
        cfg = from_dict(ModelConfig, ours["model_config"], prefix="clipforge.model_config")
        preprocess = PreprocessConfig.from_dict(ours.get("preprocess") or {}, where)
    except ConfigError as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None
    return cfg, preprocess


def write_sidecar_text(cfg: ModelConfig, preprocess: PreprocessConfig, weights: Path) -> str:
    return json.dumps(sidecar_payload(cfg, preprocess, weights), indent=2) + "\n"
