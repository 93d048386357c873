"""Freed memory kept in the process (`clipforge.allocator`) against glibc's default, in one run.

The allocator's thresholds are set once per process, so each setting runs in its own child process and the
two take turns (`--turns` of each, in alternation) on the same model, batch and threads: a ViT-B-32 bf16
training step (the trainer's `train_step`, autocast, fused AdamW, batch 16) and bf16 image embedding (batch 32).
Each child reports, per timed call: wall time, minor page faults, user and system CPU time; and its peak
resident memory. Only the ratios between the two settings inside this run mean anything. MFU is model FLOPs
(3x the forward for a training step, as `bench_train_step.py` counts them) per second over the best bf16 matmul
rate measured by the parent before the turns start.

`--open-clip` adds open_clip's CLIP with the same weights to the turns, under both settings: its training step as
its trainer runs it with `--precision amp_bf16 --grad-clip-norm 1.0` (autocast, clipped gradients, fused AdamW) and
its documented CPU inference path (`model.to(torch.bfloat16)`). Its children then give two comparisons in one run:
clipforge against open_clip under the same allocator setting, and each as it ships (clipforge keeps freed memory,
open_clip leaves glibc's default).

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_allocator.py --threads 2 \
        --output docs/benchmarks/allocator-amx-2thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

from common import (format_ratio, hardware_note, image_forward_flops, matmul_peak, median, pair_forward_flops,
                    random_images, random_tokens, round_ratios, write_atomic)

from clipforge import get_model_config

SETTINGS = {"glibc default": "0", "keep freed memory": "1"}


def run_name(impl: str, setting: str) -> str:
    """clipforge's rows keep their bare setting names, so results of runs without --open-clip read the same."""
    return setting if impl == "clipforge" else f"{impl}, {setting}"


def openclip_call(kind: str, model_name: str, batch: int) -> Callable[[], object]:
    """open_clip's bf16 training step (grad norm clipped to 1.0, as clipforge's trainer does by default) or bf16
    image embedding, on the weights and inputs `profile_step` gives clipforge."""
    from bench_train_step import openclip_step, openclip_twin  # noqa: PLC0415

    from clipforge import create_model  # noqa: PLC0415

    cfg = get_model_config(model_name)
    torch.manual_seed(0)
    twin = openclip_twin(create_model(model_name))  # train mode, clipforge's seed-0 weights
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, batch, gen)
    if kind == "train":
        tokens = random_tokens(batch, cfg.text_cfg.context_length, gen)
        return openclip_step(twin, images, tokens, "bf16", grad_clip=1.0)
    twin = twin.to(torch.bfloat16).eval()
    images = images.to(torch.bfloat16)

    def call() -> object:
        with torch.inference_mode():
            return twin.encode_image(images)

    return call


def child(kind: str, impl: str, model_name: str, batch: int, calls: int, warmup: int, threads: int) -> dict:
    """Run `calls` timed calls after `warmup` in this process; the allocator switch came from the environment."""
    from clipforge.allocator import reuse_freed_memory  # noqa: PLC0415
    from profile_step import inference_call, train_call  # noqa: PLC0415

    threshold = reuse_freed_memory()
    torch.set_num_threads(threads)
    if impl == "open_clip":
        call = openclip_call(kind, model_name, batch)
    else:
        call = (train_call if kind == "train" else inference_call)(model_name, batch, "cpu")
    for _ in range(warmup):
        call()
    rows = []
    for _ in range(calls):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        call()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": wall, "minor_faults": after.ru_minflt - before.ru_minflt,
                     "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mmap_threshold": threshold, "calls": rows, "peak_rss_mb": peak_mb}


