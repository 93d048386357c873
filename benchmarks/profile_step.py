"""Where the time of a bf16 training step and of bf16 image inference goes, by operator (torch.profiler).

Profiles clipforge's trainer step (`clipforge.train.step.train_step`, precision `bf16` autocast, fused AdamW)
and image embedding (`speed.bf16_inference`, bf16 matmul weights) of one model, after warm-up calls, and writes
a short Markdown table: time per group of operators (matmul, attention, layernorm, gelu, softmax,
elementwise+casts, optimizer, other) as a share of the step, then the top operators by self time.

Each profiled operator's *self* time (its own time without the operators it calls) goes to one group, so the
groups add up to the time spent inside operators; the rest of the wall time (Python, the autograd engine's
bookkeeping outside operators) is shown as "outside operators". Grouping is by operator name, with two
structural rules: everything under the optimizer's `Optimizer.step` / `zero_grad` (and the `_foreach_*`
kernels of gradient clipping) is "optimizer", and `aten::bmm` is "attention" (in these towers batched matmuls
are only attention's q k^T and weights @ v; linear layers run as `addmm`/`mm`). QuickGELU, x * sigmoid(1.702 x),
shows as `sigmoid` (counted as gelu) and multiplications (left in elementwise). On a GPU (`--device cuda`)
the device time of the kernels each operator launched is used instead of CPU time. `--precision fp32`
profiles the fp32 step and fp32 inference instead: the path on CPUs without native bf16 (AVX2 only), where the
trainer's bf16 falls back to fp32 anyway and bf16 weights would be emulated.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/profile_step.py --threads 1 \
        --output docs/benchmarks/profile-avx512.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from common import hardware_note, random_images, random_tokens, write_atomic

from clipforge import create_model, get_model_config
from clipforge.speed import bf16_inference, channels_last, resolve_precision
from clipforge.train.config import OptimConfig, TrainConfig
from clipforge.train.step import build_stepper, train_step

GROUPS = ("matmul", "attention", "layernorm", "gelu", "softmax", "elementwise+casts", "optimizer", "other")
_MATMUL = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::conv", "aten::_convolution",
           "aten::mkldnn_", "aten::_addmm_activation", "mkldnn::", "onednn::", "aten::_mkl_linear")
_ATTENTION = ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::scaled_dot_product",
              "aten::_flash_attention", "aten::_efficient_attention")
_ELEMENTWISE = ("add", "mul", "div", "sub", "copy_", "_to_copy", "to", "clone", "contiguous", "masked_fill",
                "where", "exp", "fill_", "zero_", "sum", "mean", "neg", "pow", "sqrt", "rsqrt",
                "clamp", "clamp_", "add_", "mul_", "div_", "sub_", "addcmul_", "addcdiv_", "lerp_", "cat",
                "stack", "linalg_vector_norm", "norm", "abs", "max", "eq", "ne", "threshold_backward",
                "reciprocal", "expand_as", "_unsafe_view")


def group_of(name: str, under_optimizer: bool) -> str:
    """The group an operator's time goes to (see the module docstring)."""
    if under_optimizer or name.startswith(("Optimizer.", "aten::_fused_adam", "aten::_foreach_")):
        return "optimizer"
    if name.startswith(_ATTENTION):
        return "attention"
    if name.startswith(_MATMUL):
        return "matmul"
    if "layer_norm" in name:
        return "layernorm"
    if "gelu" in name or name.startswith("aten::sigmoid"):  # QuickGELU is x * sigmoid(1.702 x)
        return "gelu"
    if "softmax" in name:
        return "softmax"
    if name.startswith("aten::") and name.removeprefix("aten::") in _ELEMENTWISE:
        return "elementwise+casts"
    return "other"


def _ancestors(event) -> list[str]:  # event: torch.autograd.profiler_util.FunctionEvent
    names = []
    parent = event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _caller(ancestors: list[str]) -> str:
    """The nearest enclosing non-aten event (an autograd node, the optimizer), or 'forward' at top level."""
    for name in ancestors:
        if not name.startswith("aten::"):
            return name.removeprefix("autograd::engine::evaluate_function: ")
    return "forward / top level"


def profile_calls(fn: Callable[[], object], calls: int, warmup: int, device: str) -> dict:
    """Self time (µs per call) per operator and per group of `calls` profiled calls of `fn`, and their wall time."""
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    ops: dict[str, dict] = {}
    for event in prof.events():
        own = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if own <= 0:
            continue
        ancestors = _ancestors(event)
        group = group_of(event.name, any(a.startswith("Optimizer.") for a in ancestors))
        row = ops.setdefault(event.name, {"us": 0.0, "group": group, "count": 0, "callers": {}})
        row["us"] += own / calls
        row["count"] += 1
        caller = _caller(ancestors)
        row["callers"][caller] = row["callers"].get(caller, 0.0) + own / calls
    groups = {g: sum(r["us"] for r in ops.values() if r["group"] == g) for g in GROUPS}
    return {"wall_us": wall / calls * 1e6, "ops": ops, "groups": groups}


