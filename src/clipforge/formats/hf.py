"""Hugging Face `CLIPModel` layout <-> clipforge/OpenAI layout, for weights and for `config.json`.

The two layouts hold the same numbers under different names, with three structural differences: HF keeps
separate q/k/v projections where we keep one packed `in_proj` (rows ordered q, k, v, as nn.MultiheadAttention);
HF's projections are `nn.Linear` weights, the transpose of our `proj`/`text_projection` matrices; and HF's
position tables are embedding weights where ours are plain parameters (same shape).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import torch

from ..models.config import ModelConfig, TextConfig, VisionConfig
from . import CheckpointFormatError

# Per-block renames (ours -> HF) inside `resblocks.N.` / `encoder.layers.N.`.
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOWERS = {
    "transformer.resblocks.": "text_model.encoder.layers.",
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
}
# Whole-tensor renames (ours -> HF).
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's name has this typo
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_HF_IGNORED = re.compile(r".*position_ids$")

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: `save_pretrained` may omit keys equal to them.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5}


def is_hf_layout(keys: Iterator[str] | list[str]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in keys)


def _rename_block(rest: str) -> str | None:
    for ours, hf in _BLOCK.items():
        if rest.startswith(hf + "."):
            return ours + rest[len(hf):]
    return None


def from_hf(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """HF CLIPModel tensors -> our names; q/k/v are packed into `in_proj_*`."""
    top = {hf: ours for ours, hf in _TOP.items()}
    transposed = {hf: ours for ours, hf in _TRANSPOSED.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in top:
            out[top[key]] = tensor
        elif key in transposed:
            out[transposed[key]] = tensor.t().contiguous()
        elif _HF_IGNORED.match(key):
            continue
        else:
            ours = _block_key_from_hf(key)
            if ours is None:
                raise CheckpointFormatError(f"{where}: unrecognised Hugging Face CLIP tensor '{key}'")
            name, _, proj = ours.partition("|")
            if proj:  # a q/k/v piece, packed below
                qkv.setdefault(name, {})[proj] = tensor
            else:
                out[name] = tensor
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointFormatError(f"{where}: '{name}' lacks one of its q/k/v projections")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # [3W, W] or [3W]
    return out


def _block_key_from_hf(key: str) -> str | None:
    for ours_prefix, hf_prefix in _TOWERS.items():
        if not key.startswith(hf_prefix):
            continue
        index, _, rest = key[len(hf_prefix):].partition(".")
        match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if match:  # "…attn.in_proj_weight|q": packed once all three pieces are seen
            return f"{ours_prefix}{index}.attn.in_proj_{match.group(2)}|{match.group(1)}"
        renamed = _rename_block(rest)
        return None if renamed is None else f"{ours_prefix}{index}.{renamed}"
    return None


def to_hf(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Our names -> HF CLIPModel tensors (the inverse of `from_hf`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = tensor.t().contiguous()
        else:
            prefix = next((p for p in _TOWERS if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointFormatError(f"{where}: tensor '{key}' has no Hugging Face CLIPModel counterpart")
            index, _, rest = key[len(prefix):].partition(".")
            hf_prefix = f"{_TOWERS[prefix]}{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, piece in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"{hf_prefix}self_attn.{name}_proj.{kind}"] = piece.contiguous()
                continue
            block = next((b for b in _BLOCK if rest.startswith(b + ".")), None)
            if block is None:
                raise CheckpointFormatError(f"{where}: tensor '{key}' has no Hugging Face CLIPModel counterpart")
            out[hf_prefix + _BLOCK[block] + rest[len(block):]] = tensor
    return out


def _act(name: str, where: str, key: str) -> bool:
    """HF activation name -> our quick_gelu flag."""
    if name == "quick_gelu":
        return True
    if name in ("gelu", "gelu_python"):  # erf GELU, as nn.GELU()
        return False
    raise CheckpointFormatError(f"{where}: '{key}' is {name!r}; only 'quick_gelu' and 'gelu' are supported")


def config_from_hf(data: Mapping[str, Any], where: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face CLIPModel `config.json`."""
    text = {**_TEXT_DEFAULTS, **(data.get("text_config") or {})}
    vision = {**_VISION_DEFAULTS, **(data.get("vision_config") or {})}
    for prefix, section in (("text_config", text), ("vision_config", vision)):
        if abs(float(section["layer_norm_eps"]) - 1e-5) > 1e-12:
            raise CheckpointFormatError(
                f"{where}: '{prefix}.layer_norm_eps' is {section['layer_norm_eps']}; 1e-5 is supported"
            )
    quick = _act(text["hidden_act"], where, "text_config.hidden_act")
    if _act(vision["hidden_act"], where, "vision_config.hidden_act") != quick:
        raise CheckpointFormatError(f"{where}: the text and vision towers use different activations")
    for prefix, section in (("text_config", text), ("vision_config", vision)):
        heads, width = section["num_attention_heads"], section["hidden_size"]
        if not (isinstance(heads, int) and isinstance(width, int) and heads > 0 and width > 0 and width % heads == 0):
            raise CheckpointFormatError(
                f"{where}: '{prefix}.num_attention_heads' is {heads!r}, which does not divide "
                f"'{prefix}.hidden_size' {width!r}; expected positive integers with hidden_size % heads == 0"
            )
    eos = text["eos_token_id"]
    if eos not in (2, text["vocab_size"] - 1):
        # Ours pools at argmax(token id); HF pools at the first eos. They agree only when eos is the largest id
        # (or when eos_token_id is the legacy 2, for which HF itself pools at the argmax).
        raise CheckpointFormatError(f"{where}: 'text_config.eos_token_id' {eos} is not the largest token id")
    return ModelConfig(
        embed_dim=int(data.get("projection_dim", 512)),
        vision_cfg=VisionConfig(
            image_size=int(vision["image_size"]), layers=int(vision["num_hidden_layers"]),
            width=int(vision["hidden_size"]), patch_size=int(vision["patch_size"]),
            heads=int(vision["num_attention_heads"]),
            mlp_ratio=int(vision["intermediate_size"]) / int(vision["hidden_size"]),
        ),
        text_cfg=TextConfig(
            context_length=int(text["max_position_embeddings"]), vocab_size=int(text["vocab_size"]),
            width=int(text["hidden_size"]), heads=int(text["num_attention_heads"]),
            layers=int(text["num_hidden_layers"]),
            mlp_ratio=int(text["intermediate_size"]) / int(text["hidden_size"]),
        ),
        quick_gelu=quick,
        init_logit_scale=float(data.get("logit_scale_init_value", 2.6592)),
    )


def config_to_hf(cfg: ModelConfig, where: str) -> dict[str, Any]:
    """A Hugging Face CLIPModel `config.json` for a ViT CLIP."""
    vision, text = cfg.vision_cfg, cfg.text_cfg
    if vision.is_resnet or vision.patch_size is None:
        raise CheckpointFormatError(f"{where}: Hugging Face CLIPModel has no ResNet image tower; export a ViT")
    if cfg.init_logit_bias is not None or text.hf_model_path is not None:
        raise CheckpointFormatError(f"{where}: Hugging Face CLIPModel has no logit bias or foreign text encoder")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio), "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads, "max_position_embeddings": text.context_length,
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
            # Our text tower pools at the largest token id, which HF reproduces when eos is that id.
            "bos_token_id": text.vocab_size - 2, "eos_token_id": text.vocab_size - 1, "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio), "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.num_heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
        },
    }
