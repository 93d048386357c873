"""The architecture of a CLIP state dict (OpenAI/clipforge names), read from its tensor shapes.

Shapes determine the widths, depths, patch size, resolution, context length, vocabulary and embedding size.
They do not determine the number of attention heads or the activation; those come from a config stored in
the file, from the `expected` config the caller names, or from OpenAI's conventions (heads = width / 64).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch

from ..models.config import ModelConfig, TextConfig, VisionConfig
from . import CheckpointFormatError

# Keys whose values describe initialisation only; a loaded tensor overrides them, so they never mismatch.
_INIT_ONLY = {"init_logit_scale"}


def _block_count(state_dict: Mapping[str, torch.Tensor], prefix: str, where: str) -> int:
    """Number of blocks `prefix<i>.` in the state dict, checking that the indices are 0..n-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise CheckpointFormatError(f"{where}: blocks '{prefix}N' are not numbered 0..{len(indices) - 1}")
    return len(indices)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointFormatError(f"{where}: missing tensor '{key}', which every CLIP of this kind has")
    return tuple(state_dict[key].shape)


def _vision_facts(sd: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    if "visual.attnpool.positional_embedding" in sd:  # modified ResNet
        positions = _shape(sd, "visual.attnpool.positional_embedding", where)[0]
        grid = round((positions - 1) ** 0.5)
        if grid * grid + 1 != positions:
            raise CheckpointFormatError(f"{where}: 'visual.attnpool.positional_embedding' has {positions} rows")
        depths = tuple(_block_count(sd, f"visual.layer{i}.", where) for i in range(1, 5))
        return {
            "vision_cfg.layers": depths,
            "vision_cfg.width": _shape(sd, "visual.layer1.0.conv1.weight", where)[0],
            "vision_cfg.image_size": grid * 32,
            "embed_dim": _shape(sd, "visual.attnpool.c_proj.weight", where)[0],
        }
    width, _, patch, _ = _shape(sd, "visual.conv1.weight", where)
    positions = _shape(sd, "visual.positional_embedding", where)[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointFormatError(f"{where}: 'visual.positional_embedding' has {positions} rows, not grid^2 + 1")
    return {
        "vision_cfg.layers": _block_count(sd, "visual.transformer.resblocks.", where),
        "vision_cfg.width": width,
        "vision_cfg.patch_size": patch,
        "vision_cfg.image_size": grid * patch,
        "vision_cfg.mlp_ratio": _shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", where)[0] / width,
        "embed_dim": _shape(sd, "visual.proj", where)[1],
    }


def shape_facts(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Config values fixed by the tensor shapes, by dotted key (`vision_cfg.width`, `text_cfg.layers`, …)."""
    facts = _vision_facts(state_dict, where)
    context_length, width = _shape(state_dict, "positional_embedding", where)
    text_embed = _shape(state_dict, "text_projection", where)[1]
    if text_embed != facts["embed_dim"]:
        raise CheckpointFormatError(
            f"{where}: the image tower projects to {facts['embed_dim']} dims but 'text_projection' to {text_embed}"
        )
    fc = _shape(state_dict, "transformer.resblocks.0.mlp.c_fc.weight", where)[0]
    facts.update(
        {
            "text_cfg.context_length": context_length,
            "text_cfg.vocab_size": _shape(state_dict, "token_embedding.weight", where)[0],
            "text_cfg.width": width,
            "text_cfg.layers": _block_count(state_dict, "transformer.resblocks.", where),
            "text_cfg.mlp_ratio": fc / width,
            "init_logit_bias": "logit_bias" in state_dict,
        }
    )
    return facts


def flatten(cfg: ModelConfig) -> dict[str, Any]:
    """`{"embed_dim": 512, "vision_cfg.width": 768, …}` with tuples kept as tuples."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value

    walk(cfg, "")
    out["vision_cfg.heads"] = cfg.vision_cfg.num_heads  # None means the default count: compare the count
    out["init_logit_bias"] = cfg.init_logit_bias is not None  # only its presence is a property of a file
    for key in _INIT_ONLY:
        out.pop(key, None)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) < 1e-6
    return a == b


def check_consistent(found: Mapping[str, Any], wanted: Mapping[str, Any], where: str, label: str) -> None:
    """Raise naming the first key whose value in the checkpoint differs from `wanted` (described by `label`)."""
    for key, value in found.items():
        if key in wanted and not _same(value, wanted[key]):
            shown = list(value) if isinstance(value, tuple) else value
            want = list(wanted[key]) if isinstance(wanted[key], tuple) else wanted[key]
            raise CheckpointFormatError(f"{where}: '{key}' is {shown!r} in the checkpoint but {want!r} in {label}")


def config_from_facts(facts: Mapping[str, Any], quick_gelu: bool, logit_bias: float | None) -> ModelConfig:
    """A ModelConfig from shape facts, with OpenAI's conventions for what shapes cannot tell."""
    vision: dict[str, Any] = {k.split(".", 1)[1]: v for k, v in facts.items() if k.startswith("vision_cfg.")}
    text: dict[str, Any] = {k.split(".", 1)[1]: v for k, v in facts.items() if k.startswith("text_cfg.")}
    if isinstance(vision["layers"], tuple):
        vision["patch_size"] = None  # heads default to 32 * width / 64 (VisionConfig.num_heads)
    else:
        vision["heads"] = max(1, vision["width"] // 64)
    text["heads"] = max(1, text["width"] // 64)
    cfg = ModelConfig(
        embed_dim=facts["embed_dim"],
        vision_cfg=VisionConfig(**vision),
        text_cfg=TextConfig(**text),
        quick_gelu=quick_gelu,
        init_logit_bias=logit_bias if facts.get("init_logit_bias") else None,
    )
    cfg.vision_cfg.validate("vision_cfg")
    cfg.text_cfg.validate("text_cfg")
    return cfg

