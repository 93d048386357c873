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

Images also get clipforge's compiled paths (`--compile`: torch.compile with Inductor, `freezing` and
`max_autotune` as `COMPILE_VARIANTS` says) and, with `--sdpa`, bf16 with PyTorch's fused attention kernel; each
image path prints its MFU (model FLOPs per image x images/s over the matmul peak of its precision measured in
the same process on the same threads) and the largest difference of its normalised features from clipforge's
eager fp32 features.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_inference.py --threads 1
    # images only, every compiled variant and the fused-attention lever, no ONNX / torchao:
    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_inference.py --threads 1 \
        --kinds image --paths torch --compile compiled,compiled-frozen,autotuned-frozen \
        --compile-precisions bf16-weights --sdpa --output docs/benchmarks/inference-avx512-1thread.json
    # a CPU without native bf16 (AVX2 only), where bf16 is emulated: fp32 paths only
    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_inference.py --threads 2 \
        --precisions fp32 --paths torch,onnx --output docs/benchmarks/inference-avx2-2thread-fp32.json
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
import torch.nn.functional as F

from common import (PeakMeter, format_ratio, hardware_note, image_forward_flops, median, random_images, random_tokens,
                    round_ratios, sdpa_attention, time_interleaved, twin_models, write_atomic)

from clipforge import get_model_config, get_tokenizer
from clipforge.data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld
from clipforge.speed import bf16_inference


def short_captions(count: int) -> list[str]:
    world = SyntheticWorld(SyntheticConfig())
    return [world.pair(STREAM_EVAL, i)[1] for i in range(count)]


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = float((got.float() - want.float()).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"clipforge and {name} features differ by {diff:.2e}")


COMPILE_VARIANTS = {  # torch.compile (Inductor) options of the compiled clipforge image paths
    "compiled": {},
    "compiled-frozen": {"freezing": True},  # weights become constants: folded, pre-packed for oneDNN
    "autotuned-frozen": {"freezing": True, "max_autotune": True},  # and GEMM templates benchmarked per shape
}


def reference_models(name: str, images: torch.Tensor, onnx_dir: Path | None):
    """(cfg, clipforge, transformers, OpenCLIP, ONNX runtimes or {}), all with clipforge's weights (checked)."""
    from clip_reference import openclip_clip  # noqa: PLC0415 - tests/ on the path: OpenCLIP by file path

    cfg, ours, hf = twin_models(name)
    ours, hf = ours.eval(), hf.eval()
    openclip = openclip_clip(cfg)
    openclip.load_state_dict(ours.state_dict())
    onnx = {}
    if onnx_dir is not None:
        from clipforge.export.onnx_export import OnnxExportOptions, export_onnx  # noqa: PLC0415
        from clipforge.export.quantize import CostOptions  # noqa: PLC0415
        from clipforge.export.runtime import OnnxCLIP  # noqa: PLC0415

        export_onnx(ours, onnx_dir, OnnxExportOptions(int8=True, cost=CostOptions(datasets=())))
        onnx = {"fp32": OnnxCLIP(onnx_dir, "fp32"), "int8": OnnxCLIP(onnx_dir, "int8")}
    with torch.inference_mode():
        theirs = hf.get_image_features(pixel_values=images[:2])
        want = ours.encode_image(images[:2])
        _check("transformers", getattr(theirs, "pooler_output", theirs), want)
        _check("OpenCLIP", openclip.encode_image(images[:2]), want)
        if onnx:
            _check("ONNX", onnx["fp32"].encode_image(images[:2]), want)
    return cfg, ours, hf, openclip, onnx


def image_calls(precision: str, model, ref, oc, images: torch.Tensor, compile_variants: list[str],
                sdpa: bool) -> dict[str, Callable[[], object]]:
    """Image calls of one precision: clipforge eager (and its compiled variants, SDPA attention), transformers
    and OpenCLIP."""
    px = images.to(torch.bfloat16 if precision != "fp32" else torch.float32)
    calls: dict[str, Callable[[], object]] = {
        f"image clipforge {precision}": lambda: model.encode_image(px),
        f"image transformers {precision}": lambda: ref.get_image_features(pixel_values=px),
        f"image open_clip {precision}": lambda: oc.encode_image(px)}
    for variant in compile_variants:
        compiled = torch.compile(model.encode_image, options=dict(COMPILE_VARIANTS[variant]) or None)
        calls[f"image clipforge {precision} {variant}"] = lambda fn=compiled: fn(px)
    if sdpa and precision != "fp32":  # fp32 on CPU already takes the fused kernel

        def with_sdpa() -> object:
            with sdpa_attention():
                return model.encode_image(px)

        calls[f"image clipforge {precision} sdpa"] = with_sdpa
    return calls


