"""The training configuration: frozen dataclasses loaded strictly from YAML plus `--key=value` overrides.

The defaults are the demo run (`clipforge demo`) but for its weight decay (`demo.DEMO_OVERRIDES`), so
`configs/demo.yaml` restates them with that one change.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from ..config import ConfigError, apply_overrides, from_dict, read_yaml_mapping
from ..data.synthetic import SyntheticConfig
from ..eval.spec import SYNTHETIC_TASKS, EvalTask
from ..losses import LossConfig
from .finetune import FinetuneConfig


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from: the embedded synthetic world, a CSV/TSV manifest, or tar shards."""

    source: Literal["synthetic", "manifest", "offline", "shards"] = "synthetic"
    path: str | None = None  # manifest file or shard pattern
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 0  # synthetic rendering is cheap: inline beats a worker competing for 2 cores
    # Bad samples (unreadable/missing/bomb images, empty or non-UTF-8 captions) are skipped and counted; the run
    # stops once they exceed this fraction of the samples read, checked after `bad_min_samples` reads.
    max_bad_fraction: float = 0.1
    bad_min_samples: int = 100
    max_image_pixels: int = 89_478_485  # larger images are refused as decompression bombs (PIL's default)
    context_length: int | None = None  # tokens per caption; None: the model's context length
    split: str | None = None  # manifest: train on the rows of this split only (null: every row)
    datasets: tuple[str, ...] = ()  # offline: prepared caption corpora whose train splits are used together
    root: str | None = None  # offline: data root (null: $CLIPFORGE_DATA or ~/.cache/clipforge/data)
    preload: bool = False  # manifest/offline: decode and shrink every image once, keep it in memory
    # synthetic: keep the rendered training pairs in this folder, shared by runs that train on the same world
    # (a study's cells with one seed); null renders every pair. Bit-for-bit the same batches either way.
    render_cache: str | None = None

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.source in ("manifest", "shards") and not self.path:
            raise ConfigError(f"config key '{p}path': required when {p}source is '{self.source}'")
        if self.source == "offline" and not self.datasets:
            raise ConfigError(f"config key '{p}datasets': list the offline datasets when {p}source is 'offline'")
        if self.render_cache is not None and self.source != "synthetic":
            raise ConfigError(f"config key '{p}render_cache': only the synthetic source renders its pairs "
                              f"(source is '{self.source}'); expected null")
        if self.num_workers < 0:
            raise ConfigError(f"config key '{p}num_workers': expected >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(
                f"config key '{p}max_bad_fraction': expected a fraction in [0, 1], got {self.max_bad_fraction}"
            )
        if self.bad_min_samples < 1:
            raise ConfigError(
                f"config key '{p}bad_min_samples': expected a positive integer, got {self.bad_min_samples}"
            )
        if self.max_image_pixels < 1:
            raise ConfigError(
                f"config key '{p}max_image_pixels': expected a positive integer, got {self.max_image_pixels}"
            )
        if self.context_length is not None and self.context_length < 2:
            raise ConfigError(
                f"config key '{p}context_length': expected at least 2 (start and end tokens) or null, "
                f"got {self.context_length}"
            )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"config key '{p}lr': expected a positive learning rate, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key '{p}weight_decay': expected >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"config key '{p}{name}': expected a value in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key '{p}warmup_steps': expected >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key '{p}min_lr_ratio': expected a fraction in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"config key '{p}grad_clip': expected a positive norm or null, got {self.grad_clip}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluators run during training, every `every` steps and after the last step (rank 0), with the same code
    and data as `clipforge eval`; `clipforge demo` runs them once after training."""

    every: int | None = None
    tasks: tuple[EvalTask, ...] = SYNTHETIC_TASKS

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.every is not None and self.every <= 0:
            raise ConfigError(f"config key '{p}every': expected a positive number of steps or null, got {self.every}")
        keys = [t.key for t in self.tasks]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated:
            raise ConfigError(f"config key '{p}tasks': two entries are named '{repeated}'; give one a `name`")


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go besides log.jsonl: TensorBoard event files in the run directory, Weights & Biases."""

    tensorboard: bool | None = None  # null: event files when TensorBoard is installed (the [log] extra); true: required
    wandb: bool = False  # needs `pip install wandb` (not a clipforge dependency)
    wandb_project: str = "clipforge"


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: `nan_steps` lists step numbers (1-based, as in log.jsonl) whose loss is NaN."""

    nan_steps: tuple[int, ...] = ()

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for step in self.nan_steps:
            if step < 1:
                raise ConfigError(f"config key '{p}nan_steps': step numbers start at 1, got {step}")


# early_stop.monitor -> the log key of the validation signal it follows (`train.early_stop` logs all three)
MONITOR_KEYS = {"loss": "val_loss", "fixed_t_loss": "val_loss_fixed_t", "recall": "val_r1"}
EARLY_STOP_MONITORS = tuple(MONITOR_KEYS)


@dataclass(frozen=True)
class EarlyStopConfig:
    """`patience` null (the default) trains for exactly `steps`; a number turns plateau stopping on."""

    patience: int | None = None  # validations in a row without improvement before stopping
    min_delta: float = 0.0  # an improvement must lower the best validation loss by more than this
    every: int = 50  # steps between validations
    batches: int = 4  # validation batches of `batch_size` pairs, the same ones every time
    split: str = "val"  # manifest / offline sources: the split that holds the validation rows
    # the signal the rule follows: loss (at the learned temperature), fixed_t_loss, recall (`train.early_stop`)
    monitor: str = "loss"
    fixed_temperature: float = 0.07  # the temperature of fixed_t_loss (CLIP's initial one)
    restore_best: bool = False  # the final model is the one at the best check, not the last step

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.monitor not in EARLY_STOP_MONITORS:
            raise ConfigError(f"config key '{p}monitor': expected one of {', '.join(EARLY_STOP_MONITORS)}, "
                              f"got '{self.monitor}'")
        if not (math.isfinite(self.fixed_temperature) and self.fixed_temperature > 0.0):
            raise ConfigError(f"config key '{p}fixed_temperature': expected a positive number, "
                              f"got {self.fixed_temperature}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"config key '{p}patience': expected a positive integer or null, got {self.patience}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0.0):
            raise ConfigError(f"config key '{p}min_delta': expected a finite number >= 0, got {self.min_delta}")
        for key in ("every", "batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{p}{key}': expected a positive integer, got {getattr(self, key)}")
        if not self.split:
            raise ConfigError(f"config key '{p}split': expected a split name such as 'val'")


RESUME_MODES = ("auto", "latest")


def check_threads(threads: int | None, what: str) -> None:
    """A thread count torch can use: 1 up to this machine's CPUs (far larger counts crash its thread pool)."""
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:
        raise ConfigError(f"{what}: expected 1 to {cpus} (the CPUs of this machine), got {threads}")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "RN-Tiny-64"
    seed: int = 0
    steps: int = 1200
    batch_size: int = 128
    # fp32; bf16 autocast; bf16-master: bf16 weights computing without autocast, fp32 master weights updated
    # by the optimizer and saved in checkpoints
    precision: Literal["fp32", "bf16", "bf16-master"] = "bf16"
    accum_chunk: int | None = None  # exact contrastive accumulation: embed each rank's batch this many at a time
    compile: bool = False  # torch.compile the model (CPU: needs a C++ compiler; the first steps compile)
    channels_last: bool = True  # NHWC convolutions for convolutional towers (ResNet)
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    fixed_temperature: float | None = None  # fixes exp(logit_scale) = 1 / T and does not learn it
    output_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 10
    save_every: int | None = None
    grad_checkpointing: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Stop on a plateau of the validation contrastive loss (off unless early_stop.patience is set); `steps`
    # is then the budget, and the cosine schedule spans it.
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # Fault tolerance. resume: "auto" (continue from the run's latest checkpoint if there is one), "latest"
    # (must exist), or a checkpoint / run directory path. Checkpoints are written every `save_every` steps.
    resume: str | None = None
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # consecutive NaN/inf steps (each skipped) before the run saves and stops
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self, prefix: str = "") -> None:
        if self.steps <= 0:
            raise ConfigError(f"config key 'steps': expected a positive integer, got {self.steps}")
        if self.batch_size < 2:
            raise ConfigError(f"config key 'batch_size': a contrastive batch needs at least 2 pairs, got {self.batch_size}")
        if self.fixed_temperature is not None and not 0.0 < self.fixed_temperature <= 10.0:
            raise ConfigError(
                f"config key 'fixed_temperature': expected a temperature in (0, 10], got {self.fixed_temperature}"
            )
        if self.log_every <= 0:
            raise ConfigError(f"config key 'log_every': expected a positive integer, got {self.log_every}")
        if self.save_every is not None and self.save_every <= 0:
            raise ConfigError(f"config key 'save_every': expected a positive integer or null, got {self.save_every}")
        if self.accum_chunk is not None and self.accum_chunk < 1:
            raise ConfigError(f"config key 'accum_chunk': expected a positive number of pairs or null, "
                              f"got {self.accum_chunk}")
        check_threads(self.threads, "config key 'threads'")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"config key 'seed': expected an integer in [0, 2**32), got {self.seed}")
        if self.keep_checkpoints < 1:
            raise ConfigError(
                f"config key 'keep_checkpoints': expected a positive integer, got {self.keep_checkpoints}"
            )
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                f"config key 'max_nonfinite_steps': expected a positive integer, got {self.max_nonfinite_steps}"
            )
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("config key 'resume': expected 'auto', 'latest', a checkpoint path or null, got ''")
        late = [s for s in self.debug.nan_steps if s > self.steps]
        if late:
            raise ConfigError(f"config key 'debug.nan_steps': step {late[0]} is after the last step {self.steps}")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when `path` is None), apply `--a.b=value` overrides, validate."""
    data: dict[str, Any] = read_yaml_mapping(path, "config file") if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data)
