"""Distributed losses with real processes (gloo): loss and every parameter gradient under DDP equal the
single-process computation on the global batch.

Both sides run in float64: the ranks sum their parts in another order than one process does, and in float32
that reordering alone moves a gradient by up to ~1e-5 of its largest entry, differently on each CPU's kernels.
In float64 the same reordering stays below 1e-12, so a tolerance of 1e-9 holds on any CPU and still fails on
any real slip (a missing term, a wrong scale, a rank's rows used twice), which moves gradients by O(1)."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import clipforge
from clipforge import dist
from clipforge.losses import LossConfig, compute_loss
from clipforge.train.gradcache import gradcache_backward

EOT = 49407
GLOBAL_BATCH = 12
SPLITS = {2: [5, 7], 4: [3, 3, 3, 3]}  # world 2 deliberately uneven


@dataclass(frozen=True)
class Case:
    name: str
    loss: LossConfig
    bias: float | None = None
    gradcache_chunk: int | None = None


CASES = [
    Case("clip", LossConfig()),
    Case("clip+mean", LossConfig(margin_lambda=0.5)),
    Case("clip+hinge", LossConfig(margin_lambda=0.5, margin_form="hinge", margin_target=1.0)),
    Case("clip-chunked+hinge", LossConfig(margin_lambda=0.5, margin_form="hinge", margin_target=1.0, chunk_size=2)),
    Case("siglip", LossConfig(name="siglip"), bias=-10.0),
    Case("siglip-chunked", LossConfig(name="siglip", chunk_size=3), bias=-10.0),
    Case("square", LossConfig(name="square")),
    Case("triplet", LossConfig(name="triplet", triplet_margin=1.0)),
    Case("gradcache-clip+mean", LossConfig(margin_lambda=0.5), gradcache_chunk=2),
    Case("clip+squared-scaled", LossConfig(margin_lambda=0.5, margin_form="squared-scaled")),
    Case("cyclip", LossConfig(name="cyclip")),
]


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch: images [B, 3, 32, 32], tokens [B, 16] ending in the end-of-text id."""
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen, dtype=torch.float64)
    tokens = torch.zeros(GLOBAL_BATCH, 16, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        length = int(torch.randint(1, 15, (1,), generator=gen))
        tokens[i, :length] = torch.randint(1, EOT - 1, (length,), generator=gen)
        tokens[i, length] = EOT
    return images, tokens


def make_model(case: Case) -> torch.nn.Module:
    cfg = clipforge.get_model_config("ViT-Micro-8-32")
    if case.bias is not None:  # SigLIP's initialisation: scale 10, bias -10
        cfg = dataclasses.replace(cfg, init_logit_bias=case.bias, init_logit_scale=2.302585092994046)
    torch.manual_seed(0)
    model = clipforge.create_model(cfg).double()
    # DDP waits for a gradient of every trainable parameter: freeze what the objective does not read.
    model.logit_scale.requires_grad_(case.loss.uses_logit_scale)
    if model.logit_bias is not None:
        model.logit_bias.requires_grad_(case.loss.uses_logit_bias)
    return model


def single_process(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model(case)
    image_features, text_features, scale = model(*make_batch())
    out = compute_loss(case.loss, image_features, text_features, scale, model.logit_bias)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad for n, p in model.named_parameters()}


def _run_case(case: Case, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model(case)
    ddp = DDP(model)
    start = sum(SPLITS[world][:rank])
    images, tokens = (x[start : start + SPLITS[world][rank]] for x in make_batch())
    if case.gradcache_chunk is None:
        image_features, text_features, scale = ddp(images, tokens)
        out = dist.distributed_compute_loss(case.loss, image_features, text_features, scale, model.logit_bias)
        out["loss"].backward()
    else:
        def loss_fn(fi, ft, log_scale):
            return dist.distributed_compute_loss(case.loss, fi, ft, log_scale.exp())

        out = gradcache_backward(
            lambda im, tok: ddp(im, tok)[:2], loss_fn, (images, tokens), case.gradcache_chunk,
            loss_params=[model.logit_scale], no_sync=ddp.no_sync,
        )
    return {k: v.detach() for k, v in out.items()}, {n: p.grad for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    info = dist.init_distributed(device="cpu", timeout_s=120)
    assert (info.rank, info.world_size, dist.get_rank(), dist.get_world_size()) == (rank, world, rank, world)
    assert torch.distributed.get_backend() == "gloo"
    results = {case.name: _run_case(case, rank, world) for case in CASES}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_workers(context: mp.ProcessContext, timeout_s: float = 240.0) -> None:
    """Wait for spawned workers; a worker that raised fails the test at once, and ones that hang (a gloo peer
    lost, a port taken between _free_port and the bind) are killed and fail it after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")


def _spawn(world: int, out_dir: Path, timeout_s: float = 240.0) -> None:
    join_workers(mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False),
                 timeout_s)


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_losses_match_single_process(world, tmp_path):
    _spawn(world, tmp_path)
    references = {case.name: single_process(case) for case in CASES}
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for case in CASES:
            ref_values, ref_grads = references[case.name]
            values, grads = results[case.name]
            assert values.keys() == ref_values.keys(), case.name
            for key, ref in ref_values.items():
                assert abs(values[key].item() - ref.item()) <= 1e-9 * abs(ref.item()) + 1e-15, (case.name, key)
            assert grads.keys() == ref_grads.keys()
            assert [n for n, g in grads.items() if g is None] == [n for n, g in ref_grads.items() if g is None]
            for name, ref in ref_grads.items():
                if ref is None:
                    continue
                err = (grads[name] - ref).abs().max().item()
                assert err <= 1e-9 * ref.abs().max().item(), f"{case.name} rank {rank} {name}: error {err:.3g}"


def test_single_process_fallbacks():
    """Without a process group the helpers are the identity / the plain loss."""
    assert not dist.is_distributed() and dist.get_rank() == 0 and dist.get_world_size() == 1
    x = torch.randn(3, 4)
    assert dist.all_gather_with_grad(x) is x
    fi = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    ft = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    expected = compute_loss(LossConfig(), fi, ft, 10.0)["loss"]
    assert torch.equal(dist.distributed_clip_loss(fi, ft, 10.0), expected)


def test_init_without_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.device.type, info.distributed) == (0, 1, "cpu", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="RANK|MASTER_PORT"):
        dist.init_distributed(device="cpu")