def text_calls(precision: str, model, ref, oc, full: torch.Tensor, short: torch.Tensor,
               short_hf: torch.Tensor) -> dict[str, Callable[[], object]]:
    calls: dict[str, Callable[[], object]] = {}
    for label, ours_tokens, hf_tokens in (("text-full", full, full), ("text-short", short, short_hf)):
        calls[f"{label} clipforge {precision}"] = lambda m=model, t=ours_tokens: m.encode_text(t)
        calls[f"{label} transformers {precision}"] = lambda r=ref, t=hf_tokens: r.get_text_features(input_ids=t)
        calls[f"{label} open_clip {precision}"] = lambda m=oc, t=ours_tokens: m.encode_text(t)
    return calls


def build_calls(args: argparse.Namespace, onnx_dir: Path) -> tuple[dict[str, Callable[[], object]], dict]:
    cfg = get_model_config(args.model)
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, args.image_batch, gen)
    full = random_tokens(args.text_batch, cfg.text_cfg.context_length, gen)
    short = get_tokenizer(args.model)(short_captions(args.text_batch))  # [N, 77]
    longest = int(short.argmax(dim=-1).max()) + 1
    short_hf = short[:, :longest]  # what transformers' tokenizer gives with padding=True
    paths, kinds = args.paths.split(","), args.kinds.split(",")
    cfg, ours, hf, openclip, onnx = reference_models(args.model, images, onnx_dir if "onnx" in paths else None)
    models = {"fp32": (ours, hf, openclip)}
    if "bf16-weights" in args.precisions.split(","):
        models["bf16-weights"] = (bf16_inference(copy.deepcopy(ours)), copy.deepcopy(hf).to(torch.bfloat16),
                                  copy.deepcopy(openclip).to(torch.bfloat16))
    variants = [v for v in args.compile.split(",") if v]
    calls: dict[str, Callable[[], object]] = {}
    for precision, (model, ref, oc) in models.items():
        if "image" in kinds:
            compiled = variants if precision in args.compile_precisions.split(",") else []
            calls.update(image_calls(precision, model, ref, oc, images, compiled, args.sdpa))
        if "text-full" in kinds or "text-short" in kinds:
            calls.update({k: v for k, v in text_calls(precision, model, ref, oc, full, short, short_hf).items()
                          if k.split()[0] in kinds})
    for precision, runtime in onnx.items():
        calls[f"image clipforge-onnx {precision}"] = lambda m=runtime: m.encode_image(images)
        for label, tokens in (("text-full", full), ("text-short", short)):
            calls[f"{label} clipforge-onnx {precision}"] = lambda m=runtime, t=tokens: m.encode_text(t)
    if "torchao" in paths:
        calls.update(torchao_calls(ours, images, full, short))
    calls = {k: v for k, v in calls.items() if k.split()[0] in kinds}
    info = {"model": args.model, "image_batch": args.image_batch, "text_batch": args.text_batch,
            "short_caption_tokens": longest, "max_feature_diff": feature_diffs(calls, images, args.image_batch)}
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


@torch.inference_mode()
def feature_diffs(calls: dict[str, Callable[[], object]], images: torch.Tensor, batch: int) -> dict[str, float]:
    """Largest |difference| of each image path's normalised features from clipforge's eager fp32 ones. The
    call is also each path's warm-up (and compilation); text paths get one warm-up call here too."""
    diffs: dict[str, float] = {}
    reference = calls.get("image clipforge fp32")
    want = F.normalize(reference().float(), dim=-1) if reference else None  # [B, D]
    for key, fn in calls.items():
        out = fn()
        if want is None or not key.startswith("image"):
            continue
        got = getattr(out, "pooler_output", out)  # transformers may return an output object
        diffs[key] = float((F.normalize(torch.as_tensor(got).float(), dim=-1) - want).abs().max())
    return diffs


