"""ViT-B-32 training throughput and MFU on a CUDA GPU in bf16, against Hugging Face transformers' CLIPModel.

Same step as `bench_train_step.py` (forward, CLIP loss, backward, fused AdamW), on one GPU: clipforge under
bf16 autocast (optionally `torch.compile`d, and with bf16 weights + fp32 master weights) against
transformers under bf16 autocast with its SDPA attention, same architecture and weights. MFU is the model
FLOPs (3 x 14.8 GFLOP per pair) per second as a fraction of the best bf16 matmul rate measured in this
process (square matmuls of 4096-8192). Exits with status 2 and a one-line message when there is no GPU.

    PYTHONPATH=src:benchmarks python benchmarks/bench_gpu.py --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

from bench_train_step import clipforge_step, hf_step
from common import pair_forward_flops, random_images, random_tokens, time_interleaved, twin_models

from clipforge import create_model


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


def synced(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        step()
        torch.cuda.synchronize()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time clipforge under torch.compile")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg, ours, hf = twin_models(args.model)
    ours, hf = ours.cuda().train(), hf.cuda().train()
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, args.batch, gen).cuda()
    tokens = random_tokens(args.batch, cfg.text_cfg.context_length, gen).cuda()
    runs = {"clipforge bf16": synced(clipforge_step(ours, images, tokens, "bf16", "cuda")),
            "transformers bf16": synced(hf_step(hf, images, tokens, "bf16", "cuda"))}
    if args.compile:
        runs["clipforge bf16 compiled"] = synced(clipforge_step(create_model(args.model).cuda().train(), images,
                                                                tokens, "compiled-bf16", "cuda"))
    runs["clipforge bf16-master"] = synced(clipforge_step(create_model(args.model).cuda().train(), images, tokens,
                                                          "bf16-master", "cuda"))
    start = time.perf_counter()
    times = time_interleaved(runs, args.steps, warmup=2)
    peak = gpu_matmul_peak()
    flops_per_step = 3 * pair_forward_flops(args.model, cfg)[0] * args.batch
    print(f"{torch.cuda.get_device_name()}, {args.model}, batch {args.batch}, median of {args.steps} steps "
          f"({time.perf_counter() - start:.0f} s); bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    rows = {}
    for name, values in times.items():
        seconds = sorted(values)[len(values) // 2]
        rows[name] = {"samples_per_s": args.batch / seconds, "mfu": flops_per_step / seconds / peak}
        print(f"  {name:28s} {rows[name]['samples_per_s']:9.1f} samples/s  MFU {rows[name]['mfu']:6.1%}")
    base = rows["transformers bf16"]["samples_per_s"]
    for name, row in rows.items():
        if name.startswith("clipforge"):
            print(f"  {name} / transformers bf16: {row['samples_per_s'] / base:.2f}x")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "peak_bf16": peak, "rows": rows,
                       "all_seconds": times, **vars(args)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