def summarise(turns: list[dict]) -> dict:
    calls = [row for turn in turns for row in turn["calls"]]
    return {key: median([row[key] for row in calls]) for key in ("wall_s", "minor_faults", "user_s", "sys_s")} | {
        "peak_rss_mb": max(turn["peak_rss_mb"] for turn in turns), "timed_calls": len(calls),
        "mmap_threshold": turns[0]["mmap_threshold"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--kinds", default="train,image", help="comma-separated: train, image")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3, help="child processes per setting, in alternation")
    parser.add_argument("--calls", type=int, default=4, help="timed calls per child")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--open-clip", action="store_true",
                        help="also time open_clip's CLIP (same weights) under both settings")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="clipforge", choices=("clipforge", "open_clip"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        batch = args.train_batch if args.child == "train" else args.image_batch
        print(json.dumps(child(args.child, args.impl, args.model, batch, args.calls, args.warmup, args.threads)))
        return 0

    torch.set_num_threads(args.threads)
    peak = matmul_peak(torch.bfloat16)
    cfg = get_model_config(args.model)
    work = {"train": 3 * pair_forward_flops(args.model, cfg)[0] * args.train_batch,
            "image": image_forward_flops(args.model, cfg)[0] * args.image_batch} if cfg.vision_cfg.patch_size else {}
    results: dict = {"hardware": hardware_note(args.threads), "model": args.model, "bf16_peak_flops": peak,
                     "kinds": {}}
    impls = ("clipforge", "open_clip") if args.open_clip else ("clipforge",)
    runs = [(impl, name) for impl in impls for name in SETTINGS]
    for kind in args.kinds.split(","):
        turns: dict[str, list[dict]] = {run_name(impl, name): [] for impl, name in runs}
        for _ in range(args.turns):
            for impl, name in runs:
                env = dict(os.environ, CLIPFORGE_KEEP_FREED_MEMORY=SETTINGS[name], OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--impl", impl, "--model",
                                      args.model, "--threads", str(args.threads), "--calls", str(args.calls),
                                      "--warmup", str(args.warmup), "--train-batch", str(args.train_batch),
                                      "--image-batch", str(args.image_batch)],
                                     capture_output=True, text=True, env=env, check=True)
                turns[run_name(impl, name)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {name: summarise(rows) for name, rows in turns.items()}
        base, kept = summary["glibc default"], summary["keep freed memory"]
        summary["speed-up (median wall, default / kept)"] = base["wall_s"] / kept["wall_s"]
        # per turn (the settings' children ran back to back): each child's median call
        turn_wall = {name: [median([row["wall_s"] for row in turn["calls"]]) for turn in rows]
                     for name, rows in turns.items()}
        spreads = {"default / kept": round_ratios(turn_wall["keep freed memory"], turn_wall["glibc default"])}
        for name in turns:
            row = summary[name]
            row["mfu_of_bf16_peak"] = work[kind] / row["wall_s"] / peak if work else float("nan")  # ViTs only
        comparisons = {}  # which settings the two ran under -> clipforge's speed over open_clip's
        if args.open_clip:
            oc = {name: summary[run_name("open_clip", name)]["wall_s"] for name in SETTINGS}
            comparisons = {"both glibc default": oc["glibc default"] / base["wall_s"],
                           "both keeping freed memory": oc["keep freed memory"] / kept["wall_s"],
                           "as each ships": oc["glibc default"] / kept["wall_s"]}
            summary |= {f"clipforge vs open_clip, {label}": ratio for label, ratio in comparisons.items()}
            pairs = {"both glibc default": ("glibc default", "glibc default"),
                     "both keeping freed memory": ("keep freed memory", "keep freed memory"),
                     "as each ships": ("keep freed memory", "glibc default")}
            for label, (ours, theirs) in pairs.items():
                spreads[label] = round_ratios(turn_wall[ours], turn_wall[run_name("open_clip", theirs)])
        summary["ratio_rounds"] = spreads
        summary["raw"] = turns
        results["kinds"][kind] = summary
        print(f"{kind}: default {base['wall_s']:.3f} s ({base['minor_faults']:.0f} faults, sys {base['sys_s']:.3f} s,"
              f" peak {base['peak_rss_mb']:.0f} MB, MFU {base['mfu_of_bf16_peak']:.1%}); kept {kept['wall_s']:.3f} s ({kept['minor_faults']:.0f} faults,"
              f" sys {kept['sys_s']:.3f} s, peak {kept['peak_rss_mb']:.0f} MB, MFU {kept['mfu_of_bf16_peak']:.1%}); "
              f"{format_ratio(base['wall_s'] / kept['wall_s'], spreads['default / kept'])}", flush=True)
        for label, ratio in comparisons.items():
            print(f"  clipforge vs open_clip, {label}: {format_ratio(ratio, spreads[label])}", flush=True)
    print(f"bf16 matmul peak {peak / 1e12:.2f} TFLOP/s; {results['hardware']}")
    if args.output:
        write_atomic(args.output, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
