"""Image and text embedding throughput of clipforge (PyTorch fp32 and bf16, ONNX Runtime fp32 and int8)
against Hugging Face transformers' CLIPModel and OpenCLIP's CLIP.

All models have the same architecture and weights (checked in fp32). Precisions: fp32, and bf16 weights
(clipforge: `speed.bf16_inference`, matmul weights in bf16 with LayerNorm and embeddings in fp32;
transformers and OpenCLIP: `model.to(torch.bfloat16)`, OpenCLIP's documented CPU fast path). The ONNX
graphs come from `clipforge.export.onnx_export.export_onnx` (int8: dynamic quantisation of MatMul/Gemm) and
run with as many ONNX Runtime threads as torch has; torchao's dynamic int8 (eager) is timed as the PyTorch
int8 path. OpenCLIP's model.py is loaded by file path (tests/clip_reference.py) and always gets 77-token rows,
since its text tower adds all 77 positional embeddings. Texts are timed twice: full-length token rows (both models
compute all 77 positions), and the synthetic world's short captions, which clipforge's tokenizer pads to 77
and the model cuts back to the longest caption, while transformers gets them padded to the longest caption
as its tokenizer's `padding=True` would give. Calls are interleaved and medians reported.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_inference.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from common import machine_note, median, random_images, random_tokens, time_interleaved, twin_models

from clipforge import get_tokenizer
from clipforge.data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld
from clipforge.speed import bf16_inference


def short_captions(count: int) -> list[str]:
    world = SyntheticWorld(SyntheticConfig())
    return [world.pair(STREAM_EVAL, i)[1] for i in range(count)]


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = float((got.float() - want.float()).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"clipforge and {name} features differ by {diff:.2e}")


def build_calls(name: str, image_batch: int, text_batch: int, onnx_dir: Path
                ) -> tuple[dict[str, Callable[[], None]], dict]:
    from clip_reference import openclip_clip  # noqa: PLC0415 - tests/ on the path: OpenCLIP by file path

    from clipforge.export.onnx_export import OnnxExportOptions, export_onnx  # noqa: PLC0415
    from clipforge.export.quantize import CostOptions  # noqa: PLC0415
    from clipforge.export.runtime import OnnxCLIP  # noqa: PLC0415

    cfg, ours, hf = twin_models(name)
    ours, hf = ours.eval(), hf.eval()
    openclip = openclip_clip(cfg)
    openclip.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, image_batch, gen)
    full = random_tokens(text_batch, cfg.text_cfg.context_length, gen)
    short = get_tokenizer(name)(short_captions(text_batch))  # [N, 77]
    longest = int(short.argmax(dim=-1).max()) + 1
    short_hf = short[:, :longest]  # what transformers' tokenizer gives with padding=True
    export_onnx(ours, onnx_dir, OnnxExportOptions(int8=True, cost=CostOptions(datasets=())))
    onnx = {"fp32": OnnxCLIP(onnx_dir, "fp32"), "int8": OnnxCLIP(onnx_dir, "int8")}
    with torch.inference_mode():
        theirs = hf.get_image_features(pixel_values=images[:2])
        want = ours.encode_image(images[:2])
        _check("transformers", getattr(theirs, "pooler_output", theirs), want)
        _check("OpenCLIP", openclip.encode_image(images[:2]), want)
        _check("ONNX", onnx["fp32"].encode_image(images[:2]), want)
    models = {"fp32": (ours, hf, openclip),
              "bf16-weights": (bf16_inference(copy.deepcopy(ours)), copy.deepcopy(hf).to(torch.bfloat16),
                               copy.deepcopy(openclip).to(torch.bfloat16))}
    calls: dict[str, Callable[[], None]] = {}
    for precision, (model, ref, oc) in models.items():
        dtype = torch.bfloat16 if precision != "fp32" else torch.float32
        px = images.to(dtype)
        calls[f"image clipforge {precision}"] = lambda m=model, px=px: m.encode_image(px)
        calls[f"image transformers {precision}"] = lambda r=ref, px=px: r.get_image_features(pixel_values=px)
        calls[f"image open_clip {precision}"] = lambda m=oc, px=px: m.encode_image(px)
        for label, ours_tokens, hf_tokens in (("text-full", full, full), ("text-short", short, short_hf)):
            calls[f"{label} clipforge {precision}"] = lambda m=model, t=ours_tokens: m.encode_text(t)
            calls[f"{label} transformers {precision}"] = lambda r=ref, t=hf_tokens: r.get_text_features(input_ids=t)
            calls[f"{label} open_clip {precision}"] = lambda m=oc, t=ours_tokens: m.encode_text(t)
    for precision, runtime in onnx.items():
        calls[f"image clipforge-onnx {precision}"] = lambda m=runtime: m.encode_image(images)
        for label, tokens in (("text-full", full), ("text-short", short)):
            calls[f"{label} clipforge-onnx {precision}"] = lambda m=runtime, t=tokens: m.encode_text(t)
    calls.update(torchao_calls(ours, images, full, short))
    info = {"model": name, "image_batch": image_batch, "text_batch": text_batch, "short_caption_tokens": longest}
    return calls, info


def torchao_calls(ours: torch.nn.Module, images: torch.Tensor, full: torch.Tensor, short: torch.Tensor
                  ) -> dict[str, Callable[[], None]]:
    """torchao's dynamic int8 (activations and weights) on every nn.Linear, eager: the PyTorch int8 path."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: PLC0415

    model = copy.deepcopy(ours)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return {"image clipforge-torchao int8": lambda: model.encode_image(images),
            "text-full clipforge-torchao int8": lambda: model.encode_text(full),
            "text-short clipforge-torchao int8": lambda: model.encode_text(short)}


