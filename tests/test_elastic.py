"""Elastic restart: a 2-process torchrun job (gloo) loses a worker to SIGKILL mid-run; torchrun restarts the
workers, which resume from the latest checkpoint on their own (--resume=auto) and finish; the result matches
one process trained on the same global batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clipforge.checkpoint import list_checkpoints
from clipforge.train.loop import train
from run_helpers import assert_same_training, events, last_logged_step, step_log, tiny_args, tiny_config, weights

SRC = Path(__file__).resolve().parents[1] / "src"


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=`rank`."""
    for pid in children(agent):
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                   if "=" in item)
        if env.get("RANK") == str(rank):
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children(agent)}")


def test_killed_worker_restarts_and_resumes_from_its_checkpoint(tmp_path):
    common = ["--steps=8", "--save_every=2"]
    argv = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1", "--standalone",
            "-m", "clipforge", "train", "--no-progress", *tiny_args(tmp_path, "job", *common, "--resume=auto")]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store shared across restarts, restarted gloo workers can read
    # their predecessors' addresses and fail to connect (pytorch/pytorch#135712).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    job = subprocess.Popen([sys.executable, *argv], env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "job"
    try:
        deadline = time.monotonic() + 240
        while last_logged_step(run_dir) < 3:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 3"
            time.sleep(0.01)
        os.kill(worker_of_rank(job.pid, 1), signal.SIGKILL)
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, output[-3000:]

    (resumed,) = events(run_dir, "resumed")  # exactly one automatic restart, which resumed
    assert resumed["step"] >= 2 and resumed["path"].endswith(f"step-{resumed['step']:08d}")
    assert "Finished 8 steps" in output and output.count("Finished") == 1  # rank 0 reports, once
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 8

    single = train(tiny_config(tmp_path, "single", *common), progress=False)
    logged, expected = step_log(run_dir), step_log(single.run_dir)
    assert [e["step"] for e in logged] == list(range(1, 9))
    for x, y in zip(logged, expected):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    assert_same_training(weights(run_dir), weights(single.run_dir), steps=8, context="elastic 2 ranks vs 1 process")
