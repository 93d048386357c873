"""Image embedding throughput of a ResNet tower with its convolutions stored NCHW (PyTorch's default) and NHWC
(`speed.channels_last`, what `clipforge eval`, `embed`, `search` and `serve` now load, as training already did).

Both copies have the same weights; their features are checked to agree before timing. Calls alternate between the
two layouts and medians are reported, so a change of the machine's load hits both alike. fp32 always; bf16
weights (`speed.bf16_inference`) too where the CPU has native bf16 (elsewhere it is emulated and beside the point).

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_layout.py --threads 2 \\
        --models RN-Tiny-64:128,RN50:16 --output docs/benchmarks/layout-avx2-2thread.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from common import format_ratio, hardware_note, median, random_images, round_ratios, time_interleaved, write_atomic

from clipforge import create_model, get_model_config
from clipforge.speed import bf16_inference, channels_last, cpu_supports_bf16


def bench(name: str, batch: int, precision: str, repeats: int) -> dict:
    """Seconds per call of both layouts (all calls and medians) and the NHWC / NCHW speed ratio."""
    torch.manual_seed(0)
    nchw = create_model(name).eval()
    if precision == "bf16-weights":
        nchw = bf16_inference(nchw)
    nhwc = copy.deepcopy(nchw)
    if not channels_last(nhwc):
        raise SystemExit(f"{name}: no convolutional tower; the layout changes nothing")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    images = random_images(get_model_config(name), batch, torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        diff = float((nchw.encode_image(images).float() - nhwc.encode_image(images).float()).abs().max())  # warm-up
        times = time_interleaved({"NCHW": lambda: nchw.encode_image(images),
                                  "NHWC": lambda: nhwc.encode_image(images)}, repeats, warmup=0)
    secs = {k: median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "precision": precision, "max_feature_diff": diff, "seconds": secs,
            "images_per_s": {k: batch / v for k, v in secs.items()}, "nhwc_speedup": secs["NCHW"] / secs["NHWC"],
            "nhwc_speedup_rounds": round_ratios(times["NHWC"], times["NCHW"]), "all_seconds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="RN-Tiny-64:128,RN50:16", help="NAME:BATCH,... (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    note = hardware_note(args.threads)
    print(note, flush=True)
    precisions = ["fp32"] + (["bf16-weights"] if cpu_supports_bf16() else [])
    results = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        for precision in precisions:
            r = bench(name, int(batch), precision, args.repeats)
            results.append(r)
            print(f"  {name} batch {batch} {precision}: NCHW {r['images_per_s']['NCHW']:.1f}, NHWC "
                  f"{r['images_per_s']['NHWC']:.1f} images/s = {format_ratio(r['nhwc_speedup'], r['nhwc_speedup_rounds'])} "
                  f"(features differ by {r['max_feature_diff']:.1e})", flush=True)
    if args.output:
        write_atomic(args.output, json.dumps({"machine": note, "threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
