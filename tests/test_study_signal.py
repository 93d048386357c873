"""A signal during a study: the interrupted cell is not recorded as finished, the study stops without starting
another cell (in pool workers too), the CLI says so with 128 + the signal's number, and a rerun resumes the
cell from its checkpoint to exactly the result of an uninterrupted run."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.study import run_study
from clipforge.study import cell as study_cell
from clipforge.study.resume import CELL_MARKER, TIME_FILE
from clipforge.train import loop
from test_study import TINY, write_study

# TINY at 4 steps, so that a signal after step 1 leaves steps to resume (the stop lands at the next boundary).
SIGNAL_STUDY = copy.deepcopy(TINY)
SIGNAL_STUDY["train"]["steps"] = 4
FIRST, SECOND = "clip--seed0", "reg-0.5--seed0"
TIMING = {"train_seconds", "eval_seconds", "samples_per_s", "elapsed_s"}  # wall-clock, never equal


class SignalEscaped(Exception):
    pass


@pytest.fixture(autouse=True)
def catch_escaping_signals():
    """Without the study's handling a signal would end pytest; this makes it a test failure instead."""
    def escaped(signum, _frame):
        raise SignalEscaped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, escaped) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def signal_during_training(monkeypatch, cell_id: str, after_step: int, signum=signal.SIGTERM) -> None:
    """Send this process `signum` from a training hook of cell `cell_id` after step `after_step`."""
    real_train = study_cell.train

    def sender(ctx, _progress, step):
        if ctx.cfg.run_name == cell_id and step == after_step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(study_cell, "train", lambda cfg, **kw: real_train(cfg, **{**kw, "hooks": (sender,)}))


def quiet(_line: str) -> None:
    pass


