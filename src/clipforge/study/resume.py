"""A cell stopped by a signal: never recorded as finished, and continued from its own checkpoint on the next run.

`train` answers SIGTERM/SIGINT by saving a checkpoint and returning early; `run_cell` turns that into
`CellInterrupted` instead of evaluating a half-trained model. The next `run_study` resumes the cell with the
trainer's exact resumption when the checkpoint is provably this cell's (`cell_train_config`), and trains it
from scratch otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text, latest_valid_checkpoint, list_checkpoints
from ..config import to_dict
from ..train.config import TrainConfig
from ..train.setup import MAY_CHANGE_ON_RESUME, run_directory
from ..train.state import STATE_FILE, config_differences
from .config import Cell

# In each cell's run directory: which cell configuration (fingerprint) its checkpoints belong to.
CELL_MARKER = "study-cell.json"
# ...and the CPU and wall seconds the cell's interrupted sessions spent, so that a resumed cell's record counts the
# whole cost of the cell rather than the last session's
TIME_FILE = "study-time.json"


class CellInterrupted(Exception):
    """A cell's training was stopped by `signal` after `steps` steps; `checkpoint` is where it was saved (None:
    the cell never started). All fields are constructor arguments, so it crosses process boundaries intact."""

    def __init__(self, cell: str, signal: str, steps: int = 0, checkpoint: str | None = None) -> None:
        super().__init__(cell, signal, steps, checkpoint)
        self.cell, self.signal, self.steps, self.checkpoint = cell, signal, steps, checkpoint

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"{self.cell}: not started ({self.signal})"
        return f"{self.cell}: stopped by {self.signal} after step {self.steps}; checkpoint {self.checkpoint}"


def spent_before(run_dir: Path) -> dict[str, float]:
    """{"cpu_seconds", "wall_seconds", "sessions"} of the cell's earlier, interrupted training sessions ({} when
    none was recorded: a fresh cell, or one whose earlier session crashed without saying)."""
    try:
        spent = json.loads((run_dir / TIME_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return spent if isinstance(spent, dict) else {}


def record_spent(run_dir: Path, cpu_seconds: float, wall_seconds: float, earlier: dict[str, float]) -> None:
    """Add this interrupted session's time to what `earlier` sessions spent, in the run directory (atomic)."""
    spent = {"cpu_seconds": float(earlier.get("cpu_seconds", 0.0)) + cpu_seconds,
             "wall_seconds": float(earlier.get("wall_seconds", 0.0)) + wall_seconds,
             "sessions": int(earlier.get("sessions", 0)) + 1}
    atomic_write_text(run_dir / TIME_FILE, json.dumps(spent))


def _saved_state(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's state.json, or None if unreadable."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def resumable(cell: Cell, state: dict[str, Any]) -> bool:
    """Whether the trainer's resumption from a checkpoint with this `state` reproduces an uninterrupted run of
    this cell exactly: with early_stop.patience only if it holds the plateau rule's state (saved since that state
    was checkpointed; without it the rule would start afresh and might stop at another step)."""
    if cell.train.early_stop.patience is None:
        return True
    extra = state.get("extra")
    return isinstance(extra, dict) and extra.get("plateau") is not None


def _marked_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / CELL_MARKER).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _same_training(state: dict[str, Any], cfg: TrainConfig) -> bool:
    """The checkpoint's resolved config equals `cfg` wherever the trainer refuses a resume that differs (a
    study directory moved since then changes the model path, for one)."""
    saved = state.get("config")
    return isinstance(saved, dict) and not config_differences(saved, to_dict(cfg), set(MAY_CHANGE_ON_RESUME))


def cell_train_config(cell: Cell) -> TrainConfig:
    """The config to train `cell` with: resuming its latest checkpoint when that checkpoint is this very cell
    configuration's (the run directory's marker holds the cell fingerprint, which also covers the architecture
    behind the model path) and the resumption is exact; otherwise a fresh start, after removing checkpoints
    left by another configuration, an unresumable run or a crash (the trainer refuses to start over them)."""
    run_dir = run_directory(cell.train)
    root = run_dir / "checkpoints"
    if list_checkpoints(root):
        say = lambda m: print(f"clipforge: {cell.id}: {m}", file=sys.stderr)  # noqa: E731
        latest = latest_valid_checkpoint(root, say)
        state = _saved_state(latest) if latest is not None else None
        if (state is not None and resumable(cell, state) and _marked_fingerprint(run_dir) == cell.fingerprint()
                and _same_training(state, cell.train)):
            return replace(cell.train, resume="latest")
        shutil.rmtree(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CELL_MARKER, json.dumps({"cell": cell.id, "fingerprint": cell.fingerprint()}))
    return replace(cell.train, resume=None)


def last_step_entry(run_dir: Path) -> dict[str, Any]:
    """The last per-step training entry of the run's log.jsonl ({} if none): what `TrainResult.last_log` holds
    after an uninterrupted run, needed when a resumed run had no step left to log (stopped after its last step)."""
    path = run_dir / "log.jsonl"
    last: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry and "event" not in entry:
                last = entry
    return last
