"""`clipforge export --to onnx`: both towers as separate ONNX graphs, checked against PyTorch before they land.

The folder holds `visual.onnx` (pixel_values [B, 3, S, S] float32 -> image_features [B, D]), `textual.onnx`
(input_ids [B, L] int64, plus attention_mask [B, L] for Hugging Face text towers -> text_features [B, D]),
`preprocess.json`, the tokenizer under `tokenizer/`, `export.json` (what the graphs take and return) and
`parity.json`; with `--int8` also `visual.int8.onnx`, `textual.int8.onnx` and their measured accuracy cost.
Features are not normalised (as `encode_image`/`encode_text` with `normalize=False`).

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). On torch 2.13 it matched PyTorch to
~1e-6 on every family, while the TorchScript exporter with `dynamic_axes` returned wrong features for the
modified ResNet (max abs difference 1.8) and the Hugging Face text tower (0.25) at batch sizes other than the
traced one. Traps handled here: the end-of-text position is an argmax over the ids cast to int32 (ONNX
Runtime has no int64 ArgMax); the graphs are traced in fp32 without autocast, so attention runs through
`scaled_dot_product_attention`, never the bf16 explicit-matmul path; no data-dependent padding trim inside the
graph (the sequence axis is dynamic instead, and `OnnxCLIP` trims before calling it); towers whose weights
exceed protobuf's 2 GB limit are saved with external data (`<graph>.onnx.data`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_directory, atomic_write_text
from ..speed import int8_pair_sums_saturate
from .parity import Tolerance, check_parity, tower_parity
from .quantize import (
    DEFAULT_INT8_WEIGHT_BITS,
    INT8_WEIGHT_BITS,
    CostOptions,
    accuracy_cost,
    quantize_folder,
)
from .runtime import ExportError, OnnxCLIP, require

OPSETS = range(17, 24)  # LayerNormalization needs 17; ONNX Runtime 1.2x runs up to 23
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GB; keep a margin for the graph itself


@dataclass(frozen=True)
class OnnxExportOptions:
    opset: int = 18
    int8: bool = False
    int8_weight_bits: int = DEFAULT_INT8_WEIGHT_BITS  # 7 unless every CPU it runs on has VNNI/AMX (quantize.py)
    tolerance: Tolerance = field(default_factory=Tolerance)
    cost: CostOptions = field(default_factory=CostOptions)
    external_data_bytes: int = EXTERNAL_DATA_BYTES


def model_family(model: nn.Module) -> tuple[str, str]:
    """("vit" | "resnet", "bpe" | "hf"), or ExportError naming the tower that has no exporter."""
    from ..models.clip import CLIP  # noqa: PLC0415
    from ..models.hf_text import HFTextEncoder  # noqa: PLC0415
    from ..models.resnet import ModifiedResNet  # noqa: PLC0415
    from ..models.vision import VisionTransformer  # noqa: PLC0415

    families = {VisionTransformer: "vit", ModifiedResNet: "resnet"}
    visual = getattr(model, "visual", None)
    vision = families.get(type(visual))  # exact types: a subclass may compute something else
    if vision is None:
        raise ExportError(f"image tower {type(visual).__name__} has no ONNX exporter "
                          "(supported: VisionTransformer, ModifiedResNet)")
    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return vision, "hf"
    if type(model) is CLIP:
        return vision, "bpe"
    raise ExportError(f"model {type(model).__name__} has no ONNX exporter for its text tower "
                      "(supported: CLIP's text transformer, Hugging Face text encoders)")


class VisualGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)  # [B, D]


class BPETextGraph(nn.Module):
    """CLIP's text transformer pooled at the end-of-text token, for any sequence length L <= context."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.token_embedding, self.positional_embedding = model.token_embedding, model.positional_embedding
        self.transformer, self.ln_final, self.text_projection = model.transformer, model.ln_final, model.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        eot = input_ids.to(torch.int32).argmax(dim=-1)  # [B]: end-of-text has the highest id; int32 for ORT
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]  # [B, L, W]
        x = self.transformer(x, causal=True, positions=eot)  # [B, W]
        return self.ln_final(x) @ self.text_projection  # [B, D]