def train_call(name: str, batch: int, device: str, precision: str = "bf16") -> Callable[[], object]:
    cfg = get_model_config(name)
    torch.manual_seed(0)
    model = create_model(name).to(device).train()
    channels_last(model)  # ResNet towers NHWC, as `clipforge train` stores them (a no-op for ViTs)
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, batch, gen).to(device)
    tokens = random_tokens(batch, cfg.text_cfg.context_length, gen).to(device)
    stepper = build_stepper(TrainConfig(precision=precision, optim=OptimConfig(lr=1e-5, grad_clip=1.0)), model)
    return lambda: train_step(stepper, images, tokens, lr=1e-5)


def inference_call(name: str, batch: int, device: str, precision: str = "bf16") -> Callable[[], object]:
    cfg = get_model_config(name)
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    channels_last(model)  # as eval / embed load ResNet towers
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if dtype == torch.bfloat16:
        model = bf16_inference(model)
    images = random_images(cfg, batch, torch.Generator().manual_seed(0)).to(device, dtype)

    def call() -> object:
        with torch.inference_mode():
            return model.encode_image(images)

    return call


def table(title: str, result: dict, top: int) -> list[str]:
    """Markdown: the groups as shares of the step's wall time, then the `top` operators by self time."""
    wall = result["wall_us"]
    inside = sum(result["groups"].values())
    lines = [f"### {title}", "", f"Wall time per call {wall / 1e3:.1f} ms; inside profiled operators "
             f"{inside / 1e3:.1f} ms.", "", "| group | ms per call | % of call |", "|---|---:|---:|"]
    for group, us in sorted(result["groups"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {us / 1e3:.1f} | {us / wall:.1%} |")
    lines.append(f"| outside operators (Python, autograd engine) | {(wall - inside) / 1e3:.1f} | "
                 f"{(wall - inside) / wall:.1%} |")
    lines += ["", f"Top {top} operators by self time (and where most of it is called from):", "",
              "| operator | group | ms per call | % of call | mostly called from |", "|---|---|---:|---:|---|"]
    ranked = sorted(result["ops"].items(), key=lambda kv: -kv[1]["us"])[:top]
    for op, row in ranked:
        caller, us = max(row["callers"].items(), key=lambda kv: kv[1])
        lines.append(f"| `{op}` | {row['group']} | {row['us'] / 1e3:.1f} | {row['us'] / wall:.1%} | "
                     f"{caller} ({us / row['us']:.0%}) |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2, help="profiled calls of each (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--output", metavar="FILE.md", help="the Markdown tables (and FILE.json beside it)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="clipforge.allocator.reuse_freed_memory() first, as `clipforge train`, `eval` and "
                             "`embed` do; without it glibc maps every large buffer afresh and the page faults "
                             "land in whichever operator first writes the buffer (copy_, fill_)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    note = hardware_note(args.threads, args.device)
    if args.keep_freed_memory:
        from clipforge.allocator import reuse_freed_memory  # noqa: PLC0415

        threshold = reuse_freed_memory()
        note += "; freed memory kept" if threshold else "; freed memory NOT kept (not glibc?)"
    print(note, flush=True)
    trained = resolve_precision(args.precision, args.device)  # what build_stepper runs on this device
    train_title = {"bf16": "bf16 autocast", "fp32": "fp32"}[trained]
    if trained != args.precision:
        train_title += f" ({args.precision} asked; no native bf16 here)"
    infer_title = "bf16 weights" if args.precision == "bf16" else "fp32"
    results = {
        f"training step, {train_title}, batch {args.train_batch}":
            profile_calls(train_call(args.model, args.train_batch, args.device, args.precision), args.calls,
                          args.warmup, args.device),
        f"image inference, {infer_title}, batch {args.infer_batch}":
            profile_calls(inference_call(args.model, args.infer_batch, args.device, args.precision), args.calls,
                          args.warmup, args.device),
    }
    lines = [f"Profile of {args.model} on {note}; {args.calls} profiled calls after {args.warmup} warm-up calls.",
             "Command: `OMP_NUM_THREADS=%d PYTHONPATH=src:benchmarks python benchmarks/profile_step.py %s`"
             % (args.threads, " ".join(argv if argv is not None else sys.argv[1:])), ""]
    for title, result in results.items():
        lines += table(f"{args.model}, {title}", result, args.top)
    text = "\n".join(lines)
    print(text)
    if args.output:
        write_atomic(args.output, text)
        write_atomic(args.output.removesuffix(".md") + ".json", json.dumps({"machine": note, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
