"""The negative queue: the loss against a direct float64 computation (values and gradients, no gradient into the
queue), the ring buffer, bitwise resumption after SIGKILL, DDP (2 gloo ranks) against one process on the gathered
batch, and the config errors."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import clipforge
from clipforge import dist
from clipforge.checkpoint import list_checkpoints
from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.losses import LossConfig, clip_loss
from clipforge.losses_queue import check_queue_size, queue_clip_loss
from clipforge.train.loop import train
from clipforge.train.queue import NegativeQueue
from clipforge.train.setup import prepare_model
from clipforge.train.state import load_training_checkpoint
from run_helpers import (assert_bitwise_equal, distance, events, fork_cli, step_log, tiny_args, tiny_config, wait_exit,
                         wait_for_step, weights)
from test_dist import _free_port, join_workers, make_batch


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _direct(f: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, qf: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """Σ over rows of -log(exp(s<f_i,g_i>) / (Σ_j exp(s<f_i,g_j>) + Σ_k exp(s<f_i,q_k>))), both directions."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(f.shape[0]):
        for rows, cols, queue in ((f, g, qg), (g, f, qf)):
            logits = [scale * rows[i] @ cols[j] for j in range(cols.shape[0])]
            logits += [scale * rows[i] @ queue[k] for k in range(queue.shape[0])]
            total = total - logits[i] + torch.logsumexp(torch.stack(logits), dim=0)
    return total / (2 * f.shape[0])


@pytest.mark.parametrize("queue_len,chunk", [(0, None), (7, None), (7, 3)])
def test_queue_loss_matches_direct_computation(queue_len, chunk):
    f, g = _unit(5, 6, seed=0).requires_grad_(), _unit(5, 6, seed=1).requires_grad_()
    qf, qg = _unit(queue_len, 6, seed=2).requires_grad_(), _unit(queue_len, 6, seed=3).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = queue_clip_loss(f, g, scale, qf, qg, chunk_size=chunk)
    loss.backward()
    assert qf.grad is None and qg.grad is None  # queue entries are constants

    rf, rg = f.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    rs = scale.detach().clone().requires_grad_()
    ref = _direct(rf, rg, rs, qf.detach(), qg.detach())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in ((f.grad, rf.grad), (g.grad, rg.grad), (scale.grad, rs.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    if queue_len == 0:
        assert loss.item() == pytest.approx(clip_loss(f, g, scale).item(), rel=1e-12)


def test_queue_lowers_nothing_when_its_negatives_are_far():
    """Sanity of direction: negatives orthogonal to everything add exp(0) terms, so the loss grows."""
    f = g = torch.eye(4, dtype=torch.float64)[:2]
    far = torch.eye(4, dtype=torch.float64)[2:]
    assert queue_clip_loss(f, g, 10.0, far, far) > queue_clip_loss(f, g, 10.0, far[:0], far[:0])


def test_ring_buffer_wraps_and_skips_nonfinite_batches():
    queue = NegativeQueue(5, 2, torch.device("cpu"))
    rows = [torch.full((3, 2), float(v)) for v in (1, 2, 3)]
    queue.enqueue(rows[0], -rows[0])
    assert queue.count == 3 and queue.ptr == 3 and queue.negatives()[0].shape == (3, 2)
    queue.enqueue(rows[1], -rows[1])  # positions 3, 4, then 0
    assert queue.image[:, 0].tolist() == [2, 1, 1, 2, 2] and queue.text[:, 0].tolist() == [-2, -1, -1, -2, -2]
    assert (queue.count, queue.ptr) == (5, 1)
    queue.enqueue(torch.full((3, 2), float("nan")), rows[2])
    assert queue.image[:, 0].tolist() == [2, 1, 1, 2, 2] and queue.ptr == 1
    queue.enqueue(torch.arange(14.0).view(7, 2), torch.zeros(7, 2))  # longer than the queue: its last 5 rows
    assert sorted(queue.image[:, 0].tolist()) == [4, 6, 8, 10, 12]


STEPS = 10


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_sigkill_then_resume_with_queue_is_bitwise_identical(tmp_path, momentum):
    common = [f"--steps={STEPS}", "--save_every=2", "--loss.queue_size=20"]
    if momentum is not None:
        common.append(f"--loss.queue_momentum={momentum}")
    reference = train(tiny_config(tmp_path, "reference", *common), progress=False)
    kills = sorted(random.sample(range(2, STEPS - 2), 2))
    print("kill steps:", kills)
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "killed", *common), "--resume", "auto"]
    for kill_step in kills:
        pid = fork_cli(argv)
        wait_for_step(tmp_path / "killed", kill_step, pid)
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid)
    status = wait_exit(fork_cli(argv))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

    killed = tmp_path / "killed"
    assert_bitwise_equal(weights(reference.run_dir), weights(killed), f"kills at {kills}")
    assert step_log(killed) == step_log(reference.run_dir), f"kills at {kills}"
    assert len(events(killed, "resumed")) == len(kills)
    ref_queue = load_training_checkpoint(list_checkpoints(reference.run_dir / "checkpoints")[-1][1]).extra["queue"]
    queue = load_training_checkpoint(list_checkpoints(killed / "checkpoints")[-1][1]).extra["queue"]
    assert (queue["ptr"], queue["count"]) == (ref_queue["ptr"], ref_queue["count"]) == ((STEPS * 8) % 20, 20)
    for key in ("image", "text"):
        assert torch.equal(queue[key], ref_queue[key])
    if momentum is not None:
        assert_bitwise_equal(queue["encoder"], ref_queue["encoder"], "momentum encoder")


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_accumulation_with_a_queue_equals_the_batch_in_one_piece(tmp_path, momentum):
    """Exact accumulation (accum_chunk) embeds the batch in chunks but scores it against the queue once: the
    weights and the queue after 5 steps (the queue full from step 3) match the run of each batch in one piece
    to fp32 rounding."""
    common = ["--steps=5", "--save_every=5", "--batch_size=8", "--loss.queue_size=20", "--optim.schedule=constant",
              "--optim.warmup_steps=0"] + ([f"--loss.queue_momentum={momentum}"] if momentum is not None else [])
    one = train(tiny_config(tmp_path, "one", *common), progress=False)
    acc = train(tiny_config(tmp_path, "acc", *common, "--accum_chunk=3"), progress=False)  # chunks 3, 3, 2
    start = prepare_model(tiny_config(tmp_path, "start", *common), torch.device("cpu")).state_dict()
    a, b = weights(acc.run_dir), weights(one.run_dir)
    moved, apart = distance(b, start), distance(a, b)
    assert moved > 0 and apart < 1e-3 * moved, f"accumulated run {apart:.3g} from one piece, weights moved {moved:.3g}"
    queues = [load_training_checkpoint(list_checkpoints(r.run_dir / "checkpoints")[-1][1]).extra["queue"]
              for r in (acc, one)]
    assert queues[0]["count"] == queues[1]["count"] == 20
    for key in ("image", "text"):
        torch.testing.assert_close(queues[0][key], queues[1][key], rtol=1e-3, atol=1e-4)