def without_timing(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in TIMING}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The cells of SIGNAL_STUDY run once without a signal: {cell id: record}."""
    root = tmp_path_factory.mktemp("reference")
    outcome = run_study(write_study(root, SIGNAL_STUDY), root / "out", jobs=1, threads=1, log=quiet)
    assert not outcome.failed and outcome.stopped is None
    return {cid: json.loads((root / "out" / "cells" / f"{cid}.json").read_text()) for cid in (FIRST, SECOND)}


@pytest.mark.parametrize("after_step", [1, 3])  # 3: the stop lands after the last step; nothing left to train
def test_an_interrupted_cell_is_not_finished_and_resumes_exactly(tmp_path, monkeypatch, uninterrupted, after_step):
    config, out = write_study(tmp_path, SIGNAL_STUDY), tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, after_step)
    first = run_study(config, out, jobs=1, threads=1, log=quiet)
    assert first.stopped == "SIGTERM" and first.exit_code == 143
    assert first.interrupted == [FIRST] and first.ran == [] and not first.failed
    assert not (out / "cells" / f"{FIRST}.json").exists()  # not recorded as finished
    assert not (out / "runs" / SECOND).exists()  # the next cell never started
    checkpoint = out / "runs" / FIRST / "checkpoints" / f"step-{after_step + 1:08d}"
    assert checkpoint.is_dir() and first.summary["cells_finished"] == 0
    spent = json.loads((out / "runs" / FIRST / TIME_FILE).read_text())  # the interrupted session's cost
    assert spent["sessions"] == 1 and spent["cpu_seconds"] > 0 and spent["wall_seconds"] > 0

    monkeypatch.undo()
    second = run_study(config, out, jobs=1, threads=1, log=quiet)
    assert sorted(second.ran) == [FIRST, SECOND] and second.stopped is None and not second.failed
    log = [json.loads(line) for line in (out / "runs" / FIRST / "log.jsonl").read_text().splitlines()]
    assert [e["path"] for e in log if e.get("event") == "resumed"] == [str(checkpoint)]  # resumed, not retrained
    record = json.loads((out / "cells" / f"{FIRST}.json").read_text())
    reference = uninterrupted[FIRST]
    assert record["fingerprint"] == reference["fingerprint"]
    assert without_timing(record["metrics"]) == without_timing(reference["metrics"])
    assert without_timing(record["final_log"]) == without_timing(reference["final_log"])
    assert record["final_log"]["step"] == 4
    # the record counts both sessions' time, not the last one's
    assert record["resumed"] == {"sessions": 2, "time_complete": True}
    assert record["cpu_seconds"] > spent["cpu_seconds"] and record["wall_seconds"] > spent["wall_seconds"]
    assert second.summary["cpu_seconds"]["cells"] == 2


def test_a_changed_cell_starts_over_instead_of_resuming(tmp_path, monkeypatch, uninterrupted):
    """Checkpoints of another configuration of the cell are discarded (the trainer refuses to start over them)."""
    out = tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, 1)
    assert run_study(write_study(tmp_path, SIGNAL_STUDY), out, jobs=1, threads=1, log=quiet).interrupted == [FIRST]
    monkeypatch.undo()
    changed = copy.deepcopy(SIGNAL_STUDY)
    changed["train"]["optim"] = {"lr": 1e-4}
    outcome = run_study(write_study(tmp_path, changed), out, jobs=1, threads=1, log=quiet)
    assert sorted(outcome.ran) == [FIRST, SECOND] and not outcome.failed
    log = (out / "runs" / FIRST / "log.jsonl").read_text()
    assert '"resumed"' not in log
    assert json.loads((out / "runs" / FIRST / CELL_MARKER).read_text())["fingerprint"] != \
        uninterrupted[FIRST]["fingerprint"]


def _early_stopping_study(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(SIGNAL_STUDY)
    data.update(variants=[TINY["variants"][0]])
    data["train"]["steps"] = 6
    data["train"]["early_stop"] = {"patience": 2, "every": 2, "batches": 1}
    return write_study(root, data)


def test_an_early_stopping_cell_resumes_exactly(tmp_path, monkeypatch):
    """The plateau rule's state travels in the checkpoint, so the resumed cell equals the uninterrupted one."""
    reference = run_study(_early_stopping_study(tmp_path / "ref"), tmp_path / "ref" / "out", jobs=1, threads=1,
                          log=quiet)
    assert reference.ran == [FIRST]
    config, out = _early_stopping_study(tmp_path), tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, 2)  # lands at step 3, after the first validation (step 2)
    assert run_study(config, out, jobs=1, threads=1, log=quiet).interrupted == [FIRST]
    monkeypatch.undo()
    outcome = run_study(config, out, jobs=1, threads=1, log=quiet)
    assert outcome.ran == [FIRST] and not outcome.failed
    assert '"resumed"' in (out / "runs" / FIRST / "log.jsonl").read_text()
    record, expected = (json.loads((root / "cells" / f"{FIRST}.json").read_text())
                        for root in (out, tmp_path / "ref" / "out"))  # fmt: skip
    assert record["early_stop"] == expected["early_stop"]
    assert without_timing(record["metrics"]) == without_timing(expected["metrics"])


def test_an_early_stopping_cell_without_plateau_state_is_trained_again(tmp_path, monkeypatch):
    """A checkpoint saved without the rule's state (older code) would not reproduce the cell: trained afresh."""
    config, out = _early_stopping_study(tmp_path), tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, 1)
    real = loop.extra_state
    monkeypatch.setattr(loop, "extra_state", lambda ctx, progress: {k: v for k, v in real(ctx, progress).items()
                                                                    if k != "plateau"})  # fmt: skip
    assert run_study(config, out, jobs=1, threads=1, log=quiet).interrupted == [FIRST]
    assert list((out / "runs" / FIRST / "checkpoints").iterdir())
    monkeypatch.undo()
    outcome = run_study(config, out, jobs=1, threads=1, log=quiet)
    assert outcome.ran == [FIRST] and not outcome.failed
    assert '"resumed"' not in (out / "runs" / FIRST / "log.jsonl").read_text()


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_says_how_to_resume_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys, signum, status):
    config, out = write_study(tmp_path, SIGNAL_STUDY), tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, 1, signum)
    summary = tmp_path / "summary.json"
    assert main(["study", str(config), "--output-dir", str(out), "--threads", "1", "--output", str(summary)]) == status
    lines = capsys.readouterr().out.strip().splitlines()
    name = signal.Signals(signum).name
    assert lines[-1] == f"Stopped by {name} after 0 of 2 cells; run the same command again to resume"
    assert not summary.exists() and not (out / "cells" / f"{FIRST}.json").exists()


