"""What a model knew before it was adapted, as one number per task, to measure forgetting.

A "before" task is named by a short spec:

- `synthetic`: zero-shot top-1 over the embedded synthetic world's 64 classes (what the demo's model knows);
- `zeroshot:DATASET`: zero-shot top-1 on a prepared dataset's test split (e.g. `zeroshot:openclipart`);
- `retrieval:DATASET`: retrieval recall@1 on a prepared caption corpus's test split, the mean of its two
  directions (image->text and text->image), so one number moves when either direction forgets.

The numbers come from the same evaluators as `clipforge eval`, so each is reproducible with one command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError
from ..study.stats import mean_std

KINDS = ("synthetic", "zeroshot", "retrieval")


@dataclass(frozen=True)
class BeforeTask:
    kind: str  # one of KINDS
    dataset: str = "synthetic"

    @property
    def spec(self) -> str:
        return self.kind if self.kind == "synthetic" else f"{self.kind}:{self.dataset}"

    @property
    def label(self) -> str:
        """A table header naming the metric."""
        if self.kind == "synthetic":
            return "synthetic zero-shot top-1"
        if self.kind == "zeroshot":
            return f"{self.dataset} zero-shot top-1"
        return f"{self.dataset} retrieval R@1 (mean of i→t, t→i)"


def parse_before(spec: str) -> BeforeTask:
    """`synthetic`, `zeroshot:DATASET` or `retrieval:DATASET`; anything else is a ConfigError naming it."""
    kind, _, dataset = spec.partition(":")
    if kind == "synthetic" and not dataset:
        return BeforeTask("synthetic")
    if kind in ("zeroshot", "retrieval") and dataset:
        return BeforeTask(kind, dataset)
    raise ConfigError(f"--before {spec!r}: expected 'synthetic', 'zeroshot:DATASET' or 'retrieval:DATASET'")


def retrieval_r1(metrics: dict[str, Any]) -> float:
    """Mean of image->text and text->image recall@1 (CLIP_benchmark names: `text_retrieval_recall@1` is an image
    finding its caption, `image_retrieval_recall@1` a caption finding its image)."""
    return 0.5 * (float(metrics["text_retrieval_recall@1"]) + float(metrics["image_retrieval_recall@1"]))


def before_score(model: torch.nn.Module, task: BeforeTask, root: str | None = None) -> float:
    """The task's one number for `model` (in [0, 1]), on the test split of the task's dataset."""
    from ..eval.evaluators import EvalOptions, Evaluator, synthetic_headline  # noqa: PLC0415
    from ..eval.tasks import SourceOptions  # noqa: PLC0415
    from ..tokenizer import tokenizer_for  # noqa: PLC0415

    tokenizer = tokenizer_for(model.config)  # type: ignore[arg-type]
    if task.kind == "synthetic":
        return synthetic_headline(model, tokenizer, pairs=10)["zeroshot_seen_top1"]
    opts = EvalOptions(source=SourceOptions(root=root), split="test")
    metrics = Evaluator(task.kind, task.dataset, opts).run(model, tokenizer)
    return float(metrics["acc1"]) if task.kind == "zeroshot" else retrieval_r1(metrics)


def summary_table(seeds: Sequence[dict[str, Any]], target_label: str, before_labels: dict[str, str],
                  fmt: Callable[[float, float], str] = lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}") -> str:
    """A Markdown table, one row per method: the target and each "before" task as mean ± std over the seeds.

    Each seed is {"target": {method: score}, "before": {spec: {method: score}}}."""
    header = f"| method | target: {target_label} (%) | " + " | ".join(
        f"before: {before_labels[spec]} (%)" for spec in before_labels) + " |"
    lines = [header, "|---" + "|---:" * (1 + len(before_labels)) + "|"]
    for method in seeds[0]["target"]:
        columns = [[s["target"][method] for s in seeds], *([s["before"][spec][method] for s in seeds]
                                                          for spec in before_labels)]
        cells = [fmt(m["mean"], m["std"]) for m in map(mean_std, columns)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
