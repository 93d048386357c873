"""Running a study: write the architecture, skip finished cells, train the rest in parallel, report."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_text
from .cell import finished, run_cell
from .config import Cell, expand_cells, load_study
from .report import write_report


@dataclass
class StudyOutcome:
    """What a call of `run_study` did: cells run now, skipped as already finished, failed (id -> error)."""

    output_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _worker_init(threads: int) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def _brief(metrics: dict[str, float]) -> str:
    """A cell's headline for the progress log: the synthetic battery's, or the first real-data metrics."""
    if "zeroshot_seen_top1" in metrics:
        return (f"zero-shot seen {metrics['zeroshot_seen_top1']:.3f} held-out {metrics['zeroshot_heldout_top1']:.3f}, "
                f"margin {metrics['margin_i2t']:.3f}")
    return ", ".join(f"{key} {value:.3f}" for key, value in list(metrics.items())[:3])


def _run_pending(pending: list[Cell], output_dir: Path, jobs: int, threads: int,
                 log: Callable[[str], None], outcome: StudyOutcome) -> None:
    def done(cell: Cell, record: dict[str, Any] | None, error: BaseException | None) -> None:
        count = len(outcome.ran) + len(outcome.failed) + 1
        if error is not None:
            outcome.failed[cell.id] = f"{type(error).__name__}: {error}"
            log(f"[{count}/{len(pending)}] {cell.id} FAILED: {outcome.failed[cell.id]}")
            return
        assert record is not None
        outcome.ran.append(cell.id)
        log(f"[{count}/{len(pending)}] {cell.id}: {_brief(record['metrics'])}, {record['wall_seconds']:.0f} s")

    if jobs == 1:
        for cell in pending:
            try:
                done(cell, run_cell(cell, output_dir, threads), None)
            except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others
                done(cell, None, exc)
        return
    # spawn, not fork: each worker starts a clean interpreter with its own thread settings
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:  # fmt: skip
        futures = {pool.submit(run_cell, cell, output_dir, threads): cell for cell in pending}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                done(cell, future.result(), None)
            except Exception as exc:  # noqa: BLE001
                done(cell, None, exc)


def run_study(
    config: str | Path,
    output_dir: str | Path,
    jobs: int = 1,
    figures_dir: str | Path | None = None,
    report_only: bool = False,
    log: Callable[[str], None] = print,
    command: str | None = None,
    threads: int | None = None,
) -> StudyOutcome:
    """Train every unfinished cell of the study in `config` (up to `jobs` at once), then write the report.

    Each process gets `threads` torch threads, by default max(1, cores // jobs).
    Finished cells (result JSON present with the current fingerprint) are skipped, so an interrupted study
    resumes where it stopped. With `report_only`, nothing is trained: the report covers the cells finished.
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
    log(f"Study {config}: {len(cells)} cells ({len(study.variants)} variants x {len(study.seeds)} seeds), "
        f"{len(outcome.skipped)} already finished, {0 if report_only else len(pending)} to run "
        f"with {jobs} job(s) x {threads} thread(s).")
    if not report_only and pending:
        start = time.perf_counter()
        _run_pending(pending, output_dir, jobs, threads, log, outcome)
        log(f"Ran {len(outcome.ran)} cells in {(time.perf_counter() - start) / 60:.1f} min"
            + (f"; {len(outcome.failed)} failed" if outcome.failed else ""))
    outcome.summary = write_report(study, cells, output_dir, figures_dir, command)
    log(f"Results: {output_dir / 'results.md'} ({outcome.summary['cells_finished']} of "
        f"{outcome.summary['cells_total']} cells); figures: {figures_dir or output_dir / 'figures'}")
    return outcome
