"""The run's log, rank 0 only: `log.jsonl` (one JSON object per line), one-line notices on stderr, and the same
numbers as scalars in TensorBoard event files (`RUN_DIR/tensorboard/`) and Weights & Biases when asked for.

View them with `tensorboard --logdir runs`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from ..checkpoint import atomic_write_text
from ..config import ConfigError
from .config import LogConfig


def _plain(value: Any) -> Any:
    """NaN/inf become null, so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def entries_until(path: Path, step: int) -> list[str]:
    """The lines of a log about steps <= `step` (a resumed run replaces what came after its checkpoint)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a crash: nothing after it can be trusted
        if int(entry.get("step", 0)) <= step:
            kept.append(line)
    return kept


def scalar_items(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite float in nested `values`, tags joined by '/'; counts (ints) and lists are
    left out."""
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from scalar_items(value, tag)
        elif isinstance(value, float) and math.isfinite(value):
            yield tag, float(value)


class ScalarSinks:
    """TensorBoard event files and a Weights & Biases run, as `log` in the training config asks."""

    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        self.writers: list[Callable[[dict[str, float], int], None]] = []
        self.closers: list[Callable[[], None]] = []
        self._start_tensorboard(cfg, run_dir, resume_step)
        self._start_wandb(cfg, run_dir, config)

    def _start_tensorboard(self, cfg: LogConfig, run_dir: Path, resume_step: int | None) -> None:
        if cfg.tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                if cfg.tensorboard is None:
                    return  # not asked for explicitly: log.jsonl alone
                raise ConfigError("config key 'log.tensorboard': TensorBoard is not installed "
                                  "(pip install -e \".[log]\", or --log.tensorboard=false)") from None
            # A resumed run drops the events logged after its checkpoint, as log.jsonl does.
            writer = SummaryWriter(str(run_dir / "tensorboard"),
                                   purge_step=None if resume_step is None else resume_step + 1)
            self.writers.append(lambda values, step: [writer.add_scalar(k, v, step) for k, v in values.items()])
            self.closers.append(writer.close)

    def _start_wandb(self, cfg: LogConfig, run_dir: Path, config: dict[str, Any]) -> None:
        if cfg.wandb:
            try:
                import wandb  # noqa: PLC0415
            except ImportError:
                raise ConfigError("config key 'log.wandb': Weights & Biases is not installed (pip install wandb)") from None
            run = wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), config=config,
                             id=run_dir.name, resume="allow")
            self.writers.append(lambda values, step: run.log(values, step=step))
            self.closers.append(run.finish)

    def write(self, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            writer(values, step)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers = []


class RunLog:
    """Appends entries to log.jsonl; `notice` also prints one line; `scalars` also go to TensorBoard / W&B.
    Silent on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None,
                 sinks: Callable[[], ScalarSinks] | None = None) -> None:
        self.path, self.enabled, self.handle = path, enabled, None
        self.sinks: ScalarSinks | None = None
        if not enabled:
            return
        kept = entries_until(path, resume_step) if resume_step is not None else []
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a")
        self.sinks = sinks() if sinks is not None else None

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        """The numbers in nested `values` as scalars tagged prefix/key/... (TensorBoard, W&B)."""
        if self.sinks is not None:
            self.sinks.write(dict(scalar_items(values, prefix)), step)

    def write(self, entry: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(_plain(entry)) + "\n")
            self.handle.flush()

    def notice(self, message: str, **event: Any) -> None:
        """Print `clipforge: message` on stderr and, if `event` is given, log it as an event line."""
        if not self.enabled:
            return
        tqdm.write(f"clipforge: {message}", file=sys.stderr)
        if event:
            self.write(event)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
        if self.handle is not None:
            self.handle.close()
            self.handle = None
