"""Training-step levers against clipforge's eager bf16 step, in one run: PyTorch's fused attention kernel in
place of the explicit bf16 attention clipforge picks on CPU, and the for-each AdamW in place of the fused one.

All variants run the trainer's step (`clipforge.train.step.train_step`, precision `bf16` autocast) on copies
of one model and batch, taking turns of `--block` steps (the first of each turn not timed); then the optimizer
step alone (fused vs for-each, same parameters and gradients) is timed the same way. torch.compile of the step
is measured by `bench_train_step.py` (its `compiled-*` modes).

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/bench_train_levers.py --threads 1 \
        --output docs/benchmarks/train-levers-avx512-1thread.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from typing import Callable

import torch

from common import (format_ratio, hardware_note, median, random_images, random_tokens, round_ratios, sdpa_attention,
                    time_interleaved, write_atomic)

from clipforge import create_model, get_model_config
from clipforge.train.config import OptimConfig, TrainConfig
from clipforge.train.step import Stepper, build_stepper, train_step


def with_foreach_adamw(stepper: Stepper) -> Stepper:
    """The same stepper with a for-each (multi-tensor, unfused) AdamW over the same parameter groups."""
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in stepper.optimizer.param_groups]
    return dataclasses.replace(stepper, optimizer=torch.optim.AdamW(groups, foreach=True))


def step_calls(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Callable[[], None]]:
    cfg = TrainConfig(precision="bf16", optim=OptimConfig(lr=1e-5, weight_decay=0.1, grad_clip=1.0))
    eager = build_stepper(cfg, copy.deepcopy(model))
    sdpa = build_stepper(cfg, copy.deepcopy(model))
    foreach = with_foreach_adamw(build_stepper(cfg, copy.deepcopy(model)))

    def sdpa_step() -> None:
        with sdpa_attention():
            train_step(sdpa, images, tokens, lr=1e-5)

    return {"eager bf16 (explicit attention, fused AdamW)": lambda: train_step(eager, images, tokens, lr=1e-5),
            "fused SDPA attention": sdpa_step,
            "for-each AdamW": lambda: train_step(foreach, images, tokens, lr=1e-5)}


def optimizer_calls(model: torch.nn.Module) -> dict[str, Callable[[], None]]:
    """The AdamW step alone over the model's parameters, with random gradients, fused and for-each."""
    calls = {}
    for name, flags in (("AdamW step fused", {"fused": True}), ("AdamW step for-each", {"foreach": True})):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, **flags)
        calls[name] = optimizer.step
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(hardware_note(args.threads), flush=True)
    cfg = get_model_config(args.model)
    torch.manual_seed(0)
    model = create_model(args.model).train()
    gen = torch.Generator().manual_seed(0)
    images, tokens = random_images(cfg, args.batch, gen), random_tokens(args.batch, cfg.text_cfg.context_length, gen)
    steps = time_interleaved(step_calls(model, images, tokens), args.steps, warmup=0, block=args.block)
    optim = time_interleaved(optimizer_calls(model), args.steps, warmup=1, block=1)
    secs = {k: median(v) for k, v in {**steps, **optim}.items()}
    base = secs["eager bf16 (explicit attention, fused AdamW)"]
    print(f"\n{args.model}, batch {args.batch}, bf16 autocast, median of {args.steps} interleaved steps:")
    base_key = "eager bf16 (explicit attention, fused AdamW)"
    rounds = {key: round_ratios(times, steps[base_key]) for key, times in steps.items()}  # per turn, vs the base
    for key, sec in secs.items():
        rel = f"  {format_ratio(base / sec, rounds[key])} the eager step" if key in steps else ""
        print(f"  {key:48s} {sec:7.3f} s{rel}")
    ratio = secs["AdamW step for-each"] / secs["AdamW step fused"]
    rounds["fused AdamW vs for-each"] = round_ratios(optim["AdamW step fused"], optim["AdamW step for-each"])
    print(f"  fused AdamW is {format_ratio(ratio, rounds['fused AdamW vs for-each'])} faster than for-each; it is "
          f"{secs['AdamW step fused'] / base:.1%} of the step")
    print(hardware_note(args.threads))
    if args.output:
        result = {"machine": hardware_note(args.threads), "model": args.model, "batch": args.batch,
                  "seconds": secs, "all_seconds": {**steps, **optim}, "ratio_rounds": rounds}
        write_atomic(args.output, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
