"""The one seam between embedding and the model runtime: `load_encoder(spec, backend, device, precision)`.

An encoder maps preprocessed pixels [B, 3, H, W] and caption strings to L2-normalised float32 features
[B, D] (numpy), and carries the model's fingerprint, preprocessing and spec, so that `embed` never touches
the model directly. Another runtime (ONNX) plugs in here as another class with the same three members.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..transforms import image_transform
from .errors import SearchError
from .fingerprint import model_fingerprint

__all__ = ["BACKENDS", "Encoder", "TorchEncoder", "load_encoder", "model_tokenizer", "resolve_device"]

BACKENDS = ("torch",)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder(Protocol):
    fingerprint: dict
    spec: str
    preprocess: Callable

    def encode_image(self, pixels: torch.Tensor) -> np.ndarray: ...

    def encode_text(self, texts: list[str]) -> np.ndarray: ...


def model_tokenizer(model: torch.nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """The model's own tokenizer (`tokenizer.tokenizer_for` its config): its Hugging Face tokenizer, or CLIP's
    BPE at the model's context length."""
    from ..tokenizer import BPETokenizer, tokenizer_for  # noqa: PLC0415

    config = getattr(model, "config", None)
    if config is not None:
        return tokenizer_for(config)
    return BPETokenizer(context_length=int(getattr(model, "context_length", 77)))


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """`requested`, or the GPU of this local rank when there is one, else the CPU (checks as `clipforge eval`)."""
    from ..eval.resolve import eval_device  # noqa: PLC0415

    if requested is None and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return eval_device(requested)


class TorchEncoder:
    """A clipforge CLIP in eval mode on `device`: bf16 weights for CPU bf16, autocast for GPU bf16/fp16."""

    def __init__(self, model: torch.nn.Module, spec: str, device: torch.device, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise SearchError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and device.type == "cpu":
            raise SearchError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.fingerprint = model_fingerprint(model)  # hashed once, from the fp32 weights
        self.model = model.to(device).eval()
        self.spec, self.device, self.precision = spec, device, precision
        # CPU bf16: bf16 matmul weights (the model's own bf16 fast paths) beat autocast's per-call casts
        self.input_dtype = torch.float32
        if precision == "bf16" and device.type == "cpu":
            from ..speed import bf16_inference  # noqa: PLC0415

            self.model, self.input_dtype = bf16_inference(self.model), torch.bfloat16
        self.preprocess = image_transform(int(model.config.vision_cfg.image_size))
        self.tokenizer = model_tokenizer(model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32" or self.input_dtype != torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        with self._autocast():
            features = self.model.encode_image(pixels.to(self.device, self.input_dtype, non_blocking=True))
        return _normalised(features)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return _normalised(features)


def _normalised(features: torch.Tensor) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (in float32 whatever the compute precision)."""
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def load_encoder(spec: str, backend: str = "torch", device: str | None = None, precision: str = "fp32",
                 local_rank: int = 0) -> Encoder:
    """The encoder for model `spec`: a checkpoint or model file `load_model` reads, a run directory, or an
    architecture name (random init, seed 0); resolved as `clipforge eval` resolves its model."""
    if backend not in BACKENDS:
        raise SearchError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    from ..eval.runner import resolve_model  # noqa: PLC0415

    target = resolve_device(device, local_rank)
    model, _ = resolve_model(spec)
    stored_spec = str(Path(spec).resolve()) if Path(spec).exists() else spec
    return TorchEncoder(model, stored_spec, target, precision)