def best_ratios(rates: dict[str, float]) -> dict[str, float]:
    """The targets: clipforge's best path vs OpenCLIP's best, and ONNX int8 vs ONNX fp32, per input kind."""
    out = {}
    for kind in ("image", "text-full", "text-short"):
        ours = max(v for k, v in rates.items() if k.startswith(f"{kind} clipforge"))
        theirs = max(v for k, v in rates.items() if k.startswith(f"{kind} open_clip"))
        out[f"{kind}: clipforge best / open_clip best (target >= 1.3)"] = ours / theirs
        out[f"{kind}: onnx int8 / onnx fp32 (target >= 1.5)"] = (
            rates[f"{kind} clipforge-onnx int8"] / rates[f"{kind} clipforge-onnx fp32"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_note(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        calls, info = build_calls(args.model, args.image_batch, args.text_batch, Path(tmp) / "onnx")
        with torch.inference_mode():
            times = time_interleaved(calls, args.repeats)
    secs = {k: median(v) for k, v in times.items()}
    print(f"\n{args.model}: {args.image_batch} images / {args.text_batch} texts per call, median of {args.repeats}; "
          f"short captions are {info['short_caption_tokens']} tokens at most")
    rates = {}
    for key, seconds in secs.items():
        count = args.image_batch if key.startswith("image") else args.text_batch
        rates[key] = count / seconds
        print(f"  {key:40s} {rates[key]:9.1f} per s")
    ratios = {}
    for kind in ("image", "text-full", "text-short"):
        for precision in ("fp32", "bf16-weights"):
            ratios[f"{kind} {precision}: clipforge / transformers"] = (
                rates[f"{kind} clipforge {precision}"] / rates[f"{kind} transformers {precision}"])
        for impl in ("clipforge", "transformers"):
            ratios[f"{kind} {impl}: bf16-weights / fp32"] = (
                rates[f"{kind} {impl} bf16-weights"] / rates[f"{kind} {impl} fp32"])
    ratios.update(best_ratios(rates))
    for label, ratio in ratios.items():
        print(f"  {label:66s} {ratio:5.2f}x")
    print(machine_note(args.threads))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"machine": machine_note(args.threads), **info, "per_s": rates, "ratios": ratios,
                       "all_seconds": times}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
