"""Dense vs tiled CLIP loss: forward+backward time and peak memory growth, batch 1k .. 64k, fp32.

Each configuration runs in a fresh subprocess, so allocator caches and earlier peaks never leak into a
measurement. Memory: once the features exist, the process resets its resident high-water mark
(`echo 5 > /proc/self/clear_refs`) and reads VmRSS, runs the first forward+backward, then reads VmHWM. The
difference is what the loss's forward and backward added at their peak (feature gradients included). Time:
the best of the following steps (`--repeats` in all, 1 above 16k, when the first step's time is used).
Dense runs that would not fit are skipped, with the estimate that says so, from the bytes per B^2 element
measured on the largest dense run that did fit.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_loss.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_BATCHES = (1024, 4096, 8192, 16384, 32768, 65536)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def worker(mode: str, batch: int, dim: int, chunk: int, repeats: int) -> dict:
    """One configuration, in this (fresh) process: time and peak memory growth of loss forward+backward."""
    import torch
    import torch.nn.functional as F

    from clipforge.losses import clip_loss

    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(image.detach() + torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    chunk_size = chunk if mode == "chunked" else None

    def step() -> float:
        for t in (image, text, log_scale):
            t.grad = None
        start = time.perf_counter()
        loss = clip_loss(image, text, log_scale.exp(), chunk_size=chunk_size)
        loss.backward()
        return time.perf_counter() - start

    # Memory on the first step: a warm-up would leave freed pages resident and hide part of the peak.
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    base_kib = _status_kib("VmRSS")
    times = [step()]
    peak_kib = _status_kib("VmHWM")
    # Time: the best of the later steps when there are any (the first carries one-off costs).
    later = [step() for _ in range(repeats - 1)]
    times = later or times
    return {
        "mode": mode,
        "batch": batch,
        "seconds": min(times),
        "peak_growth_bytes": (peak_kib - base_kib) * 1024,
        "threads": torch.get_num_threads(),
    }


def _run_worker(mode: str, batch: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", mode, "--batch", str(batch), "--dim", str(args.dim),
        "--chunk", str(args.chunk), "--repeats", str(args.repeats if batch <= 16384 else 1),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} at batch {batch} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096, help="tile size of the chunked loss")
    parser.add_argument("--repeats", type=int, default=3, help="steps per config (1 above 16k)")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip dense runs whose estimated growth exceeds this fraction of MemAvailable")
    parser.add_argument("--worker", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.dim, args.chunk, args.repeats)))
        return

    print(f"clip_loss forward+backward, fp32, d={args.dim}, tile {args.chunk}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    header = (f"{'batch':>7} | {'dense s':>8} {'dense GiB':>10} | {'chunk s':>8} {'chunk GiB':>10} | "
              f"{'time x':>7} {'mem x':>8}")
    print(header)
    print("-" * len(header))
    rows, bytes_per_element = [], None
    for batch in args.batches:
        dense, note = None, ""
        estimate = None if bytes_per_element is None else bytes_per_element * batch * batch
        if estimate is not None and estimate > args.memory_fraction * _available_bytes():
            note = (f"dense skipped: est. {_gib(estimate)} GiB ({bytes_per_element:.1f} B per B^2 element) > "
                    f"{args.memory_fraction:.0%} of {_gib(_available_bytes())} GiB available")
        else:
            dense = _run_worker("dense", batch, args)
            bytes_per_element = dense["peak_growth_bytes"] / (batch * batch)
        chunked = _run_worker("chunked", batch, args)
        rows.append({"batch": batch, "dense": dense, "chunked": chunked, "note": note})
        d_s = f"{dense['seconds']:8.3f}" if dense else f"{'-':>8}"
        d_m = f"{_gib(dense['peak_growth_bytes']):>10}" if dense else f"{'-':>10}"
        ratio_t = f"{chunked['seconds'] / dense['seconds']:7.2f}" if dense else f"{'-':>7}"
        ratio_m = f"{chunked['peak_growth_bytes'] / max(dense['peak_growth_bytes'], 1):8.4f}" if dense else f"{'-':>8}"
        print(f"{batch:>7} | {d_s} {d_m} | {chunked['seconds']:8.3f} {_gib(chunked['peak_growth_bytes']):>10} | "
              f"{ratio_t} {ratio_m}  {note}", flush=True)
    print("time x = chunked / dense time; mem x = chunked / dense peak growth; GiB = peak RSS growth of the step")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
