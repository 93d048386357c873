"""Evaluation during training: the evaluators of `cfg.eval.tasks`, every `cfg.eval.every` steps and after the
last step, on rank 0, with the run's tokenizer; metrics go to log.jsonl, TensorBoard / W&B and the progress bar.

They are `eval.evaluators.Evaluator`s, the objects `clipforge eval` and the demo run, so a number logged here is
the number `clipforge eval TASK --model RUN_DIR/checkpoints/step-N` gives for that checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tqdm import tqdm

from ..models.lock import set_locked_eval
from ..tokenizer import tokenizer_for
from .setup import Progress, RunContext


def headline_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """Top-1 accuracies and recall@1 of each evaluator, for the progress bar."""
    out = {}
    for name, result in metrics.items():
        for key in ("acc1", "text_retrieval_recall@1", "image_retrieval_recall@1"):
            if isinstance(result.get(key), float):
                out[f"{name} {key}"] = result[key]
    return out


class EvalHook:
    """Runs the configured evaluators on the model being trained (rank 0; the others wait at their next
    collective)."""

    def __init__(self, ctx: RunContext, bar: tqdm) -> None:
        from ..eval.evaluators import Evaluator  # noqa: PLC0415 - pulls in the evaluation data code

        self.every, self.last, self.bar = ctx.cfg.eval.every, ctx.cfg.steps, bar
        root = ctx.cfg.data.root  # offline corpora: where the training data is, unless an entry says otherwise
        tasks = [replace(t, root=root) if t.root is None and root else t for t in ctx.cfg.eval.tasks]
        self.evaluators = [Evaluator.from_task(task, run_dir=ctx.run_dir) for task in tasks]
        # the model's own tokenizer at its full context, as `clipforge eval` derives it from a checkpoint
        self.tokenizer = tokenizer_for(ctx.core.config)

    def __call__(self, ctx: RunContext, progress: Progress, step: int) -> None:
        if not ctx.place.is_main or not self.every or (step % self.every and step != self.last):
            return
        from ..eval.evaluators import run_evaluators  # noqa: PLC0415

        metrics = run_evaluators(self.evaluators, ctx.core, self.tokenizer)
        set_locked_eval(ctx.core)  # locked towers back in eval mode after the evaluators restored train mode
        progress.last_eval = metrics
        ctx.log.write({"step": step, "eval": metrics})
        ctx.log.scalars(metrics, step, prefix="eval")
        shown = headline_numbers(metrics)
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))


def eval_hook(ctx: RunContext, bar: tqdm) -> list[EvalHook]:
    """The evaluation hook when `eval.every` is set and there are evaluators, else none."""
    return [EvalHook(ctx, bar)] if ctx.cfg.eval.every and ctx.cfg.eval.tasks else []