def test_a_signal_between_cells_lets_the_finished_one_count_and_starts_no_other(tmp_path, monkeypatch):
    """SIGINT while the first cell is evaluated (outside training): that cell is fully trained and recorded."""
    real_evaluate, sent = study_cell.evaluate_cell, []

    def evaluate_then_signal(*args, **kwargs):
        if not sent:  # once: a second SIGINT would be the hard stop (KeyboardInterrupt)
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(study_cell, "evaluate_cell", evaluate_then_signal)
    out = tmp_path / "out"
    outcome = run_study(write_study(tmp_path, SIGNAL_STUDY), out, jobs=1, threads=1, log=quiet)
    assert outcome.stopped == "SIGINT" and outcome.exit_code == 130 and outcome.ran == [FIRST]
    assert (out / "cells" / f"{FIRST}.json").is_file() and not (out / "runs" / SECOND).exists()
    assert outcome.summary["cells_finished"] == 1


def test_a_signal_stops_the_pool_workers_and_cancels_the_queue(tmp_path):
    """jobs=2 over 3 long cells: SIGTERM to the parent alone makes both training workers save and stop, and the
    third cell never starts."""
    data = copy.deepcopy(TINY)
    data.update(seeds=[0, 1, 2], variants=[TINY["variants"][0]])
    data["train"].update(steps=500, save_every=None)
    out = tmp_path / "out"
    runs = [out / "runs" / f"clip--seed{s}" / "log.jsonl" for s in (0, 1)]

    def signal_once_both_train():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(p.is_file() and '"loss"' in p.read_text() for p in runs):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    sender = threading.Thread(target=signal_once_both_train, daemon=True)
    sender.start()
    outcome = run_study(write_study(tmp_path, data), out, jobs=2, threads=1, log=quiet)
    sender.join()
    assert outcome.stopped == "SIGTERM", outcome
    assert sorted(outcome.interrupted) == ["clip--seed0", "clip--seed1"] and outcome.ran == [] and not outcome.failed
    assert not (out / "runs" / "clip--seed2").exists() and not list((out / "cells").glob("*.json"))
    for seed in (0, 1):
        steps = [int(p.name.split("-")[1]) for p in (out / "runs" / f"clip--seed{seed}" / "checkpoints").iterdir()]
        assert len(steps) == 1 and 0 < steps[0] < 500


def test_a_restore_best_cell_is_evaluated_at_its_best_check(tmp_path):
    """min_delta far above any change: step 2's check stays the best, step 4's is stale (patience 1), so the
    cell stops at 4 and evaluates step 2's weights; the record and the table say so, and no weights are kept."""
    root = tmp_path / "s"
    root.mkdir()
    data = copy.deepcopy(SIGNAL_STUDY)
    data.update(variants=[TINY["variants"][0]])
    data["train"]["steps"] = 6
    data["train"]["early_stop"] = {"patience": 1, "every": 2, "batches": 1, "min_delta": 100, "restore_best": True}
    out = tmp_path / "out"
    assert run_study(write_study(root, data), out, jobs=1, threads=1, log=quiet).ran == [FIRST]
    record = json.loads((out / "cells" / f"{FIRST}.json").read_text())
    assert record["metrics"]["steps_trained"] == 4 and record["metrics"]["model_step"] == 2
    assert record["early_stop"]["restored_step"] == 2
    assert not list((out / "runs" / FIRST).glob("*.safetensors"))
    header = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| variant"))
    assert header.endswith("| steps | model step |")


def test_a_cell_resumed_after_a_crash_says_its_time_is_incomplete(tmp_path, monkeypatch):
    """An earlier session that left no time (killed before it could write it) leaves the cell out of the mean CPU
    time per cell, rather than making the cell look cheap."""
    config, out = write_study(tmp_path, SIGNAL_STUDY), tmp_path / "out"
    signal_during_training(monkeypatch, FIRST, 1)
    assert run_study(config, out, jobs=1, threads=1, log=quiet).interrupted == [FIRST]
    (out / "runs" / FIRST / TIME_FILE).unlink()  # as a crash would leave it
    monkeypatch.undo()
    outcome = run_study(config, out, jobs=1, threads=1, log=quiet)
    record = json.loads((out / "cells" / f"{FIRST}.json").read_text())
    assert record["resumed"] == {"sessions": 1, "time_complete": False}
    assert outcome.summary["cpu_seconds"]["cells"] == 1  # the other cell, trained in one session
