"""ViT-B-32 training and image-embedding throughput and MFU on a CUDA GPU in bf16, against open_clip (eager and
compiled: its `--precision amp_bf16` and `--torchcompile`) and Hugging Face transformers' CLIPModel.

One training step = forward of both towers, the CLIP loss, backward and a fused AdamW step. clipforge runs the
trainer's own step (`train.step.train_step` built by `build_stepper`) under bf16 autocast, eager and with
`compile: true`; open_clip's CLIP (its model.py, same weights) runs as its trainer runs it, eager and under
`torch.compile`; transformers under bf16 autocast with its SDPA attention. All start from the same weights
(features checked equal in fp32 before timing). Within a phase (one batch size) the runs take turns, one
step each, after their first calls (which compile) are timed apart as the compile cost.

MFU: model FLOPs (3 x 14.8 GFLOP per pair for training, 8.8 GFLOP per image for embedding: Radford et al.)
per second over the best bf16 matmul rate measured in this process (square 4096-8192). The peak GPU memory of
each run is read over one step of its own.

Phases run in order while `--deadline` seconds have not passed (each writes the report, so a run cut short
keeps what it measured): training at each `--batches` size, a torch.profiler table of clipforge's compiled
step by kernel (`--profile`), image embedding (`--inference`), and the compiled step with Inductor's
max-autotune (`--autotune`, compiled alone after `torch._dynamo.reset()`, last since the reset drops the other graphs).

    PYTHONPATH=src:benchmarks python benchmarks/bench_gpu.py --batches 1024,2048 --profile --inference \
        --output docs/benchmarks/gpu-h200.json

`--device cpu --model ViT-Tiny-8-64 --batches 8` exercises the code paths on a CPU (a smoke run, not a
measurement); without `--device cpu` and without a GPU the script exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from typing import Callable

import torch

from bench_train_step import check_same_model, clipforge_step, hf_step, openclip_step, openclip_twin
from common import (image_forward_flops, matmul_peak, median, pair_forward_flops, random_images, random_tokens,
                    round_ratios, time_interleaved, twin_models, write_atomic)

from clipforge.speed import bf16_inference


def gpu_matmul_peak(sizes: tuple[int, ...] = (4096, 6144, 8192), repeats: int = 5) -> float:
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        torch.mm(a, b)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1e3))
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(step: Callable[[], object], device: str) -> Callable[[], None]:
    def run() -> None:
        step()
        sync(device)

    return run


def first_calls(runs: dict[str, Callable[[], None]], device: str, report: dict) -> None:
    """Each run's first call (compiles, if compiled) timed as its setup cost, then one more step over which its
    peak memory is read."""
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        report["first_call_s"][name] = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            report["peak_memory_gib"][name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"  {name}: first call {report['first_call_s'][name]:.1f} s"
              + (f", step peak +{report['peak_memory_gib'][name]:.1f} GiB" if device == "cuda" else ""), flush=True)


def summarise(times: dict[str, list[float]], units: int, flops_per_unit: float, peak: float,
              reference: str) -> dict:
    """Per run: units (pairs or images) per second, MFU, and the ratio of medians against `reference` with the
    per-round range."""
    rows = {}
    for name, values in times.items():
        seconds = median(values)
        rows[name] = {"per_s": units / seconds, "step_s": seconds, "mfu": units * flops_per_unit / seconds / peak,
                      "all_seconds": values}
        if name != reference and reference in times:
            rows[name]["vs_" + reference.replace(" ", "_")] = median(times[reference]) / seconds
            rows[name]["rounds"] = round_ratios(values, times[reference])
        print(f"  {name:36s} {units / seconds:9.1f}/s  step {seconds * 1e3:8.2f} ms  MFU {rows[name]['mfu']:6.1%}"
              + (f"  {rows[name]['vs_' + reference.replace(' ', '_')]:.2f}x {reference}" if name != reference
                 and reference in times else ""), flush=True)
    return rows


def attention_variant(name: str):  # -> a reusable context manager
    """A context in which clipforge's attention uses one kernel: `default` (what `models.attention` picks),
    `explicit` (`explicit_attention`: two batched matmuls and a softmax, which Inductor fuses), or PyTorch's fused
    kernel restricted to `flash` (FlashAttention-2; masked single-query calls fall back to the memory-efficient
    kernel, which flash does not cover) or `efficient` (the memory-efficient kernel). Under torch.compile each
    variant is its own graph: Dynamo guards on the patched function."""
    import contextlib  # noqa: PLC0415
    from unittest import mock  # noqa: PLC0415

    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    from clipforge.models import attention  # noqa: PLC0415

    if name == "default":
        return contextlib.nullcontext()
    if name == "explicit":
        return mock.patch.object(attention, "_explicit_is_faster", lambda q, length: True)
    backends = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION]}[name]

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]

    return mock.patch.object(attention, "_fused", fused)


def with_attention(name: str, step: Callable[[], None]) -> Callable[[], None]:
    context = attention_variant(name)

    def run() -> None:
        with context:
            step()

    return run


def training_inputs(cfg, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) of one training batch, the same for every phase of that batch size."""
    gen = torch.Generator().manual_seed(batch)
    return (random_images(cfg, batch, gen).to(device),
            random_tokens(batch, cfg.text_cfg.context_length, gen).to(device))