def best_ratios(rates: dict[str, float]) -> dict[str, tuple[str, str]]:
    """The targets as (ours, theirs) keys of `rates`: clipforge's best path vs OpenCLIP's best, the fp32 paths
    against each reference, and ONNX int8 vs ONNX fp32, per input kind."""
    out = {}
    for kind in ("image", "text-full", "text-short"):
        if f"{kind} open_clip fp32" not in rates:
            continue
        ours = max((k for k in rates if k.startswith(f"{kind} clipforge")), key=rates.__getitem__)
        theirs = max((k for k in rates if k.startswith(f"{kind} open_clip")), key=rates.__getitem__)
        out[f"{kind}: clipforge best / open_clip best (target >= 1.3)"] = (ours, theirs)
        for ref in ("open_clip", "transformers"):
            out[f"{kind}: clipforge fp32 / {ref} fp32 (target >= 1.0)"] = (f"{kind} clipforge fp32", f"{kind} {ref} fp32")
        if f"{kind} clipforge-onnx int8" in rates:
            out[f"{kind}: onnx int8 / onnx fp32 (target >= 1.5)"] = (f"{kind} clipforge-onnx int8",
                                                                    f"{kind} clipforge-onnx fp32")
    return out


def image_mfu(rates: dict[str, float], image_flops: float, peaks: dict[str, float],
              bf16_emulated: bool = False) -> dict[str, float]:
    """Model FLOP/s of each image path as a fraction of the matmul peak of its precision (int8: of bf16, or of
    fp32 where bf16 is emulated and its peak says nothing about the hardware)."""
    def peak(key: str) -> float:
        return peaks["fp32"] if " fp32" in key or (bf16_emulated and " int8" in key) else peaks["bf16"]

    return {key: rate * image_flops / peak(key) for key, rate in rates.items() if key.startswith("image")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per path, interleaved (default %(default)s: the per-round range of a ratio then "
                             "covers its median with 98%% probability; 3 gave 75%% and flipped conclusions on a noisy VM)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default="image,text-full,text-short", help="inputs to time (default %(default)s)")
    parser.add_argument("--paths", default="torch,onnx,torchao",
                        help="torch (always), onnx (ONNX Runtime fp32/int8), torchao (dynamic int8)")
    parser.add_argument("--compile", default="compiled-frozen",
                        help=f"compiled clipforge image paths in both precisions: any of {', '.join(COMPILE_VARIANTS)}"
                             " (empty: none)")
    parser.add_argument("--precisions", default="fp32,bf16-weights",
                        help="fp32 (always) and bf16-weights; leave bf16 out where it is emulated (AVX2-only CPUs)")
    parser.add_argument("--compile-precisions", default="fp32,bf16-weights", help="those --compile applies to")
    parser.add_argument("--sdpa", action="store_true", help="also time bf16 images with PyTorch's fused attention")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(hardware_note(args.threads), flush=True)
    meter = PeakMeter()
    first = meter.measure()
    print(f"matmul peak at the start ({args.threads} thread(s), square 1024/2048/3072{meter.note}): fp32 "
          f"{first['fp32'] / 1e9:.1f} GFLOP/s, bf16 {first['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        calls, info = build_calls(args, Path(tmp) / "onnx")
        with torch.inference_mode():
            times = time_interleaved(calls, args.repeats, warmup=0)  # feature_diffs made the warm-up calls
    peaks = meter.measure()
    secs = {k: median(v) for k, v in times.items()}
    flops, source = image_forward_flops(args.model, get_model_config(args.model))
    print(f"\n{args.model}: {args.image_batch} images / {args.text_batch} texts per call, median of {args.repeats}; "
          f"short captions are {info['short_caption_tokens']} tokens at most; matmul peak (best of start and end): "
          f"fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; image FLOPs {source}")
    rates = {k: (args.image_batch if k.startswith("image") else args.text_batch) / v for k, v in secs.items()}
    mfu = image_mfu(rates, flops, peaks, meter.bf16_emulated)
    for key, rate in rates.items():
        extra = f"  MFU {mfu[key]:6.1%}  max |feature diff| vs eager fp32 {info['max_feature_diff'][key]:.1e}" \
            if key in mfu else ""
        print(f"  {key:48s} {rate:9.1f} per s{extra}")
    pairs = best_ratios(rates)
    ratios = {label: rates[ours] / rates[theirs] for label, (ours, theirs) in pairs.items()}
    rounds = {label: round_ratios(times[ours], times[theirs]) for label, (ours, theirs) in pairs.items()}
    for label, ratio in ratios.items():
        print(f"  {label:66s} {format_ratio(ratio, rounds[label])}")
    print(hardware_note(args.threads))
    if args.output:
        write_atomic(args.output, json.dumps({"machine": hardware_note(args.threads), "threads": args.threads,
                                              "peaks": peaks, "image_flops": flops, "image_flops_source": source,
                                              **info, "per_s": rates, "mfu": mfu, "ratios": ratios,
                                              "ratio_rounds": rounds,
                                              "all_seconds": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
