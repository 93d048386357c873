"""QuickGELU where no gradient is recorded: the formula as written (three new buffers) against an in-place form
(one buffer), in one run. A lever tried on 2026-12-04 and not adopted: no resolved gain (README, Benchmarks).

Both are timed inside the same bf16 image embedding (`profile_step.inference_call`: ViT-B-32, batch 32, bf16
weights, freed memory kept as `clipforge embed` keeps it), the activation swapped between turns (A B A B …), so
only the ratio means anything. The two forms give bit-identical features (checked
here): the same operations in the same order.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_quick_gelu.py --threads 2 \
        --output docs/benchmarks/quick-gelu-amx-2thread.json
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from common import finish_report, format_ratio, hardware_note, median, round_ratios, time_interleaved

from clipforge.allocator import reuse_freed_memory
from clipforge.models import layers


def in_place(self: layers.QuickGELU, x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) with the sigmoid and the product taken in place on one new buffer (no autograd)."""
    return (x * 1.702).sigmoid_().mul_(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each form, in turns")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    print(hardware_note(args.threads), flush=True)
    from profile_step import inference_call  # noqa: PLC0415 - after the allocator is set

    call = inference_call(args.model, args.batch, "cpu")
    as_written = layers.QuickGELU.forward

    def with_form(form: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            layers.QuickGELU.forward = form
            try:
                return call()
            finally:
                layers.QuickGELU.forward = as_written
        return run

    forms = {"in place": with_form(in_place), "as written (clipforge)": with_form(as_written)}
    same = torch.equal(*(run() for run in forms.values()))
    times = time_interleaved(forms, args.repeats, warmup=2, block=2)
    ours, theirs = times["in place"], times["as written (clipforge)"]
    rounds = round_ratios(ours, theirs)
    ratio = median(theirs) / median(ours)
    print(f"{args.model} bf16 image embedding, batch {args.batch}: in place {median(ours) * 1e3:.1f} ms, "
          f"as written {median(theirs) * 1e3:.1f} ms, {format_ratio(ratio, rounds)}; features identical: {same}")
    report = {"machine": hardware_note(args.threads), "model": args.model, "batch": args.batch,
              "features_identical": same, "seconds": times, "speed_up": ratio, "ratio_rounds": rounds}
    finish_report(report, args.threads, args.output)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