def training_phase(args: argparse.Namespace, cfg, model, hf, openclip, batch: int, peak: float) -> dict:
    device = args.device
    images, tokens = training_inputs(cfg, batch, device)
    runs: dict[str, Callable[[], None]] = {}
    if not args.compiled_only:
        runs["transformers bf16"] = synced(hf_step(copy.deepcopy(hf), images, tokens, "bf16", device), device)
        runs["open_clip bf16"] = synced(openclip_step(copy.deepcopy(openclip), images, tokens, "bf16", device), device)
        runs["clipforge bf16"] = synced(clipforge_step(copy.deepcopy(model), images, tokens, "bf16", device), device)
    runs["open_clip bf16 compiled"] = synced(
        openclip_step(torch.compile(copy.deepcopy(openclip)), images, tokens, "bf16", device), device)
    runs["clipforge bf16 compiled"] = synced(
        clipforge_step(copy.deepcopy(model), images, tokens, "compiled-bf16", device), device)
    for variant in [v for v in args.attention.split(",") if v and v != "default"]:
        if not args.compiled_only:
            runs[f"clipforge bf16 [{variant}]"] = with_attention(variant, synced(
                clipforge_step(copy.deepcopy(model), images, tokens, "bf16", device), device))
        runs[f"clipforge bf16 compiled [{variant}]"] = with_attention(variant, synced(
            clipforge_step(copy.deepcopy(model), images, tokens, "compiled-bf16", device), device))
    if args.master:
        runs["clipforge bf16-master compiled"] = synced(
            clipforge_step(copy.deepcopy(model), images, tokens, "compiled-bf16-master", device), device)
    report: dict = {"batch": batch, "first_call_s": {}, "peak_memory_gib": {}}
    first_calls(runs, device, report)
    times = time_interleaved(runs, args.steps, warmup=0)
    flops = 3 * pair_forward_flops(args.model, cfg)[0]
    reference = "open_clip bf16 compiled"
    print(f"training, batch {batch}, median of {args.steps} interleaved steps:")
    report["rows"] = summarise(times, batch, flops, peak, reference)
    return report


