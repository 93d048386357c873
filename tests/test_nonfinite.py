"""Non-finite steps: a NaN loss (and so NaN gradients) skips the update, is counted and logged; N in a row stop
the run with a checkpoint written and one clear line."""

from __future__ import annotations

import pytest
import torch

from clipforge.checkpoint import list_checkpoints, verify_checkpoint_dir
from clipforge.cli import main
from clipforge.train.guard import NonFiniteGuard, TrainingAborted, step_is_finite
from clipforge.train.loop import train
from run_helpers import assert_bitwise_equal, events, step_log, tiny_args, tiny_config, weights

CONSTANT_LR = ["--optim.schedule=constant", "--optim.warmup_steps=0"]  # the lr does not depend on the run length


def test_one_nan_step_is_skipped_and_logged(tmp_path):
    # With the update of step 3 skipped, the weights after 3 steps are those after 2 steps of the same run.
    two = train(tiny_config(tmp_path, "two", "--steps=2", *CONSTANT_LR), progress=False)
    nan = train(tiny_config(tmp_path, "nan", "--steps=3", "--debug.nan_steps=[3]", *CONSTANT_LR), progress=False)
    assert nan.skipped_steps == 1
    assert_bitwise_equal(weights(two.run_dir), weights(nan.run_dir))
    (skip,) = events(nan.run_dir, "nonfinite_skip")
    assert skip["step"] == 3 and skip["loss"] is None and skip["grad_norm"] is None  # NaN logged as null
    logged = step_log(nan.run_dir)
    assert logged[2]["skipped"] is True and logged[2]["loss"] is None
    assert logged[:2] == step_log(two.run_dir)


def test_training_goes_on_after_a_skipped_step(tmp_path):
    result = train(tiny_config(tmp_path, "r", "--steps=4", "--debug.nan_steps=[2]"), progress=False)
    logged = step_log(result.run_dir)
    assert [e.get("skipped", False) for e in logged] == [False, True, False, False]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert logged[-1]["loss"] is not None and logged[-1]["loss"] == logged[-1]["loss"]


def test_n_nonfinite_steps_in_a_row_save_and_stop(tmp_path):
    cfg = tiny_config(tmp_path, "r", "--steps=10", "--debug.nan_steps=[2,3,4]", "--max_nonfinite_steps=3",
                      *CONSTANT_LR)
    with pytest.raises(TrainingAborted, match="stopped at step 4: 3 non-finite .* in a row.*checkpoint saved to"):
        train(cfg, progress=False)
    (step, path), = list_checkpoints(tmp_path / "r" / "checkpoints")
    verify_checkpoint_dir(path)
    assert step == 4
    one = train(tiny_config(tmp_path, "one", "--steps=1", *CONSTANT_LR), progress=False)
    assert_bitwise_equal(weights(one.run_dir), weights(path))  # only step 1 ever updated the weights


def test_the_command_line_reports_the_stop_in_one_line(tmp_path, capsys):
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=5", "--debug.nan_steps=[1,2]",
                                                 "--max_nonfinite_steps=2")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("clipforge: error: stopped at step 2: 2 non-finite"), err


def test_guard_counts_runs_of_nonfinite_steps():
    guard = NonFiniteGuard(limit=2)
    assert [guard.record(x) for x in (True, False, True, True)] == [False, False, False, True]
    assert guard.total == 3 and guard.consecutive == 2
    assert step_is_finite(torch.tensor(1.0), torch.tensor(2.0))
    assert not step_is_finite(torch.tensor(1.0), torch.tensor(float("inf")))  # a finite loss, an inf gradient
    assert not step_is_finite(torch.tensor(float("nan")), torch.tensor(1.0))
