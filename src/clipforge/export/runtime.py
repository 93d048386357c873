"""Run an exported CLIP in ONNX Runtime with the torch model's interface.

`OnnxCLIP(folder)` reads what `clipforge export --to onnx` wrote (`visual.onnx`, `textual.onnx`, their int8
versions with `precision="int8"`, `preprocess.json`, `export.json` and the tokenizer files) and offers
`encode_image`, `encode_text`, `preprocess` and `tokenizer`, so evaluation, `embed` and `serve` take it
where they take a torch CLIP. `load_backend_model(backend, model)` is the one place that picks torch or ONNX.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import ConfigError

ONNX_EXTRA = 'pip install -e ".[onnx]"'
BACKENDS = ("torch", "onnx", "onnx-int8")
PRECISION_FILES = {"fp32": ("visual.onnx", "textual.onnx"), "int8": ("visual.int8.onnx", "textual.int8.onnx")}


class ExportError(ConfigError):
    """A problem with an export request, an export folder or an export's result; reported as one line."""


def require(module: str) -> Any:
    """Import one of the ONNX packages, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; ONNX export and inference need it: {ONNX_EXTRA}") from None


def session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for `path` with `threads` intra-op threads (default: torch's count)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def warn_if_int8_saturates(folder: Path, info: dict[str, Any]) -> None:
    """Warn when an export's int8 graphs have 8-bit weights (exports before 7 became the default have no "int8"
    entry and are 8-bit) and this CPU sums int8 products in int16, where they saturate and lose accuracy."""
    from ..speed import int8_pair_sums_saturate  # noqa: PLC0415

    bits = int(info.get("int8", {}).get("weight_bits", 8))
    if bits == 8 and int8_pair_sums_saturate():
        warnings.warn(f"{folder}: its int8 graphs have 8-bit weights, whose products saturate on this CPU (no VNNI "
                      "or AMX) and lose accuracy; re-export with `clipforge export --to onnx --int8` (7-bit weights)",
                      RuntimeWarning, stacklevel=3)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; is {path.parent} a folder written by `clipforge export --to onnx`?") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({exc})") from None


class JsonPreprocess:
    """The eval preprocessing that `preprocess.json` describes: RGB (alpha on white), resize the shorter side
    (bicubic), centre crop, scale to [0, 1], normalise by mean and std -> float tensor [3, S, S]."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.size = int(spec["image_size"])
        self.mean = tuple(float(v) for v in spec["mean"])
        self.std = tuple(float(v) for v in spec["std"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from ..transforms import center_crop, normalize, resize_shorter, to_rgb, to_tensor  # noqa: PLC0415

        image = center_crop(resize_shorter(to_rgb(image), self.size), self.size)
        return normalize(to_tensor(image), self.mean, self.std)


class OnnxCLIP:
    """An exported CLIP in ONNX Runtime: `encode_image(pixels [B, 3, S, S])` and `encode_text(ids [B, L])` ->
    float32 torch features [B, D], L2-normalised when `normalize=True`, like `CLIP.encode_*`."""

    def __init__(self, folder: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        self.folder = Path(folder)
        if precision not in PRECISION_FILES:
            raise ExportError(f"precision {precision!r}: expected one of {sorted(PRECISION_FILES)}")
        if not self.folder.is_dir():
            raise ExportError(f"{self.folder}: not an ONNX export folder (no such folder)")
        self.info = read_json(self.folder / "export.json")
        self.preprocess = JsonPreprocess(read_json(self.folder / "preprocess.json"))
        visual, textual = (self.folder / name for name in PRECISION_FILES[precision])
        for path in (visual, textual):
            if not path.is_file():
                hint = " (export with --int8)" if precision == "int8" else ""
                raise ExportError(f"{path}: missing{hint}")
        self.precision = precision
        if precision == "int8":
            warn_if_int8_saturates(self.folder, self.info)
        self.visual = session(visual, threads)
        self.textual = session(textual, threads)
        self.image_size = self.preprocess.size
        self.context_length = int(self.info["context_length"])
        self.text_kind = self.info["text"]  # "bpe": end-of-text pooling; "hf": attention mask
        self.pad_id = int(self.info["pad_id"])
        self._tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    @property
    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        """The model's tokenizer, read from the export folder: texts -> LongTensor [N, context_length]."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, self.info)
        return self._tokenizer

    def encode_image(self, images: torch.Tensor | np.ndarray, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, S, S] (already preprocessed) -> features [B, D]."""
        pixels = np.ascontiguousarray(_numpy(images), dtype=np.float32)
        features = torch.from_numpy(self.visual.run(None, {"pixel_values": pixels})[0])
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor | np.ndarray, normalize: bool = False) -> torch.Tensor:
        """tokens [B, L] as the tokenizer pads them -> features [B, D]; padding after the batch's longest text
        is dropped first, so short captions cost a short sequence."""
        ids = _numpy(tokens).astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"text tokens have shape {ids.shape}, expected [B, L] with L <= {self.context_length}")
        real = ids != self.pad_id  # [B, L]
        length = int(real.shape[1] - np.argmax(real[:, ::-1], axis=1).min()) if real.any() else 1
        ids = np.ascontiguousarray(ids[:, : max(length, 1)])  # [B, L']
        feeds = {"input_ids": ids}
        if self.text_kind == "hf":
            feeds["attention_mask"] = (ids != self.pad_id).astype(np.int64)
        features = torch.from_numpy(self.textual.run(None, feeds)[0])
        return F.normalize(features, dim=-1) if normalize else features


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor (bf16 pixels included, as float32) or array as a numpy array."""
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


def load_tokenizer(folder: Path, info: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer stored in an export folder: CLIP's BPE merges file or a Hugging Face tokenizer folder."""
    context = int(info["context_length"])
    if info["text"] == "hf":
        from ..models.hf_text import HFTokenizer  # noqa: PLC0415 - needs transformers

        return HFTokenizer(folder / "tokenizer", context)
    from ..tokenizer import BPETokenizer  # noqa: PLC0415

    return BPETokenizer(context_length=context, bpe_path=folder / "tokenizer" / info["bpe_file"])


def load_backend_model(backend: str, model: str, threads: int | None = None) -> Any:
    """What `embed`/`serve` encode with: a torch CLIP (`backend="torch"`, `model` any checkpoint load_model
    reads) or an `OnnxCLIP` (`"onnx"`, `"onnx-int8"`, `model` an export folder)."""
    if backend == "torch":
        from ..convert import load_model  # noqa: PLC0415

        return load_model(model).eval()
    if backend in ("onnx", "onnx-int8"):
        return OnnxCLIP(model, "int8" if backend == "onnx-int8" else "fp32", threads)
    raise ExportError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