# --- DDP: 2 gloo ranks, two steps (the second reads the queue the first filled) -----------------------------

SPLIT = [5, 7]
CASES = {"plain": None, "momentum": 0.5}


def _steps(model: torch.nn.Module, call, queue: NegativeQueue, batches, cfg: LossConfig) -> list:
    """Two SGD steps with the queue; per step: loss, parameter gradients, queue contents."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for images, tokens in batches:
        optimizer.zero_grad()
        queue.prepare(model, images, tokens)
        fi, ft, scale = call(images, tokens)
        parts = queue.loss(cfg, fi, ft, scale)
        parts["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        out.append((parts["loss"].detach(), grads, queue.image.clone(), queue.text.clone()))
    return out


def _model_and_queue(momentum: float | None) -> tuple[torch.nn.Module, NegativeQueue]:
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Micro-8-32")
    return model, NegativeQueue(16, model.config.embed_dim, torch.device("cpu"), momentum, model)


def _two_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, tokens = make_batch()
    return [(images, tokens), (images.flip(0), tokens.flip(0))]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_distributed(device="cpu", timeout_s=120)
    start, count = sum(SPLIT[:rank]), SPLIT[rank]
    local = [(i[start:start + count], t[start:start + count]) for i, t in _two_batches()]
    results = {}
    for name, momentum in CASES.items():
        model, queue = _model_and_queue(momentum)
        results[name] = _steps(model, DDP(model), queue, local, LossConfig(queue_size=16))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.cleanup()


def test_ddp_queue_equals_one_process_on_the_gathered_batch(tmp_path):
    join_workers(mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False))
    for name, momentum in CASES.items():
        model, queue = _model_and_queue(momentum)
        reference = _steps(model, model, queue, _two_batches(), LossConfig(queue_size=16))
        assert reference[1][2][:12].abs().sum() > 0 and queue.count == 16  # the second step read a filled queue
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            for step, ((loss, grads, qi, qt), (rloss, rgrads, rqi, rqt)) in enumerate(zip(got, reference)):
                where = f"{name} rank {rank} step {step}"
                assert loss.item() == pytest.approx(rloss.item(), rel=1e-5), where
                assert grads.keys() == rgrads.keys(), where
                for key, ref in rgrads.items():
                    err = (grads[key] - ref).abs().max().item()
                    assert err <= 1e-5 * ref.abs().max().item() + 1e-9, f"{where} {key}: {err:.3g}"
                torch.testing.assert_close(qi, rqi, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(qt, rqt, rtol=1e-5, atol=1e-6)


# --- Bad input -------------------------------------------------------------------------------------------

def test_queue_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'loss.queue_size': a queue of negatives works with loss 'clip'"):
        tiny_config(tmp_path, "r", "--loss.name=siglip", "--loss.queue_size=8")
    with pytest.raises(ConfigError, match="'loss.queue_momentum': only applies with loss.queue_size > 0"):
        tiny_config(tmp_path, "r", "--loss.queue_momentum=0.9")
    with pytest.raises(ConfigError, match="'loss.queue_momentum': expected a value in \\[0, 1\\)"):
        tiny_config(tmp_path, "r", "--loss.queue_size=8", "--loss.queue_momentum=1.0")
    # tables 2 * 1e6 * 512 * 4 B = 3.81 GiB, logits 2 * 3 * 128 * (128 + 1e6) * 4 B = 2.86 GiB: 6.68 GiB > 2 GiB
    with pytest.raises(ConfigError, match="'loss.queue_size': a queue of 1000000 x 512-d .* needs about 6.68 GiB"):
        check_queue_size(1_000_000, 512, 128, 128, 8 * 2**30)
    check_queue_size(65536, 512, 128, 128, 8 * 2**30)  # 0.25 GiB of tables: fine
    code = main(["train", "--no-progress", *tiny_args(tmp_path, "r", f"--loss.queue_size={2**21}")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "config key 'loss.queue_size': 2097152 is above the limit 1048576" in err
