"""Atomic, verified checkpoints: interrupted writes leave nothing half-done under a real name, damage is detected
by the manifest, a damaged latest checkpoint makes resumption fall back to the previous one (and say so), and
the saved state (optimizer, RNG) round-trips exactly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from clipforge.checkpoint import (CheckpointError, atomic_directory, atomic_write, latest_valid_checkpoint,
                                  list_checkpoints, prune_checkpoints, remove_stale_temporaries,
                                  verify_checkpoint_dir, write_checkpoint_dir)
from clipforge.train.loop import train
from clipforge.train.state import (capture_rng_state, config_differences, join_tensors, restore_rng_state,
                                   split_tensors)
from run_helpers import assert_bitwise_equal, step_log, tiny_config, weights


def _write(step_dir, step, files=None):
    files = files or {"a.bin": b"\x00\x01" * 1000, "b.json": b'{"x": 1}'}
    return write_checkpoint_dir(step_dir, step, {n: (lambda p, d=d: p.write_bytes(d)) for n, d in files.items()})


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "step-00000001") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 100)
            raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of a save
    assert list(tmp_path.iterdir()) == []


def test_manifest_detects_truncation_corruption_and_missing_pieces(tmp_path):
    path = _write(tmp_path / "step-00000005", 5)
    manifest = verify_checkpoint_dir(path)
    assert manifest["step"] == 5 and set(manifest["files"]) == {"a.bin", "b.json"}

    data = (path / "a.bin").read_bytes()
    (path / "a.bin").write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=r"a.bin has 1993 bytes, the manifest says 2000 \(truncated\?\)"):
        verify_checkpoint_dir(path)
    (path / "a.bin").write_bytes(data[:-1] + b"\x07")  # same size, one byte changed
    with pytest.raises(CheckpointError, match="a.bin does not match its sha256"):
        verify_checkpoint_dir(path)
    (path / "a.bin").unlink()
    with pytest.raises(CheckpointError, match="file a.bin is missing"):
        verify_checkpoint_dir(path)
    (path / "MANIFEST.json").write_text('{"format": "clipforge-training-checkpoint", "files": ')
    with pytest.raises(CheckpointError, match="unreadable MANIFEST.json"):
        verify_checkpoint_dir(path)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no MANIFEST.json"):
        verify_checkpoint_dir(path)


def test_listing_fallback_pruning_and_leftovers(tmp_path):
    for step in (2, 4, 6):
        _write(tmp_path / f"step-{step:08d}", step)
    (tmp_path / ".step-00000008.x1y2.tmp").mkdir()  # a write killed half-way
    (tmp_path / "notes").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6]

    (tmp_path / "step-00000006" / "b.json").write_text("{}")
    reports = []
    assert latest_valid_checkpoint(tmp_path, reports.append) == tmp_path / "step-00000004"
    assert len(reports) == 1 and "step-00000006" in reports[0] and "falling back to step-00000004" in reports[0]

    assert prune_checkpoints(tmp_path, keep=2) == [tmp_path / "step-00000002"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".step-00000008.x1y2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-00000004", "step-00000006"]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, capsys):
    common = ["--steps=6", "--save_every=2"]
    reference = train(tiny_config(tmp_path, "reference", *common), progress=False)
    run = train(tiny_config(tmp_path, "r", *common), progress=False).run_dir
    latest = run / "checkpoints" / "step-00000006"
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()

    resumed = train(tiny_config(tmp_path, "r", *common, "--resume=latest"), progress=False)
    err = capsys.readouterr().err.splitlines()
    warning = [line for line in err if "step-00000006" in line and "falling back" in line]
    assert len(warning) == 1 and "truncated" in warning[0] and "falling back to step-00000004" in warning[0], err
    assert resumed.resumed_from == run / "checkpoints" / "step-00000004"
    assert_bitwise_equal(weights(reference.run_dir), weights(run))  # steps 5-6 redone exactly
    assert step_log(run) == step_log(reference.run_dir)
    verify_checkpoint_dir(latest)  # rewritten whole


def test_checkpoint_model_file_loads_as_a_model(tmp_path):
    from clipforge import load_model

    run = train(tiny_config(tmp_path, "r", "--steps=1", "--save_every=1"), progress=False)
    loaded = load_model(run.run_dir / "checkpoints" / "step-00000001" / "model.safetensors")
    assert_bitwise_equal(loaded.state_dict(), run.model.state_dict())


def test_optimizer_state_round_trips_through_json_and_tensors():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    original = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain = json.loads(json.dumps(split_tensors(original, tensors)))
    restored = join_tensors(plain, tensors)
    assert restored["param_groups"] == original["param_groups"]  # betas stay a tuple, ints stay ints
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert set(restored["state"]) == {0, 1}
    for pid, entry in original["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][pid][name], value)
    nan = join_tensors(json.loads(json.dumps(split_tensors({"x": float("nan")}, {}))), {})["x"]
    assert isinstance(nan, float) and math.isnan(nan)


def test_rng_states_round_trip():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(json.loads(json.dumps(state)))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_config_differences_ignore_allowed_keys():
    saved = {"steps": 5, "optim": {"lr": 0.1, "eps": 1e-6}, "log_every": 1}
    current = {"steps": 5, "optim": {"lr": 0.2, "eps": 1e-6}, "log_every": 7}
    assert config_differences(saved, current, {"log_every"}) == ["optim.lr"]
    assert config_differences(saved, current, {"log_every", "optim"}) == []
