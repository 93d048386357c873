"""The run's log: `log.jsonl` (one JSON object per line) and one-line notices on stderr; rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..checkpoint import atomic_write_text


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


class RunLog:
    """Appends entries to log.jsonl; `notice` also prints one line. Silent on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled, self.handle = path, enabled, None
        if not enabled:
            return
        kept = entries_until(path, resume_step) if resume_step is not None else []
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

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
        if self.handle is not None:
            self.handle.close()
            self.handle = None
