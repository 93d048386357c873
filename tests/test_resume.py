"""Exact resumption: a run killed with SIGKILL at random steps and resumed each time ends bitwise identical to an
uninterrupted run (weights and every logged step), for map-style and streamed data; SIGTERM/SIGINT save and
stop cleanly; runs that cannot be resumed are refused before any work with one line naming the key."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from clipforge.checkpoint import list_checkpoints, verify_checkpoint_dir
from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.train.feed import StreamPosition, stream_resume_plan
from clipforge.train.loop import train
from clipforge.train.config import load_train_config
from clipforge.train.state import load_training_checkpoint
from run_helpers import (PairStream, assert_bitwise_equal, events, fork_call, fork_cli, last_logged_step, step_log,
                         tiny_args, tiny_config, wait_exit, wait_for_step, weights)

STEPS = 12


def _kill_and_resume(tmp_path, name: str, kills: list[int], start) -> None:
    """Start the run, SIGKILL it once it has logged each step in `kills`, restarting it (resume=auto) each time;
    then let it finish."""
    run_dir = tmp_path / name
    for kill_step in kills:
        pid = start()
        wait_for_step(run_dir, kill_step, pid)
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {kill_step}"
    status = wait_exit(start())
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"final resumed run failed: status {status}"


def _random_kills() -> list[int]:
    kills = sorted(random.sample(range(2, STEPS - 2), 3))
    print("kill steps:", kills)  # shown by pytest on failure
    return kills


def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(tmp_path):
    common = ["--steps=%d" % STEPS, "--save_every=2", "--keep_checkpoints=2"]
    reference = train(tiny_config(tmp_path, "reference", *common), progress=False)
    kills = _random_kills()
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "killed", *common), "--resume", "auto"]
    _kill_and_resume(tmp_path, "killed", kills, lambda: fork_cli(argv))

    killed = tmp_path / "killed"
    assert_bitwise_equal(weights(reference.run_dir), weights(killed), f"kills at {kills}")
    assert step_log(killed) == step_log(reference.run_dir), f"kills at {kills}"
    assert len(events(killed, "resumed")) == len(kills)
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [STEPS - 2, STEPS]  # keep_checkpoints=2
    for _, path in list_checkpoints(killed / "checkpoints"):
        verify_checkpoint_dir(path)


def test_streamed_data_with_workers_resumes_exactly(tmp_path):
    common = ["--steps=%d" % STEPS, "--save_every=3", "--data.num_workers=2"]
    reference = train(tiny_config(tmp_path, "reference", *common), progress=False, dataset=PairStream())
    kills = _random_kills()
    cfg = tiny_config(tmp_path, "killed", *common, "--resume=auto")
    _kill_and_resume(tmp_path, "killed", kills,
                     lambda: fork_call(lambda: train(cfg, progress=False, dataset=PairStream()).exit_code))

    killed = tmp_path / "killed"
    assert_bitwise_equal(weights(reference.run_dir), weights(killed), f"kills at {kills}")
    assert step_log(killed) == step_log(reference.run_dir), f"kills at {kills}"
    position = load_training_checkpoint(list_checkpoints(killed / "checkpoints")[-1][1]).state.data[0]
    assert position["kind"] == "stream" and set(position["workers"]) == {"0", "1"}


def test_stream_plan_rotates_workers_or_replays():
    position = StreamPosition(2)
    for worker, nxt in ((0, 2), (1, 3), (0, 4)):  # three batches consumed: worker 1 is due next
        position.observe((worker, {"worker": worker, "next": nxt}))
    states, discard = stream_resume_plan(position.state_dict(step=3), 2)
    assert discard == 0 and states == {0: {"worker": 1, "next": 3}, 1: {"worker": 0, "next": 4}}
    early = StreamPosition(2)
    early.observe((0, {"worker": 0, "next": 2}))  # worker 1 never delivered: restart and skip one batch
    assert stream_resume_plan(early.state_dict(step=1), 2) == ({}, 1)
    with pytest.raises(ConfigError, match="'data.num_workers'"):
        stream_resume_plan(position.state_dict(step=3), 4)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_at_the_next_step_and_exits_cleanly(tmp_path, sig, code):
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=100000")]
    pid = fork_cli(argv)
    wait_for_step(tmp_path / "r", 3, pid)
    os.kill(pid, sig)
    status = wait_exit(pid, timeout=60)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
    (step, path), = list_checkpoints(tmp_path / "r" / "checkpoints")
    verify_checkpoint_dir(path)
    assert step >= 3 and events(tmp_path / "r", "stopped")[0]["step"] == step
    assert load_training_checkpoint(path).state.step == step
    assert last_logged_step(tmp_path / "r") == step  # it stopped at the boundary it saved


def test_second_sigint_exits_at_once_leaving_only_complete_checkpoints(tmp_path):
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=100000", "--save_every=1")]
    pid = fork_cli(argv)
    wait_for_step(tmp_path / "r", 2, pid)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGINT)
    status = wait_exit(pid, timeout=60)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130  # KeyboardInterrupt, reported by the CLI
    for _, path in list_checkpoints(tmp_path / "r" / "checkpoints"):
        verify_checkpoint_dir(path)  # whatever exists under a real name is complete


def test_resumed_config_must_match_and_fresh_runs_keep_checkpoints(tmp_path):
    train(tiny_config(tmp_path, "r", "--steps=2", "--save_every=2"), progress=False)
    with pytest.raises(ConfigError, match=r"config key 'optim.lr': 0.5 differs from 0.001"):
        train(tiny_config(tmp_path, "r", "--steps=2", "--resume=latest", "--optim.lr=0.5"), progress=False)
    with pytest.raises(ConfigError, match="already holds checkpoints .*--resume=latest"):
        train(tiny_config(tmp_path, "r", "--steps=2"), progress=False)
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        train(tiny_config(tmp_path, "other", "--steps=2", "--resume=latest"), progress=False)
    # a finished run resumed is still finished, with the same weights
    again = train(tiny_config(tmp_path, "r", "--steps=2", "--resume=auto"), progress=False)
    assert again.steps == 2


@pytest.mark.parametrize("override,match", [
    ("--batch_size=9", None),  # checked against the world size below
    ("--data.context_length=100", "'data.context_length': 100 is above model 'ViT-Micro-8-32' context length 16"),
    ("--data.synthetic.image_size=64", "'data.synthetic.image_size': 64 differs"),
    ("--debug.nan_steps=[9]", "'debug.nan_steps': step 9 is after the last step 4"),
    ("--keep_checkpoints=0", "'keep_checkpoints'"),
    ("--data.max_bad_fraction=2", "'data.max_bad_fraction'"),
    ("--resume=/no/such/run", "'resume': /no/such/run is neither"),
    ("--model=ViT-Nope", "unknown model 'ViT-Nope'"),
])
def test_impossible_runs_stop_before_any_work_naming_the_key(tmp_path, capsys, override, match):
    from clipforge.train.run import check_run

    if match is None:
        with pytest.raises(ConfigError, match="'batch_size': the global batch 9 is not divisible by the world size 2"):
            check_run(tiny_config(tmp_path, "r", override), world_size=2, own_data=True)
        return
    assert main(["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=4", override)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "r" / "log.jsonl").exists()  # nothing was started


def test_context_length_shorter_than_the_model_trains(tmp_path):
    result = train(tiny_config(tmp_path, "r", "--steps=2", "--data.context_length=8"), progress=False)
    assert torch.isfinite(torch.tensor(step_log(result.run_dir)[-1]["loss"]))


def test_global_random_generators_are_restored(tmp_path):
    from run_helpers import NoisyPairs

    common = ["--steps=4", "--save_every=2"]
    full = train(tiny_config(tmp_path, "full", *common), progress=False, dataset=NoisyPairs())
    checkpoint = full.run_dir / "checkpoints" / "step-00000002"
    resumed = train(tiny_config(tmp_path, "resumed", *common, f"--resume={checkpoint}"), progress=False,
                    dataset=NoisyPairs())
    assert_bitwise_equal(weights(full.run_dir), weights(resumed.run_dir))
    assert step_log(resumed.run_dir)[-2:] == step_log(full.run_dir)[-2:]


def test_a_loader_that_keeps_its_own_position_resumes_exactly(tmp_path):
    from run_helpers import PairLoader

    common = ["--steps=6", "--save_every=3"]
    full = train(tiny_config(tmp_path, "full", *common), progress=False, dataset=PairLoader())
    checkpoint = full.run_dir / "checkpoints" / "step-00000003"
    assert load_training_checkpoint(checkpoint).state.data == [{"kind": "loader", "step": 3, "state": {"next": 24}}]
    resumed = train(tiny_config(tmp_path, "resumed", *common, f"--resume={checkpoint}"), progress=False,
                    dataset=PairLoader())
    assert_bitwise_equal(weights(full.run_dir), weights(resumed.run_dir))
    assert step_log(resumed.run_dir)[-3:] == step_log(full.run_dir)[-3:]
    with pytest.raises(ConfigError, match="the checkpoint holds a loader data position, but the data is now map"):
        train(tiny_config(tmp_path, "again", *common, f"--resume={checkpoint}"), progress=False)


def _write_shards_with_a_bad_sample_each(root, shards: int = 12, per_shard: int = 10):
    """Tar shards of synthetic pairs; in each shard the first image's bytes are zeroed (undecodable)."""
    import tarfile

    from clipforge.data.shards import expand_shards
    from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
    from clipforge.data.writer import write_shards

    world = SyntheticWorld(SyntheticConfig(image_size=32))
    write_shards([world.pair(STREAM_TRAIN, i) for i in range(shards * per_shard)], root, samples_per_shard=per_shard)
    for path in expand_shards(root):
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with open(path, "r+b") as handle:
            handle.seek(member.offset_data)
            handle.write(b"\0" * member.size)


