"""ONNX Runtime against PyTorch on real images and captions of mixed length: the export's parity report.

Images are drawn from the embedded synthetic world and, when the Debian package is installed, a few
openclipart drawings (palette and alpha PNGs, so the RGB conversion is exercised). Captions run from one word
to past the context length. Both towers are compared in batches of 1 and 7, the ONNX side getting each batch's
tokens cut to its longest caption (the dynamic sequence axis) and the PyTorch side the full padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .runtime import ExportError

OPENCLIPART_PNG = Path("/usr/share/openclipart/png")
BATCH_SIZES = (1, 7)
HAND_CAPTIONS = (
    "a",
    "a photo of a dog",
    "two small red circles and a large blue square on the left of a green triangle",
    "a very long caption " + "that keeps going and going " * 12,  # longer than any context: truncated
)


@dataclass(frozen=True)
class Tolerance:
    """What the fp32 graphs must meet on every sample: cosine to PyTorch, and the largest absolute difference
    relative to the largest feature value (fp32 reorderings of sums of ~width terms stay far below both)."""

    min_cosine: float = 0.99999
    max_rel_diff: float = 1e-4


def parity_images(image_size: int, count: int = 10, clipart: int = 4) -> list[Image.Image]:
    """`count` synthetic scenes (held-out stream) and up to `clipart` openclipart PNGs, as PIL images."""
    from ..data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld  # noqa: PLC0415

    world = SyntheticWorld(SyntheticConfig(image_size=max(image_size, 16)))
    images = [world.pair(STREAM_EVAL, i)[0] for i in range(count)]
    if OPENCLIPART_PNG.is_dir():
        files = sorted(p for p in OPENCLIPART_PNG.rglob("*.png") if p.stat().st_size < 2_000_000)
        step = max(1, len(files) // max(clipart, 1))
        for path in files[::step][:clipart]:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
    return images


def parity_captions(count: int = 10) -> list[str]:
    """Synthetic captions of the held-out stream plus hand-written ones from 1 word to past 77 tokens."""
    from ..data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld  # noqa: PLC0415

    world = SyntheticWorld(SyntheticConfig())
    return [*HAND_CAPTIONS, *(world.pair(STREAM_EVAL, 100 + i)[1] for i in range(count))]


def compare(reference: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[torch.Tensor], torch.Tensor],
            inputs: torch.Tensor, batch_sizes: Sequence[int] = BATCH_SIZES) -> dict[str, Any]:
    """Max abs difference, its ratio to the largest reference value and the min cosine of candidate vs
    reference features over `inputs` [N, ...] split into batches of each size."""
    worst_diff, worst_cos, largest = 0.0, 1.0, 0.0
    with torch.no_grad():
        for size in batch_sizes:
            for start in range(0, inputs.shape[0], size):
                ref = reference(inputs[start:start + size]).float()  # [b, D]
                got = candidate(inputs[start:start + size]).float()  # [b, D]
                worst_diff = max(worst_diff, float((ref - got).abs().max()))
                largest = max(largest, float(ref.abs().max()))
                worst_cos = min(worst_cos, float(F.cosine_similarity(ref, got, dim=-1).min()))
    return {"samples": int(inputs.shape[0]), "batch_sizes": list(batch_sizes), "max_abs_diff": worst_diff,
            "max_abs_feature": largest, "max_rel_diff": worst_diff / max(largest, 1e-30), "min_cosine": worst_cos}


def tower_parity(model: torch.nn.Module, onnx_model: Any, batch_sizes: Sequence[int] = BATCH_SIZES) -> dict[str, Any]:
    """{"visual": ..., "textual": ...}: `compare` of the ONNX model against the PyTorch one, per tower."""
    pixels = torch.stack([onnx_model.preprocess(image) for image in parity_images(onnx_model.image_size)])
    tokens = onnx_model.tokenizer(parity_captions())  # [N, context_length]
    real = tokens != onnx_model.pad_id
    lengths = sorted({int(real[i].nonzero().max()) + 1 for i in range(tokens.shape[0])})
    with torch.autocast("cpu", enabled=False):
        visual = compare(model.encode_image, onnx_model.encode_image, pixels, batch_sizes)
        textual = compare(model.encode_text, onnx_model.encode_text, tokens, batch_sizes)
    return {"visual": visual, "textual": {**textual, "token_lengths": lengths}}


def check_parity(report: dict[str, Any], tolerance: Tolerance) -> None:
    """Raise ExportError, saying by how much, when a tower misses the tolerance."""
    problems = []
    for tower in ("visual", "textual"):
        stats = report[tower]
        if not stats["min_cosine"] >= tolerance.min_cosine:
            problems.append(f"{tower} min cosine {stats['min_cosine']:.7f} is below {tolerance.min_cosine} "
                            f"by {tolerance.min_cosine - stats['min_cosine']:.2e}")
        if not stats["max_rel_diff"] <= tolerance.max_rel_diff:
            problems.append(f"{tower} max abs difference {stats['max_abs_diff']:.3e} is "
                            f"{stats['max_rel_diff']:.2e} of the largest feature, above {tolerance.max_rel_diff:.0e}"
                            f" by {stats['max_rel_diff'] - tolerance.max_rel_diff:.2e}")
    if problems:
        raise ExportError("ONNX Runtime and PyTorch disagree, export not written: " + "; ".join(problems))
