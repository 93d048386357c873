"""Data-parallel training with real processes (gloo): two ranks, each on its half of every global batch, end
with the weights and per-step losses of one process on the whole batch; only rank 0 writes."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import torch

from clipforge.checkpoint import list_checkpoints, verify_checkpoint_dir
from clipforge.train.loop import train
from run_helpers import (assert_same_training, events, fork_call, last_logged_step, step_log, tiny_config, wait_exit, wait_for_step,
                         weights)

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(cfg, world: int = WORLD, then=None) -> list[int]:
    """Train `cfg` in `world` forked processes set up as torchrun would; their pids. `then(rank, result)`, if
    given, runs in each rank after training."""
    port = free_port()

    def rank_main(rank: int) -> int:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        result = train(cfg, progress=False)
        if then is not None:
            then(rank, result)
        return result.exit_code

    return [fork_call(lambda r=r: rank_main(r)) for r in range(world)]


def run_ranks(cfg, world: int = WORLD) -> list[int]:
    """The exit statuses of `cfg` trained by `world` ranks."""
    return [wait_exit(pid, timeout=180) for pid in start_ranks(cfg, world)]


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    common = ["--steps=2", "--batch_size=8", "--save_every=2"]
    single = train(tiny_config(tmp_path, "single", *common), progress=False)
    statuses = run_ranks(tiny_config(tmp_path, "ddp", *common))
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses

    ddp_dir = tmp_path / "ddp"
    assert_same_training(weights(single.run_dir), weights(ddp_dir), steps=2, context="2 ranks vs 1 process")
    one, two = step_log(single.run_dir), step_log(ddp_dir)
    assert [e["step"] for e in two] == [1, 2]  # one line per step: only rank 0 logs
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * x["grad_norm"]
        assert x["lr"] == y["lr"]


def test_rank_state_is_saved_per_rank(tmp_path):
    from clipforge.train.state import load_training_checkpoint

    statuses = run_ranks(tiny_config(tmp_path, "ddp", "--steps=1", "--save_every=1"))
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
    state = load_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "step-00000001").state
    assert state.world_size == WORLD and len(state.rng) == WORLD and len(state.data) == WORLD
    assert state.data == [{"kind": "map", "step": 1}] * WORLD


@pytest.mark.parametrize("world", [3])
def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, world):
    statuses = run_ranks(tiny_config(tmp_path, "ddp", "--steps=1", "--batch_size=8"), world=world)
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 1 for s in statuses)
    assert not (tmp_path / "ddp" / "log.jsonl").exists()


def test_restore_best_gives_every_rank_the_best_checks_weights(tmp_path):
    """Under torchrun, restore_best loads the best check's file on rank 0 and sends those weights to the other
    ranks: every rank's returned model equals the kept best-model file (step 5), which differs from the last
    step's weights."""
    from safetensors.torch import save_file

    cfg = tiny_config(tmp_path, "ddp", "--steps=40", "--batch_size=8", "--early_stop.patience=2",
                      "--early_stop.every=5", "--early_stop.min_delta=100", "--early_stop.batches=1",
                      "--early_stop.restore_best=true")

    def keep_returned_model(rank, result) -> None:
        assert result.early_stop["restored_step"] == 5 and result.steps == 15
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
                  str(tmp_path / f"returned-rank{rank}.safetensors"))

    statuses = [wait_exit(pid, timeout=180) for pid in start_ranks(cfg, then=keep_returned_model)]
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
    best = weights(tmp_path / "ddp" / "best-model.safetensors")
    final = weights(tmp_path / "ddp")
    assert all(torch.equal(final[k], best[k]) for k in best)
    for rank in range(WORLD):
        returned = weights(tmp_path / f"returned-rank{rank}.safetensors")
        assert returned.keys() == best.keys() and all(torch.equal(returned[k], best[k]) for k in best), rank
    last = weights(tmp_path / "ddp" / "checkpoints" / "step-00000015" / "model.safetensors")  # saved at the stop
    assert any(not torch.equal(last[k], best[k]) for k in best)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # save_every=1: the stop falls on a regular save step, which must not be saved twice (or once per rank).
    pids = start_ranks(tiny_config(tmp_path, "ddp", "--steps=100000", "--save_every=1", "--keep_checkpoints=1"))
    wait_for_step(tmp_path / "ddp", 2, pids[0])
    os.kill(pids[0], signal.SIGTERM)
    statuses = [wait_exit(pid, timeout=60) for pid in pids]
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 143 for s in statuses), statuses
    (stopped,) = events(tmp_path / "ddp", "stopped")
    (step, path), = list_checkpoints(tmp_path / "ddp" / "checkpoints")
    assert step == stopped["step"] == last_logged_step(tmp_path / "ddp")
    verify_checkpoint_dir(path)