def test_tar_shards_killed_and_resumed_are_bitwise_identical(tmp_path):
    _write_shards_with_a_bad_sample_each(tmp_path / "shards")
    common = ["--steps=10", "--save_every=2", "--data.source=shards", f"--data.path={tmp_path / 'shards'}",
              "--data.num_workers=2"]
    reference = train(tiny_config(tmp_path, "reference", *common), progress=False)
    kills = sorted(random.sample(range(2, 8), 2))
    print("kill steps:", kills)
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "killed", *common), "--resume=auto"]
    _kill_and_resume(tmp_path, "killed", kills, lambda: fork_cli(argv))

    killed = tmp_path / "killed"
    assert_bitwise_equal(weights(reference.run_dir), weights(killed), f"kills at {kills}")
    assert step_log(killed) == step_log(reference.run_dir), f"kills at {kills}"
    assert reference.bad_data.get("unreadable", 0) >= 1  # the zeroed images were met, skipped and counted
    assert events(killed, "bad_data_summary")[0]["counts"] == reference.bad_data
    position = load_training_checkpoint(list_checkpoints(killed / "checkpoints")[-1][1]).state.data[0]
    assert position["kind"] == "loader" and position["state"]["format"] == "clipforge.shards/1"


def _cli_process(argv: list[str]):
    """`python -m clipforge <argv>` in a new interpreter: nothing (oneDNN caches, tensor layouts, first-call
    choices) carried over from this process."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clipforge", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_resnet_bf16_killed_in_fresh_processes_resumes_bitwise(tmp_path):
    # The demo's model and precision: channels-last 3x3 conv weights updated by the fused AdamW kernel. A resumed
    # process once paired those weights with NCHW-ordered Adam moments and departed at its second step, which
    # the ViT runs above cannot show. Every kill leaves at least two steps after the checkpoint it resumes from.
    common = ["--model=RN-Tiny-64", "--data.synthetic.image_size=64", "--precision=bf16", "--batch_size=8",
              "--threads=1", "--log_every=1", "--optim.warmup_steps=2", "--steps=9", "--save_every=3",
              f"--output_dir={tmp_path}"]
    reference = train(load_train_config(None, [*common, "--run_name=reference"]), progress=False)
    kills = [4, 7]
    for kill in kills:
        proc = _cli_process(["train", "--no-progress", *common, "--run_name=killed", "--resume=auto"])
        wait_for_step(tmp_path / "killed", kill, proc.pid)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    proc = _cli_process(["train", "--no-progress", *common, "--run_name=killed", "--resume=auto"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    killed = tmp_path / "killed"
    assert step_log(killed) == step_log(reference.run_dir), f"kills at {kills}"
    assert_bitwise_equal(weights(reference.run_dir), weights(killed), f"kills at {kills}")
    last = list_checkpoints(killed / "checkpoints")[-1][1]
    moments = load_training_checkpoint(last).optimizer_state
    expected = load_training_checkpoint(list_checkpoints(reference.run_dir / "checkpoints")[-1][1]).optimizer_state
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(value, moments["state"][index][key]), f"optimizer state {index}.{key}"


def test_loaded_adam_moments_take_the_parameter_layout():
    from clipforge.train.optim import match_parameter_layouts

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last))
    grads = [torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last) for _ in range(4)]

    def steps(optimizer, param, gs):
        for g in gs:
            param.grad = g.clone(memory_format=torch.preserve_format)
            optimizer.step()

    straight = torch.optim.AdamW([weight], lr=1e-2, fused=True)
    steps(straight, weight, grads)
    # what a checkpoint round trip gives: the same numbers, stored contiguous
    saved = straight.state_dict()
    plain = {k: v.clone(memory_format=torch.contiguous_format) for k, v in saved["state"][0].items()}
    fresh = torch.nn.Parameter(weight.detach().clone(memory_format=torch.preserve_format))
    resumed = torch.optim.AdamW([fresh], lr=1e-2, fused=True)
    resumed.load_state_dict({"state": {0: plain}, "param_groups": saved["param_groups"]})
    match_parameter_layouts(resumed)
    more = [torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    steps(straight, weight, more)
    steps(resumed, fresh, more)
    assert torch.equal(weight, fresh)
    assert resumed.state[fresh]["exp_avg"].stride() == fresh.stride()
