"""int8 graphs and what they cost: ONNX Runtime dynamic quantisation, measured on held-out and real splits.

`quantize_folder` writes `visual.int8.onnx` and `textual.int8.onnx`: the weights of every MatMul/Gemm whose
second input is a constant are stored as int8 (per output channel), activations are quantised on the fly
per tensor (uint8). The weights use 7 bits by default: on x86 CPUs without VNNI or AMX, ONNX Runtime adds
pairs of uint8 x int8 products in int16, which 8-bit weights overflow (clamped: on an AVX2-only AMD EPYC a
trained ViT-Micro's int8 text features fell to min cosine 0.985 of PyTorch's, 0.9998 with 7 bits), and an export
may run on any CPU; 8 bits are for graphs that only run on CPUs with VNNI or AMX (`speed.int8_pair_sums_saturate`).
Attention's activation-by-activation products stay fp32 (`MatMulConstBOnly`): they hold
no weights to shrink and quantising both sides costs accuracy. Convolutions stay fp32 (ONNX Runtime's
ConvInteger is slower than its fp32 convolution), so ResNet image towers gain little.

`accuracy_cost` scores PyTorch fp32 and bf16 weights, ONNX fp32 and ONNX int8 side by side with the evaluation package's own
functions: zero-shot top-1 and retrieval R@1 on the synthetic held-out split and on every prepared real
test split (openclipart, emoji).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .runtime import OnnxCLIP, PRECISION_FILES, require

REAL_DATASETS = ("openclipart", "emoji")
INT8_WEIGHT_BITS = (7, 8)
DEFAULT_INT8_WEIGHT_BITS = 7  # exact on every x86 CPU; see the module docstring
MAX_R1_COST_POINTS = 1.0  # int8 that loses more retrieval R@1 than this on a real split is not the default


@dataclass(frozen=True)
class CostOptions:
    """Which splits measure the int8 cost and how much of them."""

    datasets: tuple[str, ...] = ("synthetic", *REAL_DATASETS)  # real ones only when prepared
    per_class: int = 20  # synthetic zero-shot images per class
    pairs: int = 1000  # synthetic retrieval pairs
    limit: int | None = None  # at most this many images per real split
    root: str | None = None  # data root of the offline datasets


def quantize_folder(folder: Path, external_data: bool = False,
                    weight_bits: int = DEFAULT_INT8_WEIGHT_BITS) -> None:
    """Write the int8 versions of both graphs of an export folder beside the fp32 ones, with weights of
    `weight_bits` (7: in [-64, 64]; 8: in [-127, 127]; symmetric, one scale per output channel); `export_onnx`
    checks it against INT8_WEIGHT_BITS before any work."""
    quantization = require("onnxruntime.quantization")
    for source, target in zip(PRECISION_FILES["fp32"], PRECISION_FILES["int8"]):
        quantization.quantize_dynamic(
            folder / source, folder / target, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
            weight_type=quantization.QuantType.QInt8, reduce_range=weight_bits == 7,
            use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})


def _sources(opts: CostOptions, image_size: int) -> list[tuple[str, Any]]:
    from ..data import offline  # noqa: PLC0415
    from ..eval.tasks import SourceOptions, open_source  # noqa: PLC0415

    out = []
    for name in opts.datasets:
        if name != "synthetic" and not offline.is_prepared(name, opts.root):
            continue
        source_opts = SourceOptions(per_class=opts.per_class, pairs=opts.pairs, root=opts.root,
                                    limit=None if name == "synthetic" else opts.limit)
        out.append((name, open_source(name, image_size, source_opts)))
    return out


def _collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, list[Any]]:
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


@torch.no_grad()
def _image_features(encoders: dict[str, Any], dataset: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Normalised image features [N, D] per encoder, decoding each image once, and the items' targets."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    targets: list[Any] = []
    for pixels, batch_targets in DataLoader(dataset, batch_size=64, collate_fn=_collate):  # [b, 3, S, S]
        targets.extend(batch_targets)
        for name, encoder in encoders.items():
            chunks[name].append(encoder.encode_image(pixels, normalize=True).float())
    return {name: torch.cat(parts) for name, parts in chunks.items()}, targets


def score_split(encoders: dict[str, Any], tokenizer: Any, source: Any) -> tuple[dict[str, dict[str, float]], int]:
    """({encoder: {zeroshot_acc1, image_retrieval_R@1, text_retrieval_R@1}}, retrieval images) on one source's
    test split."""
    from ..data.base import DatasetError  # noqa: PLC0415
    from ..eval.features import encode_texts  # noqa: PLC0415
    from ..eval.metrics import classification_metrics, retrieval_metrics  # noqa: PLC0415
    from ..eval.zeroshot import build_classifier  # noqa: PLC0415

    scores: dict[str, dict[str, float]] = {name: {} for name in encoders}
    try:
        labelled = source.labelled("test")
    except DatasetError:  # a caption corpus without classes: retrieval only
        labelled = None
    if labelled is not None:
        features, targets = _image_features(encoders, labelled.dataset)
        labels = torch.as_tensor([int(t) for t in targets])
        for name, encoder in encoders.items():
            classifier = build_classifier(encoder, tokenizer, labelled.prompts, labelled.templates, device="cpu")
            scores[name]["zeroshot_acc1"] = classification_metrics(features[name] @ classifier, labels)["acc1"]
    captioned = source.captioned("test")
    features, _ = _image_features(encoders, captioned.dataset)
    for name, encoder in encoders.items():
        texts = encode_texts(encoder, tokenizer, captioned.texts, device="cpu")
        recall = retrieval_metrics(features[name], texts, captioned.text_to_image, ks=(1,))
        scores[name]["image_retrieval_R@1"] = recall["image_retrieval_recall@1"]
        scores[name]["text_retrieval_R@1"] = recall["text_retrieval_recall@1"]
    return scores, len(captioned.dataset)


def int8_verdict(splits: dict[str, dict[str, Any]], images: dict[str, int]) -> dict[str, Any]:
    """Whether int8 may be the default, from each split's scores ({encoder: metrics} with "int8_cost_points"):
    only real splits count (not "synthetic"), and int8 is not recommended when it loses more than
    MAX_R1_COST_POINTS of retrieval R@1 (either direction) on any of them. `images`: retrieval images per split,
    to flag a model within 5x of chance (1 / images), whose int8 cost says little."""
    real = [name for name in splits if name != "synthetic"]
    worst = max([0.0, *(v for name in real for k, v in splits[name]["int8_cost_points"].items() if "R@1" in k)])
    near_chance = [name for name in real if splits[name]["onnx-fp32"]["image_retrieval_R@1"] < 5.0 / images[name]]
    if not real:
        verdict = "no real split is prepared (clipforge data prepare openclipart): int8 cost measured on synthetic only"
    elif worst > MAX_R1_COST_POINTS:
        verdict = (f"int8 costs {worst:.1f} points of R@1 on a real split ({', '.join(real)}), more than "
                   f"{MAX_R1_COST_POINTS:g}: keep fp32 as the default")
    else:
        verdict = f"int8 costs at most {worst:.1f} points of R@1 on {', '.join(real)}: acceptable"
    if near_chance:
        verdict += (f" (but the model is within 5x of chance on {', '.join(near_chance)}: its cost there says "
                    "little about a model trained for that data)")
    return {"real_splits": real, "worst_real_R@1_cost_points": worst if real else None,
            "int8_recommended": bool(real) and worst <= MAX_R1_COST_POINTS, "verdict": verdict}


def accuracy_cost(model: torch.nn.Module, folder: Path, opts: CostOptions) -> dict[str, Any]:
    """PyTorch fp32 and bf16 vs ONNX fp32 and int8 on each split, the int8 cost in points, and whether int8 may be
    the default (`int8_verdict`)."""
    from ..speed import bf16_inference  # noqa: PLC0415

    encoders = {"torch-fp32": model, "torch-bf16": bf16_inference(copy.deepcopy(model)),
                "onnx-fp32": OnnxCLIP(folder, "fp32"), "onnx-int8": OnnxCLIP(folder, "int8")}
    tokenizer = encoders["onnx-fp32"].tokenizer
    splits: dict[str, dict[str, Any]] = {}
    images: dict[str, int] = {}
    for name, source in _sources(opts, encoders["onnx-fp32"].image_size):
        scores, images[name] = score_split(encoders, tokenizer, source)
        cost = {metric: 100.0 * (scores["onnx-fp32"][metric] - scores["onnx-int8"][metric])
                for metric in scores["onnx-fp32"]}
        splits[name] = {**scores, "int8_cost_points": cost}
    return {"splits": splits, **int8_verdict(splits, images)}