class HFTextGraph(nn.Module):
    """A Hugging Face encoder pooled over the attention mask, then projected."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text.proj(self.text.pool(input_ids, attention_mask))  # [B, D]


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(module: nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, dict[int, Any]],
                 path: Path, opset: int, external: bool) -> None:
    """Trace `module` on `example` inputs with the dynamo exporter and save it to `path`."""
    output = "image_features" if "pixel_values" in example else "text_features"
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        program = torch.onnx.export(module.eval(), (), kwargs=example, input_names=list(example), output_names=[output],
                                    dynamo=True, opset_version=opset, dynamic_shapes=dynamic, verbose=False)
    program.save(str(path), external_data=external)


def write_graphs(model: nn.Module, folder: Path, text_kind: str, opts: OnnxExportOptions) -> bool:
    """visual.onnx and textual.onnx; returns whether either needed external data."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    size = model.image_size
    external_visual = _weight_bytes(model.visual) > opts.external_data_bytes
    export_graph(VisualGraph(model), {"pixel_values": torch.randn(2, 3, size, size)},
                 {"pixel_values": {0: batch}}, folder / "visual.onnx", opts.opset, external_visual)
    context = model.context_length
    length = torch.export.Dim("length", min=2, max=context)
    ids = torch.randint(1, 1000, (2, min(context, 8)))  # [2, L]
    if text_kind == "hf":
        graph: nn.Module = HFTextGraph(model)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        dynamic = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    else:
        graph = BPETextGraph(model)
        example, dynamic = {"input_ids": ids}, {"input_ids": {0: batch, 1: length}}
    text_weights = _weight_bytes(graph)
    external_text = text_weights > opts.external_data_bytes
    export_graph(graph, example, dynamic, folder / "textual.onnx", opts.opset, external_text)
    return external_visual or external_text


def preprocess_spec(image_size: int) -> dict[str, Any]:
    """What `transforms.EvalTransform` does, as data for other runtimes."""
    from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: PLC0415

    return {"image_size": image_size, "input": "pixel_values", "layout": "NCHW", "dtype": "float32",
            "channel_order": "RGB",
            "convert": "palette images to RGBA first; RGBA, LA and images with a transparency key are "
                       "alpha-composited on white; any other mode converted to RGB",
            "resize": "shorter side to image_size, aspect kept (new long side truncated to an integer)",
            "interpolation": "bicubic (PIL Image.Resampling.BICUBIC)",
            "crop": "center crop image_size x image_size, offsets round((side - image_size) / 2)",
            "scale": "uint8 / 255", "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
            "normalize": "(x - mean) / std per channel"}


def write_tokenizer(model: nn.Module, folder: Path, text_kind: str) -> dict[str, Any]:
    """The tokenizer files under folder/tokenizer; returns what export.json records about them."""
    target = folder / "tokenizer"
    target.mkdir()
    if text_kind == "hf":
        from ..models.hf_text import resolve_folder  # noqa: PLC0415

        model.tokenizer().tokenizer.save_pretrained(str(target))
        shutil.copyfile(resolve_folder(model.config.text_cfg.hf_model_path) / "config.json", target / "config.json")
        return {"pad_id": model.text.pad_id}
    from ..tokenizer import default_bpe_path  # noqa: PLC0415

    bpe = default_bpe_path()
    shutil.copyfile(bpe, target / bpe.name)
    return {"pad_id": 0, "bpe_file": bpe.name, "sot_id": 49406, "eot_id": 49407}


def _logit_bias(model: nn.Module) -> float | None:
    """The sigmoid-loss bias added to the scaled cosines (None for softmax CLIPs), for zero-shot users."""
    bias = getattr(model, "logit_bias", None)
    return None if bias is None else float(bias.detach())


