"""Two QuickGELU levers tried on 2026-12-04 and not adopted (README, Benchmarks), each against the formula as written.

1. Where no gradient is recorded: an in-place form (one new buffer instead of three) against the formula.
2. In training: the activation alone, forward + backward in bf16 on a ViT-B-32 block's MLP hidden state (image
   tower [16, 50, 3072], text tower [16, 77, 2048]), eager against `torch.compile` (Inductor fuses each direction
   into one C++ kernel; the first call's compile time is reported too).

The first is timed inside bf16 image embedding (`profile_step.inference_call`: ViT-B-32, batch 32, bf16 weights,
freed memory kept as `clipforge embed` keeps it), the activation swapped between turns (A B A B …), so only the
ratio means anything; its two forms give bit-identical features (checked here: the same operations in the same
order). The second takes turns the same way, eager and compiled.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_quick_gelu.py --threads 2 \
        --output docs/benchmarks/quick-gelu-amx-2thread.json
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

from common import finish_report, format_ratio, hardware_note, median, round_ratios, time_interleaved

from clipforge.allocator import reuse_freed_memory
from clipforge.models import layers


def in_place(self: layers.QuickGELU, x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) with the sigmoid and the product taken in place on one new buffer (no autograd)."""
    return (x * 1.702).sigmoid_().mul_(x)


def _step(act: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of `act` at `x`."""
    def run() -> None:
        x.grad = None
        act(x).backward(grad)
    return run


def kernel_alone(repeats: int) -> dict[str, dict]:
    """Forward + backward of the activation alone, eager against compiled, per shape."""
    compiled = torch.compile(layers.QuickGELU())
    eager = layers.QuickGELU()
    results = {}
    for shape in ((16, 50, 3072), (16, 77, 2048)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

        start = time.perf_counter()
        _step(compiled, x, grad)()
        first_call = time.perf_counter() - start
        times = time_interleaved({"compiled": _step(compiled, x, grad), "eager": _step(eager, x, grad)}, repeats,
                                 warmup=2)
        rounds = round_ratios(times["compiled"], times["eager"])
        ratio = median(times["eager"]) / median(times["compiled"])
        name = "x".join(map(str, shape))
        print(f"QuickGELU forward + backward, bf16 {name}: eager {median(times['eager']) * 1e3:.2f} ms, compiled "
              f"{median(times['compiled']) * 1e3:.2f} ms, {format_ratio(ratio, rounds)}; first compiled call "
              f"(compiles) {first_call:.1f} s")
        results[name] = {"seconds": times, "speed_up": ratio, "ratio_rounds": rounds, "first_call_s": first_call}
    return results


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
    note = hardware_note(args.threads)
    print(note, flush=True)
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
    report = {"machine": note, "model": args.model, "batch": args.batch,
              "features_identical": same, "seconds": times, "speed_up": ratio, "ratio_rounds": rounds,
              "training_kernel": kernel_alone(args.repeats)}
    finish_report(report, args.threads, args.output)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
