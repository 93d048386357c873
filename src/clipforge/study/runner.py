"""Running a study: write the architecture, skip finished cells, train the rest in parallel, report.

The first SIGTERM/SIGINT stops the study: no further cell starts, the cells in training save a checkpoint
and stop (in pool workers too, told through a shared flag), and `StudyOutcome.stopped` names the signal. The
next run resumes those cells (`study.resume`). A second signal ends the process at once, as in `train`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_text
from ..train.guard import StopRequest
from .cell import finished, run_cell
from .config import Cell, Study, expand_cells, load_study
from .report import write_report
from .resume import CellInterrupted

RENDER_CACHE = "render-cache"  # under OUTPUT_DIR/runs: scratch, like the runs of unfinished cells
POLL_SECONDS = 0.5  # how often the parent of a pool looks at its stop request while cells train


@dataclass
class StudyOutcome:
    """What a call of `run_study` did: cells run now, skipped as already finished, failed (id -> error), and
    whether a signal stopped it (its name; `interrupted`: the cells that saved a checkpoint and stopped)."""

    output_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None
    interrupted: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number when a signal stopped the study (as `clipforge train`), else 1 if a cell
        failed, else 0."""
        if self.stopped:
            return 128 + int(signal.Signals[self.stopped])
        return 1 if self.failed else 0


# In a pool worker: the parent's stop flag (a shared int, the signal number; 0 while none), set once by
# `_worker_init` because shared memory reaches a spawned process only through its creation arguments.
_WORKER_STOP: Any = None


def _worker_init(threads: int, stop_flag: Any) -> None:
    import torch  # noqa: PLC0415

    global _WORKER_STOP  # noqa: PLW0603 - one value per worker process, fixed at its start
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    _WORKER_STOP = stop_flag
    # The parent decides when the study stops (a Ctrl-C reaches every process of the group): between cells a
    # worker ignores signals; while training, `train`'s own handlers take them and save a checkpoint.
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _StopWhenFlagged:
    """A training hook in a pool worker: once the parent raises the flag, send this process the parent's
    signal, so that the trainer stops the usual way (a checkpoint at the next step boundary)."""

    def __init__(self, flag: Any) -> None:
        self.flag, self.sent = flag, False

    def __call__(self, *_: Any) -> None:
        if self.flag.value and not self.sent:
            self.sent = True
            signal.raise_signal(self.flag.value)


def _pool_cell(cell: Cell, output_dir: str, threads: int) -> dict[str, Any]:
    """`run_cell` in a pool worker; a cell taken from the queue after the stop is not started."""
    if _WORKER_STOP.value:
        raise CellInterrupted(cell.id, signal.Signals(_WORKER_STOP.value).name)
    return run_cell(cell, output_dir, threads, hooks=(_StopWhenFlagged(_WORKER_STOP),))


def _brief(metrics: dict[str, float]) -> str:
    """A cell's headline for the progress log: the synthetic battery's, or the first real-data metrics."""
    if "zeroshot_seen_top1" in metrics:
        return (f"zero-shot seen {metrics['zeroshot_seen_top1']:.3f} held-out {metrics['zeroshot_heldout_top1']:.3f}, "
                f"margin {metrics['margin_i2t']:.3f}")
    return ", ".join(f"{key} {value:.3f}" for key, value in list(metrics.items())[:3])


class _Progress:
    """Logs each cell as it ends and files it in the outcome; an interrupted cell stops the study."""

    def __init__(self, pending: int, log: Callable[[str], None], outcome: StudyOutcome, stop: StopRequest):
        self.pending, self.log, self.outcome, self.stop = pending, log, outcome, stop

    def __call__(self, cell: Cell, future: Future) -> None:
        outcome = self.outcome
        count = len(outcome.ran) + len(outcome.failed) + len(outcome.interrupted) + 1
        try:
            record = future.result()
        except CellInterrupted as exc:
            if self.stop.received is None:  # the signal reached the trainer, not this process's handler
                self.stop.received = exc.signal
            if exc.checkpoint is not None:
                outcome.interrupted.append(cell.id)
                self.log(f"[{count}/{self.pending}] {cell.id} STOPPED by {exc.signal} after step {exc.steps} "
                         f"(not finished; checkpoint {exc.checkpoint})")
            return
        except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others
            outcome.failed[cell.id] = f"{type(exc).__name__}: {exc}"
            self.log(f"[{count}/{self.pending}] {cell.id} FAILED: {outcome.failed[cell.id]}")
            return
        outcome.ran.append(cell.id)
        self.log(f"[{count}/{self.pending}] {cell.id}: {_brief(record['metrics'])}, {record['wall_seconds']:.0f} s")


def _settled(call: Callable[[], Any]) -> Future:
    """A finished future holding call()'s result or exception, so both paths report cells alike."""
    future: Future = Future()
    try:
        future.set_result(call())
    except Exception as exc:  # noqa: BLE001 - reported by _Progress
        future.set_exception(exc)
    return future


