"""What one evaluator measures, as plain config: an entry of a training config's `eval.tasks` list.

Kept free of torch and of the evaluation code itself, so that `train.config` can validate it cheaply;
`eval.evaluators.Evaluator.from_task` turns it into the evaluator that `clipforge eval` runs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError

TaskName = Literal["zeroshot", "retrieval", "linear-probe", "robustness", "margins"]


@dataclass(frozen=True)
class EvalTask:
    """One evaluator: the `clipforge eval` task on a dataset, with the command's options (same names)."""

    task: TaskName
    dataset: str = "synthetic"  # synthetic, an offline corpus name, a manifest path or an image folder
    split: str = "test"
    name: str | None = None  # key of its metrics in logs; default "task/dataset" (+ "/split" unless test)
    limit: int | None = None  # at most this many images (a fixed seeded subset)
    templates: str | None = None  # template set or file; default: the dataset's own
    root: str | None = None  # data root of the offline corpora
    language: str = "en"
    per_class: int = 20  # synthetic: images per class
    pairs: int = 1000  # synthetic: image-caption pairs for retrieval and margins
    captions_per_image: int = 1  # synthetic: captions per retrieval image
    synonyms: bool = False  # synthetic zero-shot: also with class names in words the captions never use
    shots: tuple[int, ...] = ()  # linear-probe: k-shot probes
    draws: int = 5
    batch_size: int = 256  # margins: pairs per batch
    seed: int = 0

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        return f"{self.task}/{self.dataset}" + ("" if self.split == "test" else f"/{self.split}")

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for field_name in ("per_class", "draws", "batch_size", "captions_per_image"):
            if getattr(self, field_name) < 1:
                raise ConfigError(f"config key '{p}{field_name}': expected a positive integer, "
                                  f"got {getattr(self, field_name)}")
        if self.pairs < 10:
            raise ConfigError(f"config key '{p}pairs': expected at least 10, got {self.pairs}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config key '{p}limit': expected a positive number of images or null, got {self.limit}")
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"config key '{p}shots': expected positive integers, got {list(self.shots)}")
        if self.synonyms and (self.task != "zeroshot" or self.dataset != "synthetic"):
            raise ConfigError(f"config key '{p}synonyms': only for task zeroshot on dataset synthetic")


# What `clipforge demo` and a config without an `eval.tasks` list measure: the synthetic world's zero-shot
# (seen and held-out combinations) and retrieval on 1,000 held-out pairs.
SYNTHETIC_TASKS = (EvalTask("zeroshot", templates="synthetic"), EvalTask("retrieval"))
