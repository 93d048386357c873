"""Training-step throughput of clipforge's trainer step against Hugging Face transformers' CLIPModel and
open_clip's CLIP, and CPU MFU.

clipforge's step is `clipforge.train.step.train_step`, the function `clipforge train` runs, built by
`build_stepper` in each mode: fp32, bf16 (autocast), bf16-master (bf16 weights, fp32 master weights) and
compiled-<mode> (`compile: true`, torch.compile). One step = forward of both towers, the symmetric CLIP loss on the normalised features, backward, and a fused
AdamW step (the same optimizer for both; it is several times faster than the default for-each AdamW on
CPU). The transformers model is built with the same architecture (widths, layers, heads, patch, context,
vocabulary, activation) and loaded with the same weights; the script checks that both compute the same
features in fp32 before timing. Precisions: fp32; bf16 autocast (both); bf16 weights with fp32 master
weights (clipforge's `speed.MasterWeights`, compared with transformers under autocast). One phase per
precision; within it the three implementations take turns of `--block` steps (the first of each turn, which
pays for the other model having evicted caches and allocator pools, is not timed), so a change of load on a
shared machine hits both alike. Medians are reported.

MFU: model FLOPs per step (3x the forward: ViT-B-32 counted as 14.8 GFLOP per pair, other models by the
analytic formula in `common.forward_flops`) divided by the step time, as a fraction of the best matmul rate
measured in this process (square matmuls of 1024-3072, fp32 and bf16, before and after the steps).

The compiled modes are compiled (one untimed step) before their phase. Since each phase times the references
too, compiled against eager is also reported through them: (compiled / open_clip in its phase) / (eager /
open_clip in its phase), which a change of the machine's load between the phases does not bias.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/bench_train_step.py --threads 1 \
        --models ViT-B-32:16 --output docs/benchmarks/train-step-avx512-1thread.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from common import (PeakMeter, format_ratio, hardware_note, median, pair_forward_flops, random_images, random_tokens,
                    round_ratios, time_interleaved, twin_models, write_atomic)

from clipforge.losses import clip_loss
from clipforge.speed import autocast, cpu_flags, cpu_supports_bf16, resolve_precision
from clipforge.train.config import OptimConfig, TrainConfig
from clipforge.train.step import build_stepper, train_step

# issue 15's targets per kind of hardware: bf16 speed ratio against open_clip, fp32 ratio, bf16 training MFU
TARGETS = {
    "CPU with AVX-512 bf16, no AMX": {"bf16_ratio": 1.3, "fp32_ratio": 1.0, "mfu_bf16": 0.65},
    "CPU with AMX": {"bf16_ratio": 2.0, "fp32_ratio": 1.0, "mfu_bf16": 0.50},
    "CPU without native bf16": {"fp32_ratio": 1.0},  # AVX2 only: the trainer's bf16 modes fall back to fp32
}


def targets_for(flags: set[str]) -> tuple[str, dict[str, float]]:
    """The target set for a CPU with these /proc/cpuinfo flags."""
    if "amx_bf16" in flags:
        kind = "CPU with AMX"
    elif "avx512_bf16" in flags:
        kind = "CPU with AVX-512 bf16, no AMX"
    else:
        kind = "CPU without native bf16"
    return kind, TARGETS[kind]


def clipforge_step(model, images, tokens, precision: str, device: str = "cpu") -> Callable[[], None]:
    """A closure running the trainer's own step (`clipforge.train.step.train_step`, as `clipforge train` runs
    it) on a clipforge CLIP; `precision` is fp32, bf16, bf16-master or compiled-<one of those>."""
    compiled = precision.startswith("compiled-")
    cfg = TrainConfig(precision=precision.removeprefix("compiled-"), compile=compiled,
                      optim=OptimConfig(lr=1e-5, weight_decay=0.1, grad_clip=None))
    stepper = build_stepper(cfg, model)

    def step() -> None:
        train_step(stepper, images, tokens, lr=1e-5)

    return step


def their_precision(ours: str) -> str:
    """transformers' counterpart: bf16 autocast for our bf16 modes, fp32 for fp32 (compiled or not)."""
    return "fp32" if ours.removeprefix("compiled-") == "fp32" else "bf16"


def hf_step(model, images, tokens, precision: str, device: str = "cpu") -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = model(input_ids=tokens, pixel_values=images)
        scale = model.logit_scale.exp()
        clip_loss(out.image_embeds.float(), out.text_embeds.float(), scale.float()).backward()
        optimizer.step()

    return step


