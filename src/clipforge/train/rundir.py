"""Rules that keep a run directory's files safe: where it may be, one writer at a time, resumes that lose nothing.

- `run_name` is one folder name inside `output_dir` (never a path that climbs out of it).
- A run holds an exclusive lock on `RUN_DIR/.lock` while it trains; a second `train` on the same directory
  stops at once with one line instead of interleaving its checkpoints and log with the first one's.
- Resuming never deletes what the user may still want: `--resume=auto` over checkpoints that are all unusable is
  refused (starting again would rewrite the log and let rotation delete them), and resuming from an older
  checkpoint of the same run is refused while newer checkpoints or the finished model exist (it would delete
  the ones and overwrite the other).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..checkpoint import MANIFEST_NAME, list_checkpoints
from ..config import ConfigError
from .config import RESUME_MODES, TrainConfig

LOCK_NAME = ".lock"


def check_run_name(name: str | None) -> None:
    """ConfigError unless `name` is a single folder name (no separators, not '.' or '..')."""
    if name is None:
        return
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"config key 'run_name': expected one folder name inside output_dir, got {name!r}")


@dataclass
class RunLock:
    """An exclusive POSIX record lock on the run directory's lock file; released by `release()` or at exit.

    `fcntl.lockf` rather than `flock`: record locks belong to the process, so DataLoader workers forked from it
    do not keep holding the lock for seconds after the trainer itself was killed.
    """

    path: Path
    handle: IO[str] | None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the lock
            self.handle = None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Create `run_dir` if needed, check that files can be written in it, and take its lock."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
        handle = open(run_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise ConfigError(f"config key 'output_dir': cannot write in run directory {run_dir} "
                          f"({exc.strerror or exc})") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise ConfigError(f"run directory {run_dir} is in use by another training process"
                          f"{f' (pid {holder})' if holder else ''}: wait for it to end, or choose another "
                          "run_name or output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(run_dir / LOCK_NAME, handle)


def _checkpoint_step(path: Path) -> int:
    try:
        return int(json.loads((path / MANIFEST_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def check_resume_loses_nothing(cfg: TrainConfig, run_dir: Path, target: Path | None) -> None:
    """Refuse a resume (or a fresh start under `--resume=auto`) that would delete checkpoints or the final model.

    `target` is the checkpoint `train.run.resolve_resume` chose (None: start from step 0).
    """
    ckpt_root = run_dir / "checkpoints"
    existing = list_checkpoints(ckpt_root)
    if target is None:
        if cfg.resume == "auto" and existing:
            raise ConfigError(f"config key 'resume': every checkpoint in {ckpt_root} is unusable (see above); "
                              "nothing was changed: move them away to start this run again, or choose another "
                              "run_name")
        return
    if cfg.resume in RESUME_MODES:
        return  # the newest usable checkpoint: only unusable newer ones are replaced
    step = _checkpoint_step(target)
    newer = [s for s, path in existing if s > step and path.resolve() != target.resolve()]
    final = run_dir / "model.safetensors"
    if newer or (final.is_file() and step < cfg.steps):
        what = [f"checkpoints of steps {', '.join(map(str, newer))}"] if newer else []
        what += [f"the finished model {final.name}"] if final.is_file() and step < cfg.steps else []
        raise ConfigError(f"config key 'resume': {target} is at step {step}, but {run_dir} already holds "
                          f"{' and '.join(what)}, which resuming here would delete or overwrite: resume it under "
                          "another run_name, or move them away first")