def check_writable(output: Path) -> None:
    """Fail before the slow part when the output folder cannot be created."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.probe"):
            pass
    except OSError as exc:
        raise ExportError(f"--output {output}: cannot write there ({exc.strerror or exc})") from None
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output}: exists and is not a folder")


def export_onnx(model: nn.Module, output: str | Path, opts: OnnxExportOptions | None = None) -> dict[str, Any]:
    """Export `model` to the folder `output`; returns the parity report (also written as parity.json).

    The folder appears only if both fp32 graphs meet `opts.tolerance`; otherwise ExportError says by how much.
    """
    opts = opts or OnnxExportOptions()
    vision, text_kind = model_family(model)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    if opts.opset not in OPSETS:
        raise ExportError(f"--opset {opts.opset}: expected {OPSETS.start} to {OPSETS.stop - 1}")
    if opts.int8_weight_bits not in INT8_WEIGHT_BITS:
        raise ExportError(f"--int8-weight-bits {opts.int8_weight_bits}: expected one of {INT8_WEIGHT_BITS}")
    output = Path(output)
    check_writable(output)
    model = model.float().eval()
    with atomic_directory(output) as tmp:
        external = write_graphs(model, tmp, text_kind, opts)
        atomic_write_text(tmp / "preprocess.json", json.dumps(preprocess_spec(model.image_size), indent=2))
        info = {"format": "clipforge-onnx", "vision": vision, "text": text_kind, "image_size": model.image_size,
                "context_length": model.context_length, "embed_dim": model.config.embed_dim,
                "logit_scale": float(model.logit_scale.detach().exp()), "logit_bias": _logit_bias(model),
                "opset": opts.opset, "external_data": external,
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "features": "not normalised: L2-normalise both sides before the dot product",
                **write_tokenizer(model, tmp, text_kind)}
        if opts.int8:
            info["int8"] = {"weight_bits": opts.int8_weight_bits, "weights": "symmetric, per output channel",
                            "activations": "uint8, per tensor, quantised at run time"}
        atomic_write_text(tmp / "export.json", json.dumps(info, indent=2))
        report: dict[str, Any] = {"tolerance": vars(opts.tolerance), "fp32": tower_parity(model, OnnxCLIP(tmp))}
        check_parity(report["fp32"], opts.tolerance)
        if opts.int8:
            quantize_folder(tmp, external, opts.int8_weight_bits)
            with warnings.catch_warnings():  # said once below, naming the output rather than the temporary folder
                warnings.filterwarnings("ignore", message=".*8-bit weights", category=RuntimeWarning)
                report["int8"] = tower_parity(model, OnnxCLIP(tmp, "int8"))
                report["int8_accuracy"] = accuracy_cost(model, tmp, opts.cost)
            if opts.int8_weight_bits == 8 and int8_pair_sums_saturate():
                warnings.warn(f"{output}: --int8-weight-bits 8 on a CPU without VNNI or AMX: the int8 parity and "
                              "accuracy measured here include int16 saturation that CPUs with them do not have",
                              RuntimeWarning, stacklevel=2)
        atomic_write_text(tmp / "parity.json", json.dumps(report, indent=2))
    return report


def summary(output: str | Path, report: dict[str, Any]) -> str:
    """One line for the command line: where the export went and how close each graph is to PyTorch."""
    def towers(part: dict[str, Any]) -> str:
        return ", ".join(f"{t} max abs diff {part[t]['max_abs_diff']:.1e} (min cosine {part[t]['min_cosine']:.6f})"
                         for t in ("visual", "textual"))

    line = f"Wrote ONNX export to {output}: fp32 {towers(report['fp32'])}"
    if "int8" in report:
        line += f"; int8 {towers(report['int8'])}; {report['int8_accuracy']['verdict']}"
    return line + f". Report: {Path(output) / 'parity.json'}"
