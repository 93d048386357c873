"""Keeping a run alive and stopping it cleanly: stop signals, non-finite steps, and one agreement per step.

Every rank must take the same decisions at the same step (skip this update, stop here, abort), or the ranks
fall out of step and the next collective hangs. So each step, after the backward pass, every rank contributes
its local facts (non-finite loss or gradient, a stop signal received, bad samples read) to one small
all-reduce, and all ranks act on the sum.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Sequence

import torch


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (after saving a checkpoint); the message is one line saying why."""


@dataclass(frozen=True)
class StepConsensus:
    """What all ranks together saw in one step."""

    nonfinite: bool  # some rank had a NaN/inf loss or gradient: nobody updates
    stop: bool  # some rank received SIGTERM/SIGINT: everybody saves and stops after this step
    counts: tuple[int, ...]  # data counters summed over ranks (see BadDataTally.vector)


def reach_consensus(nonfinite: bool, stop: bool, counts: Sequence[int], distributed: bool) -> StepConsensus:
    """Combine this rank's step facts with every other rank's (one all-reduce when distributed)."""
    if not distributed:
        return StepConsensus(nonfinite, stop, tuple(int(c) for c in counts))
    from ..dist import all_reduce_sum  # noqa: PLC0415 - only distributed runs need torch.distributed

    local = torch.tensor([float(nonfinite), float(stop), *map(float, counts)], dtype=torch.float64)
    total = all_reduce_sum(local).tolist()
    return StepConsensus(total[0] > 0, total[1] > 0, tuple(int(round(c)) for c in total[2:]))


class NonFiniteGuard:
    """Counts skipped steps; `record` says when `limit` non-finite steps came in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def record(self, nonfinite: bool) -> bool:
        """Note one step; True when the run should stop (the limit of consecutive non-finite steps is hit)."""
        if nonfinite:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
        return self.consecutive >= self.limit

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """The loss and the total gradient norm are both finite (a NaN/inf in any gradient makes the norm so)."""
    return bool(torch.isfinite(loss.detach()).all() and torch.isfinite(grad_norm).all())


class StopRequest:
    """SIGTERM or SIGINT asks the run to save and stop at the next step boundary.

    After the first signal the handlers go back to their defaults, so a second Ctrl-C raises KeyboardInterrupt
    at once (and a second SIGTERM terminates): checkpoints are written atomically, so that corrupts nothing.
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + int(signal.Signals[self.received]) if self.received else 0