def openclip_twin(model):
    """open_clip's own CLIP (model.py loaded by file path, as the tests do) holding `model`'s weights: the two
    share OpenAI's state-dict names."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from clip_reference import openclip_clip  # noqa: PLC0415 - a test helper, benchmarks only

    twin = openclip_clip(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.train()


def openclip_step(model, images, tokens, precision: str, device: str = "cpu",
                  grad_clip: float | None = None) -> Callable[[], None]:
    """open_clip's training step as its trainer runs it: autocast, forward, CLIP loss, backward, the gradient
    norm clipped to `grad_clip` when given (its `--grad-clip-norm`), fused AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            image_features, text_features, scale = model(images, tokens)
        clip_loss(image_features.float(), text_features.float(), scale.float()).backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()

    return step


def check_same_model(model, hf, openclip, images, tokens) -> float:
    """Largest |difference| of the normalised fp32 features of clipforge and the two references on the batch."""
    with torch.no_grad():
        ours_i, ours_t, _ = model(images, tokens)
        out = hf(input_ids=tokens, pixel_values=images)
        oc_i, oc_t, _ = openclip(images, tokens)
    return max((ours_i - out.image_embeds).abs().max().item(), (ours_t - out.text_embeds).abs().max().item(),
               (ours_i - oc_i).abs().max().item(), (ours_t - oc_t).abs().max().item())


def bench_model(name: str, batch: int, steps: int, precisions: list[str], block: int, meter: PeakMeter) -> dict:
    cfg, model, hf = twin_models(name)
    model, hf = model.train(), hf.train()
    openclip = openclip_twin(model)
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, batch, gen)
    tokens = random_tokens(batch, cfg.text_cfg.context_length, gen)
    max_diff = check_same_model(model, hf, openclip, images, tokens)
    if max_diff > 1e-4:
        raise RuntimeError(f"{name}: clipforge and the reference features differ by {max_diff:.2e} in fp32")

    # One phase per precision: clipforge, transformers and open_clip interleaved, then freed (a ViT-B-32 with
    # its AdamW state is 2.4 GB).
    times: dict[str, list[float]] = {}
    for precision in precisions:
        theirs = their_precision(precision)
        ours = copy.deepcopy(model)
        step = clipforge_step(ours, images, tokens, precision)
        if precision.startswith("compiled-"):
            step()  # compiles (forward and backward graphs): not part of the timed phase
        runs = {f"clipforge {precision}": step,
                f"transformers {theirs}": hf_step(hf, images, tokens, theirs),
                f"open_clip {theirs}": openclip_step(openclip, images, tokens, theirs)}
        phase = time_interleaved(runs, steps, warmup=1 if block == 1 else 0, block=block)
        print(f"  {name} {precision}: " + ", ".join(
            f"{k} {median(v):.3f} s/step ({' '.join(f'{t:.2f}' for t in v)})" for k, v in phase.items()), flush=True)
        times[f"clipforge {precision}"] = phase[f"clipforge {precision}"]
        for ref in ("transformers", "open_clip"):
            times[f"{ref} {theirs} (with {precision})"] = phase[f"{ref} {theirs}"]
        del runs, ours, step
        hf.zero_grad(set_to_none=True)
        openclip.zero_grad(set_to_none=True)
        meter.measure()
    flops, source = pair_forward_flops(name, cfg)
    return {"model": name, "batch": batch, "steps": steps, "flops_per_step": 3 * flops * batch,
            "flops_source": source, "fp32_max_feature_diff": max_diff,
            "seconds": {k: median(v) for k, v in times.items()}, "all_seconds": times}


