"""The one seam between embedding and the model runtime: `load_encoder(spec, backend, device, precision)`.

An encoder maps preprocessed pixels [B, 3, H, W] and caption strings to L2-normalised float32 features
[B, D] (numpy), and carries the model's fingerprint, preprocessing, tokenizer and spec, so that `embed` and
`Searcher` never touch the model directly. Backends: `torch` (a clipforge CLIP, `TorchEncoder`) and `onnx` /
`onnx-int8` (a folder written by `clipforge export --to onnx [--int8]` run by ONNX Runtime on the CPU,
`OnnxEncoder`: the export's own preprocess.json and tokenizer files, so its inputs are the torch path's).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..speed import bf16_inference, bf16_supported, channels_last
from ..transforms import image_transform
from .errors import SearchError
from .fingerprint import model_fingerprint, onnx_fingerprint

__all__ = ["BACKENDS", "Encoder", "OnnxEncoder", "TorchEncoder", "load_encoder", "model_tokenizer", "resolve_device"]

BACKENDS = ("torch", "onnx", "onnx-int8")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder(Protocol):
    fingerprint: dict
    spec: str
    backend: str
    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    logit_scale: float  # the multiplier of the cosine similarities (exp of the model's parameter)
    logit_bias: float | None

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
        self.backend = "torch"
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().float())
        self.model = model.to(device).eval()
        channels_last(self.model)  # ResNet towers: NHWC convolutions (a no-op for ViTs)
        self.spec, self.device, self.precision = spec, device, precision
        # CPU bf16: bf16 matmul weights (the model's own bf16 fast paths) beat autocast's per-call casts
        self.input_dtype = torch.float32
        if precision == "bf16" and device.type == "cpu":
            if not bf16_supported(device):
                # an explicit request is honoured (the embeddings record their precision), but said to be slow
                warnings.warn("--precision bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), so bf16 runs "
                              "emulated and slower than fp32; use --precision fp32 here", RuntimeWarning, stacklevel=2)
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


class OnnxEncoder:
    """An export folder in ONNX Runtime (CPU): fp32 graphs for `onnx`, int8 ones for `onnx-int8`."""

    def __init__(self, folder: Path, backend: str, spec: str) -> None:
        from ..export.runtime import PRECISION_FILES, ExportError, OnnxCLIP, require  # noqa: PLC0415

        self.precision = "int8" if backend == "onnx-int8" else "fp32"
        graphs = PRECISION_FILES[self.precision]
        check_export_folder(folder, backend, graphs)
        try:
            require("onnxruntime")
            self.model = OnnxCLIP(folder, self.precision)
            self.tokenizer = self.model.tokenizer
        except ExportError as exc:
            raise SearchError(str(exc)) from None
        info = self.model.info
        self.fingerprint = onnx_fingerprint(folder, backend, graphs, info)
        self.spec, self.backend, self.device = spec, backend, torch.device("cpu")
        self.preprocess = self.model.preprocess
        self.logit_scale = float(info["logit_scale"])
        self.logit_bias = None if info.get("logit_bias") is None else float(info["logit_bias"])

    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        return self.model.encode_image(pixels, normalize=True).numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(texts), normalize=True).numpy()


def check_export_folder(folder: Path, backend: str, graphs: tuple[str, ...]) -> None:
    """One line naming what `backend` needs from `folder` and the command that makes it, when it is missing."""
    command = "clipforge export --to onnx" + (" --int8" if backend == "onnx-int8" else "")
    if not (folder / "export.json").is_file():
        what = "a file" if folder.is_file() else "no such folder" if not folder.exists() else "no export.json"
        raise SearchError(f"--backend {backend} needs an ONNX export folder as --model, got {folder} ({what}); "
                          f"run {command} --model MODEL --output DIR and pass DIR")
    for name in ("preprocess.json", *graphs):
        if not (folder / name).is_file():
            raise SearchError(f"--backend {backend} needs {folder / name}; run {command} --model MODEL "
                              f"--output {folder}")


def load_encoder(spec: str, backend: str = "torch", device: str | None = None, precision: str = "fp32",
                 local_rank: int = 0) -> Encoder:
    """The encoder for model `spec` run by `backend`. torch: a checkpoint or model file `load_model` reads, a
    run directory, or an architecture name (random init, seed 0), resolved as `clipforge eval` resolves its
    model. onnx / onnx-int8: a folder written by `clipforge export --to onnx` (with `--int8` for onnx-int8),
    run on the CPU in fp32 (the int8 graphs: int8 weights)."""
    if backend not in BACKENDS:
        raise SearchError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    stored_spec = str(Path(spec).resolve()) if Path(spec).exists() else spec
    if backend != "torch":
        if precision != "fp32":
            raise SearchError(f"--precision {precision} applies to --backend torch; --backend {backend} sets its "
                              "own (onnx: fp32, onnx-int8: int8 weights)")
        if device is not None and str(device).split(":")[0] != "cpu":
            raise SearchError(f"--backend {backend} runs on the CPU (ONNX Runtime's CPU provider), not {device}")
        return OnnxEncoder(Path(spec), backend, stored_spec)
    from ..eval.runner import resolve_model  # noqa: PLC0415

    target = resolve_device(device, local_rank)
    model, _ = resolve_model(spec)
    return TorchEncoder(model, stored_spec, target, precision)
