"""`clipforge eval TASK`: resolve the model and the data, run the task, return CLIP_benchmark-style metrics.

The task is an `eval.evaluators.Evaluator`, the same object the demo, the study and training run. Tasks: `zeroshot` (prompt ensemble vs a single template), `retrieval` (several captions per image),
`linear-probe` (the CLIP paper's protocol, optionally k-shot), `robustness` (zero-shot under shifts, drop and
effective robustness) and `margins` (per-sample margins within batches). Image features are cached on disk
(`features.cached_image_features`), so a second task on the same images costs only the text side.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..allocator import reuse_freed_memory
from ..config import ConfigError
from . import TASKS
from .evaluators import EvalOptions, Evaluator
from ..transforms import model_preprocess
from .resolve import eval_device, model_tokenizer, resolve_model

__all__ = ["EvalOptions", "Evaluator", "check_options", "default_cache_dir", "eval_device", "finite_or_none",
           "resolve_model", "run_eval"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "clipforge" / "features"


def check_options(task: str, opts: EvalOptions) -> None:
    """Options that cannot work for `task`, refused before any model or data is loaded."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    if opts.plot and task in ("robustness", "margins"):
        raise ConfigError(f"--plot: {task} has no figure; its numbers are in the JSON")
    if opts.plot and task == "linear-probe" and not opts.shots:
        raise ConfigError("--plot for linear-probe draws the zero-shot vs k-shot curve: give --shots too")
    if opts.synonyms and task != "zeroshot":
        raise ConfigError(f"--synonyms: only for zeroshot, not {task}")
    if opts.head and task != "zeroshot":
        raise ConfigError(f"--head: a trained head classifies; it applies to the zeroshot task, not {task}")
    if any(k < 1 for k in opts.shots) or opts.draws < 1:
        raise ConfigError("--shots and --draws: expected positive integers")


def run_eval(task: str, model_spec: str, dataset: str, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Run `task` for the model `model_spec` on `dataset`; returns the results dict written as JSON."""
    opts = opts or EvalOptions()
    check_options(task, opts)
    device = eval_device(opts.device)  # a bad --device stops before the model is loaded
    reuse_freed_memory()
    start = time.perf_counter()
    model, run_dir = resolve_model(model_spec, device, opts.load)
    tokenizer = model_tokenizer(model, model_spec)
    evaluator = Evaluator(task, dataset, opts).with_run_dir(run_dir or opts.source.run_dir)
    results = evaluator.run(model, tokenizer)
    header = {"task": task, "model": model_spec, "dataset": dataset, "split": opts.split,
              "preprocess": opts.preprocess or model_preprocess(model).mode}
    return {**header, **results, "seconds": round(time.perf_counter() - start, 2)}


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value