def report(result: dict, peaks: dict[str, float]) -> dict:
    """Print samples/s, ratios against transformers and MFU; return them."""
    name, batch, secs = result["model"], result["batch"], result["seconds"]
    print(f"\n{name}, batch {batch}, median of {result['steps']} interleaved steps "
          f"(features agree with transformers to {result['fp32_max_feature_diff']:.1e} in fp32)")
    print(f"  FLOPs per step: 3 x forward = {result['flops_per_step'] / 1e9:.1f} GFLOP ({result['flops_source']})")
    rows = {}
    native_bf16 = cpu_supports_bf16()  # emulated bf16 has no meaningful peak to compare against
    for run, seconds in secs.items():
        precision = run.split()[1].removeprefix("compiled-")
        if run.startswith("clipforge"):
            precision = resolve_precision(precision, "cpu")  # what the trainer ran (fp32 without native bf16)
        peak = peaks["fp32"] if precision == "fp32" else peaks["bf16"]
        rate = result["flops_per_step"] / seconds
        rows[run] = {"samples_per_s": batch / seconds, "step_s": seconds, "gflops": rate / 1e9,
                     "mfu": rate / peak, "mfu_of_bf16_peak": rate / peaks["bf16"]}
        print(f"  {run:40s} {batch / seconds:7.2f} samples/s  step {seconds:7.3f} s  {rate / 1e9:6.1f} GFLOP/s  "
              f"MFU {rate / peak:6.1%} of {'fp32' if precision == 'fp32' else 'bf16'} peak"
              + (f" ({rate / peaks['bf16']:.1%} of bf16)" if native_bf16 else ""))
    ratios, rounds = {}, {}
    for run in secs:
        if run.startswith("clipforge"):
            precision = run.split()[1]
            theirs = their_precision(precision)
            for ref in ("transformers", "open_clip"):
                label, other = f"{precision} vs {ref} {theirs}", f"{ref} {theirs} (with {precision})"
                ratios[label] = secs[other] / secs[run]
                rounds[label] = round_ratios(result["all_seconds"][run], result["all_seconds"][other])
    for run in secs:
        precision = run.split()[1]
        if run.startswith("clipforge compiled-") and f"clipforge {precision.removeprefix('compiled-')}" in secs:
            eager = precision.removeprefix("compiled-")
            ref = f"open_clip {their_precision(precision)}"
            ratios[f"{precision} vs {eager} (through {ref})"] = (
                ratios[f"{precision} vs {ref}"] / ratios[f"{eager} vs {ref}"])
    for label, ratio in ratios.items():
        print(f"  speed ratio clipforge {label}: " + (format_ratio(ratio, rounds[label]) if label in rounds
                                                       else f"{ratio:.2f}x"))
    if any(row["mfu"] > 1 for row in rows.values()):
        print("  (MFU above 100%: the machine was busier while the peak was measured; rerun when it is quiet)")
    return {**result, "rows": rows, "ratios": ratios, "ratio_rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32:16", help="NAME:BATCH,... (default %(default)s)")
    parser.add_argument("--precisions",
                        default="fp32,bf16,bf16-master,compiled-fp32,compiled-bf16,compiled-bf16-master",
                        help="trainer modes: fp32, bf16, bf16-master, compiled-<mode> (torch.compile)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per variant (default %(default)s: a ratio's per-round range then covers its "
                             "median with 94%% probability)")
    parser.add_argument("--block", type=int, default=2,
                        help="consecutive steps per turn, the first not timed (1: strict alternation, one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", metavar="FILE.json")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="clipforge.allocator.reuse_freed_memory() first, as `clipforge train` does; it is "
                             "process-wide, so the references get it too (bench_allocator.py measures its gain)")
    args = parser.parse_args(argv)
    allocator = "glibc default"
    if args.keep_freed_memory:
        from clipforge.allocator import reuse_freed_memory  # noqa: PLC0415

        threshold = reuse_freed_memory()
        allocator = f"freed memory kept (mmap threshold {threshold})" if threshold else "glibc default (not glibc?)"
    print(f"allocator: {allocator}")
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    print(hardware_note(args.threads))
    meter = PeakMeter()
    first = meter.measure()
    print(f"matmul peak at the start ({args.threads} thread(s), square 1024/2048/3072{meter.note}): fp32 "
          f"{first['fp32'] / 1e9:.1f} GFLOP/s, bf16 {first['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for item in args.models.split(","):
        name, _, batch = item.partition(":")
        results.append(bench_model(name, int(batch or 16), args.steps, precisions, args.block, meter))
    peaks = meter.measure()
    print(f"matmul peak (best of 1024/2048/3072 x 3, measured before, between and after the phases): "
          f"fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    reports = [report(r, peaks) for r in results]
    kind, targets = targets_for(cpu_flags())
    bf16_targets = (f"bf16 >= {targets['bf16_ratio']}x open_clip, MFU >= {targets['mfu_bf16']:.0%} of the bf16 "
                    "peak on ViT-B-32 at batch >= 16, " if "bf16_ratio" in targets else "")
    print(f"\ntargets ({kind}): {bf16_targets}fp32 >= {targets['fp32_ratio']}x open_clip and transformers")
    print(hardware_note(args.threads))
    if args.output:
        write_atomic(args.output, json.dumps({"machine": hardware_note(args.threads), "threads": args.threads,
                                              "allocator": allocator, "peaks": peaks, "results": reports}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