def profile_table(step: Callable[[], None], device: str, calls: int = 3, top: int = 25) -> dict:
    """Kernel time of `calls` steps by kernel name (top `top`) and by kind, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device == "cuda":
        # kernels only: a record_function range (e.g. `Optimizer.step#AdamW.step`) also shows on the GPU track,
        # with the time of the kernels it spans, which would count them twice
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
    total = sum(getattr(e, attr) for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, attr)
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    table = {"total_ms_per_step": total / 1e3 / calls,
             "kinds": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
             "kernels": [{"name": e.key[:160], "share": getattr(e, attr) / total, "calls_per_step": e.count / calls,
                          "ms_per_step": getattr(e, attr) / 1e3 / calls} for e in rows]}
    print(f"profile: {table['total_ms_per_step']:.1f} ms of kernels per step; by kind: "
          + ", ".join(f"{k} {v:.1%}" for k, v in table["kinds"].items()))
    for row in table["kernels"]:
        print(f"  {row['share']:6.1%} {row['ms_per_step']:7.2f} ms x{row['calls_per_step']:5.0f}  {row['name'][:110]}")
    return table


def profile_phase(args: argparse.Namespace, cfg, model, batch: int) -> dict:
    images, tokens = training_inputs(cfg, batch, args.device)
    step = synced(clipforge_step(copy.deepcopy(model), images, tokens, "compiled-bf16", args.device), args.device)
    step()
    step()
    return profile_table(step, args.device)



def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if (any(s in lowered for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "cublas"))
            or lowered in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")):  # CPU profiles name ops
        return "matmul"
    # cudnn::fusion::* are the helpers of cuDNN's attention backward (dO.O and the dQ conversion)
    if any(s in lowered for s in ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")):
        return "attention"
    if "adam" in lowered:
        return "optimizer"
    if "triton" in lowered:
        return "fused elementwise/norm (Triton)"
    if any(s in lowered for s in ("elementwise", "reduce", "layer_norm", "softmax", "copy", "fill", "cat")):
        return "eager elementwise/reduction"
    return "other"


def inference_phase(args: argparse.Namespace, cfg, model, openclip, batch: int, peak: float) -> dict:
    """Image embedding in bf16: clipforge's `speed.bf16_inference` (bf16 matmul weights; `embed` uses it on a CPU,
    autocast on a GPU) and open_clip in bf16 weights, eager and compiled, under no_grad."""
    device = args.device
    images = random_images(cfg, batch, torch.Generator().manual_seed(1)).to(device).to(torch.bfloat16)
    ours = bf16_inference(copy.deepcopy(model))
    theirs = copy.deepcopy(openclip).to(torch.bfloat16).eval()
    ours_c, theirs_c = torch.compile(ours.encode_image), torch.compile(theirs.encode_image)

    def call(fn):
        def run() -> None:
            with torch.no_grad():
                fn(images)
            sync(device)

        return run

    runs = {"open_clip bf16": call(theirs.encode_image), "clipforge bf16": call(ours.encode_image),
            "open_clip bf16 compiled": call(theirs_c), "clipforge bf16 compiled": call(ours_c)}
    report: dict = {"batch": batch, "first_call_s": {}, "peak_memory_gib": {}}
    first_calls(runs, device, report)
    times = time_interleaved(runs, args.steps, warmup=0)
    flops = image_forward_flops(args.model, cfg)[0]
    print(f"image embedding, batch {batch}, median of {args.steps} interleaved calls:")
    report["rows"] = summarise(times, batch, flops, peak, "open_clip bf16 compiled")
    return report


def autotune_phase(args: argparse.Namespace, cfg, model, batch: int, peak: float) -> dict:
    """clipforge's step compiled with Inductor's max-autotune (no CUDA graphs), timed alone after a reset (so that
    no graph of the default compile is reused); compare it with the training phase of the same batch."""
    import torch._inductor.config as inductor  # noqa: PLC0415

    device = args.device
    torch._dynamo.reset()
    images, tokens = training_inputs(cfg, batch, device)
    tuned = synced(clipforge_step(copy.deepcopy(model), images, tokens, "compiled-bf16", device), device)
    report: dict = {"batch": batch, "first_call_s": {}, "peak_memory_gib": {}}
    with inductor.patch(max_autotune=True):  # GEMM templates tuned against cuBLAS; no CUDA graphs
        first_calls({"clipforge bf16 max-autotune": tuned}, device, report)
    times = time_interleaved({"clipforge bf16 max-autotune": tuned}, args.steps, warmup=0)
    print(f"max-autotune, batch {batch} (compare with clipforge bf16 compiled in train-b{batch}):")
    report["rows"] = summarise(times, batch, 3 * pair_forward_flops(args.model, cfg)[0], peak, "none")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batches", default="1024", help="training batch sizes, one phase each (default %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run and phase")
    parser.add_argument("--compiled-only", action="store_true", help="skip the eager runs")
    parser.add_argument("--master", action="store_true", help="also clipforge compiled with bf16 weights + fp32 master")
    parser.add_argument("--attention", default="",
                        help="default,VARIANT,...: also clipforge with each other attention kernel (explicit, flash, "
                             "efficient; see attention_variant)")
    parser.add_argument("--profile", action="store_true", help="profile clipforge's compiled step by kernel")
    parser.add_argument("--inference", action="store_true", help="also time image embedding")
    parser.add_argument("--autotune", action="store_true", help="also compile with max-autotune (slow to compile)")
    parser.add_argument("--deadline", type=float, default=1e9, help="start no phase after this many seconds")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    clock = time.perf_counter()
    # one static graph per batch size, as a training run has: no switch to dynamic shapes on the second size
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = 64
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            import torchvision  # noqa: F401, PLC0415 - a real build there: open_clip's model.py imports it
        except ImportError:
            pass
    peak = gpu_matmul_peak() if args.device == "cuda" else matmul_peak(torch.bfloat16)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out: dict = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
                 "peak_bf16": peak, "args": vars(args), "phases": {}, "errors": {}}
    print(f"{device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}; bf16 matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s", flush=True)
    cfg, model, hf = twin_models(args.model)
    openclip = openclip_twin(model)
    probe = random_images(cfg, 4, torch.Generator().manual_seed(0))
    diff = check_same_model(model.eval(), hf.eval(), openclip.eval(), probe,
                            random_tokens(4, cfg.text_cfg.context_length, torch.Generator().manual_seed(0)))
    out["fp32_max_feature_diff"] = diff
    print(f"features of clipforge, transformers and open_clip agree to {diff:.1e} in fp32", flush=True)
    model, hf, openclip = model.train().to(args.device), hf.train().to(args.device), openclip.train().to(args.device)

    def save() -> None:
        out["elapsed_s"] = time.perf_counter() - clock
        if args.output:
            write_atomic(args.output, json.dumps(out, indent=1))

    phases: list[tuple[str, Callable[[], dict]]] = []
    batches = [int(b) for b in args.batches.split(",")]
    # first the measurements the issue asks for (training and embedding at the first size), then the extras
    first, *others = batches
    phases.append((f"train-b{first}", lambda: training_phase(args, cfg, model, hf, openclip, first, peak)))
    if args.profile:
        phases.append((f"profile-b{first}", lambda: profile_phase(args, cfg, model, first)))
    if args.inference:
        phases.append((f"embed-b{first}", lambda: inference_phase(args, cfg, model, openclip, first, peak)))
    for batch in others:
        phases.append((f"train-b{batch}", lambda b=batch: training_phase(args, cfg, model, hf, openclip, b, peak)))
    if args.autotune:
        phases.append((f"autotune-b{first}", lambda: autotune_phase(args, cfg, model, first, peak)))
    for name, phase in phases:
        if time.perf_counter() - clock > args.deadline:
            out["errors"][name] = f"not started: {args.deadline:.0f} s deadline passed"
            print(f"{name}: not started (deadline)", flush=True)
            continue
        print(f"\n== {name} ({time.perf_counter() - clock:.0f} s)", flush=True)
        try:
            out["phases"][name] = phase()
        except Exception:  # noqa: BLE001 - a broken phase must not lose the others' numbers
            out["errors"][name] = traceback.format_exc()
            print(out["errors"][name], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print(f"done in {time.perf_counter() - clock:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
