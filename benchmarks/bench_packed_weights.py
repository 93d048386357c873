"""bf16 inference with the linear weights packed once for oneDNN (`models.layers.pack_linear_weights`, what
`speed.bf16_inference` does on a CPU with AMX) against the same model unpacked, in one run.

Two copies of ViT-B-32 with the same bf16 weights, one packed, take turns (A B A B …) embedding the same batch of
32 images and of 64 captions (freed memory kept, as `clipforge embed` runs); then each transformer-block GEMM shape
alone, F.linear against the packed oneDNN linear. Prints the ratios with their per-round ranges and how far the
features of the two copies are apart.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_packed_weights.py --threads 2 \
        --output docs/benchmarks/packed-weights-amx-2thread.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from common import (finish_report, format_ratio, hardware_note, median, random_images, random_tokens, round_ratios,
                    time_interleaved)

from clipforge import create_model, get_model_config
from clipforge.allocator import reuse_freed_memory
from clipforge.models.layers import pack_linear_weights
from clipforge.speed import cast_matmul_weights


def compare(name: str, calls: dict, repeats: int) -> dict:
    times = time_interleaved(calls, repeats, warmup=2, block=2)
    ratio = median(times["unpacked"]) / median(times["packed"])
    rounds = round_ratios(times["packed"], times["unpacked"])
    print(f"{name}: packed {median(times['packed']) * 1e3:.2f} ms, unpacked {median(times['unpacked']) * 1e3:.2f} ms, "
          f"{format_ratio(ratio, rounds)}", flush=True)
    return {"seconds": times, "speed_up": ratio, "ratio_rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each copy, in turns")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    note = hardware_note(args.threads)
    print(note, flush=True)
    cfg = get_model_config(args.model)
    torch.manual_seed(0)
    unpacked = cast_matmul_weights(create_model(args.model)).eval()
    packed = copy.deepcopy(unpacked)
    count = pack_linear_weights(packed)
    if not count:
        print("error: oneDNN has no bf16 kernels on this machine; nothing to pack", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, args.image_batch, gen).to(torch.bfloat16)
    tokens = random_tokens(args.text_batch, cfg.text_cfg.context_length, gen)

    def embed(model: torch.nn.Module, kind: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return model.encode_image(images) if kind == "image" else model.encode_text(tokens)
        return call

    report: dict = {"machine": note, "model": args.model, "packed_weights": count, "results": {}}
    for kind in ("image", "text"):
        diff = (embed(packed, kind)().float() - embed(unpacked, kind)().float()).abs().max().item()
        batch = args.image_batch if kind == "image" else args.text_batch
        result = compare(f"{args.model} bf16 {kind} embedding, batch {batch}",
                         {"packed": embed(packed, kind), "unpacked": embed(unpacked, kind)}, args.repeats)
        print(f"  features: largest difference {diff:.2e}")
        report["results"][f"{kind} embedding"] = result | {"max_feature_difference": diff}
    width, hidden, rows = cfg.vision_cfg.width, int(cfg.vision_cfg.width * cfg.vision_cfg.mlp_ratio), \
        args.image_batch * ((cfg.vision_cfg.image_size // cfg.vision_cfg.patch_size) ** 2 + 1)
    for k, n in ((width, 3 * width), (width, hidden), (hidden, width), (width, width)):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        b = torch.randn(n, generator=gen).to(torch.bfloat16)
        blocked = torch.ops.mkldnn._reorder_linear_weight(w)

        def plain(x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor = b) -> torch.Tensor:
            with torch.inference_mode():
                return F.linear(x, w, b)

        def oneDNN(x: torch.Tensor = x, blocked: torch.Tensor = blocked, b: torch.Tensor = b) -> torch.Tensor:
            with torch.inference_mode():
                return torch.ops.mkldnn._linear_pointwise(x, blocked, b, "none", [], "")

        same = torch.equal(plain(), oneDNN())
        result = compare(f"  GEMM {rows}x{k} @ {k}x{n}", {"packed": oneDNN, "unpacked": plain}, args.repeats)
        report["results"][f"gemm {rows}x{k}x{n}"] = result | {"identical": same}
    finish_report(report, args.threads, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