def _run_serial(pending: list[Cell], output_dir: Path, threads: int, report: _Progress) -> None:
    for cell in pending:
        if report.stop.requested:  # a signal between cells (during an evaluation): start no other
            return
        report(cell, _settled(lambda: run_cell(cell, output_dir, threads)))


def _run_pool(pending: list[Cell], output_dir: Path, jobs: int, threads: int, report: _Progress) -> None:
    context = get_context("spawn")  # not fork: each worker starts a clean interpreter with its own threads
    flag = context.Value("i", 0)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                             initargs=(threads, flag)) as pool:  # fmt: skip
        futures = {pool.submit(_pool_cell, cell, str(output_dir), threads): cell for cell in pending}
        waiting = set(futures)
        while waiting:
            ended, waiting = wait(waiting, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in ended:
                if not future.cancelled():
                    report(futures[future], future)
            if report.stop.received is not None and not flag.value:
                flag.value = int(signal.Signals[report.stop.received])  # running cells save and stop
                for future in waiting:
                    future.cancel()  # those not yet handed to a worker; handed ones see the flag


def _run_pending(pending: list[Cell], output_dir: Path, jobs: int, threads: int,
                 log: Callable[[str], None], outcome: StudyOutcome) -> None:
    with StopRequest() as stop:
        report = _Progress(len(pending), log, outcome, stop)
        if jobs == 1:
            _run_serial(pending, output_dir, threads, report)
        else:
            _run_pool(pending, output_dir, jobs, threads, report)
    outcome.stopped = stop.received


def _with_render_cache(cell: Cell, cache_dir: Path) -> Cell:
    if cell.train.data.source != "synthetic":
        return cell
    data = replace(cell.train.data, render_cache=str(cache_dir))
    return replace(cell, train=replace(cell.train, data=data))


def _grid(study: Study, cells: int) -> str:
    extra = cells - len(study.variants) * len(study.seeds)
    return (f"{cells} cells ({len(study.variants)} variants x {len(study.seeds)} seeds"
            + (f" + {extra} at extra seeds)" if extra else ")"))


def run_study(
    config: str | Path,
    output_dir: str | Path,
    jobs: int = 1,
    figures_dir: str | Path | None = None,
    report_only: bool = False,
    log: Callable[[str], None] = print,
    command: str | None = None,
    threads: int | None = None,
    render_cache: bool = True,
) -> StudyOutcome:
    """Train every unfinished cell of the study in `config` (up to `jobs` at once), then write the report.

    Each process gets `threads` torch threads, by default max(1, cores // jobs).
    Finished cells (result JSON present with the current fingerprint) are skipped, so an interrupted study
    resumes where it stopped. With `report_only`, nothing is trained: the report covers the cells finished.
    A SIGTERM/SIGINT stops the study (see the module docstring): `outcome.stopped` names it, and the report
    still covers the cells finished.
    With `render_cache`, cells on the synthetic world keep their rendered training pairs in
    OUTPUT_DIR/runs/render-cache, so the cells that share a seed render its stream once (same batches, bit for
    bit); the folder is removed once every cell has finished.
    """
    if jobs < 1:
        raise ValueError(f"--jobs: expected at least 1, got {jobs}")
    study = load_study(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / "model.json"
    atomic_write_text(model_path, json.dumps(study.model_config, indent=2))
    atomic_write_text(output_dir / "study.yaml", Path(config).read_text())
    cells = expand_cells(study, str(model_path), str(output_dir / "runs"))
    outcome = StudyOutcome(output_dir)
    pending: list[Cell] = []
    for cell in cells:
        if finished(output_dir, cell):
            outcome.skipped.append(cell.id)
        else:
            pending.append(cell)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    elif threads < 1:
        raise ValueError(f"threads: expected at least 1, got {threads}")
    log(f"Study {config}: {_grid(study, len(cells))}, {len(outcome.skipped)} already finished, "
        f"{0 if report_only else len(pending)} to run "
        f"with {jobs} job(s) x {threads} thread(s).")
    if not report_only and pending:
        start = time.perf_counter()
        cache_dir = output_dir / "runs" / RENDER_CACHE
        if render_cache:
            pending = [_with_render_cache(cell, cache_dir) for cell in pending]
        _run_pending(pending, output_dir, jobs, threads, log, outcome)
        if all(finished(output_dir, cell) for cell in cells) and cache_dir.is_dir():
            shutil.rmtree(cache_dir, ignore_errors=True)  # no cell left to read it
        log(f"Ran {len(outcome.ran)} cells in {(time.perf_counter() - start) / 60:.1f} min"
            + (f"; {len(outcome.failed)} failed" if outcome.failed else "")
            + (f"; stopped by {outcome.stopped}" if outcome.stopped else ""))
    outcome.summary = write_report(study, cells, output_dir, figures_dir, command)
    log(f"Results: {output_dir / 'results.md'} ({outcome.summary['cells_finished']} of "
        f"{outcome.summary['cells_total']} cells); figures: {figures_dir or output_dir / 'figures'}")
    return outcome
