"""The only module that touches torch.distributed: process-group setup and exact distributed losses.

Exactness, and how it is reached. Every rank gathers the features of the whole global batch *with gradient*
and computes only its own rows of the similarity matrix (its images against all texts, its texts against all
images), normalised by the global batch size: a strip (see `clipforge.losses.Strip`). Summed over ranks, the
strips are the global loss. The backward of the gather sends every rank's gradient for a feature back to the
rank that owns it, so each rank's parameters receive d(Σ_r strip_r)/dθ through their own samples. DDP then
*averages* gradients over ranks, so each rank backpropagates world_size * strip_r: the average of those is
exactly the single-process gradient of the global loss. The returned values are the global loss (summed over
ranks), so every rank logs the same number the single process would.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .losses import LossConfig, Strip, compute_loss, strip_loss_parts

_REQUIRED_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size`, its rank on this node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"environment variable {name} is not set (launch with torchrun, which sets it)")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r}: expected an integer") from None


def init_distributed(backend: str | None = None, device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*).

    Without WORLD_SIZE (or with 1) this is a single process and nothing is initialised. The backend defaults
    to nccl when the device is CUDA and gloo otherwise; on CUDA each process takes the GPU of its local rank.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world_size <= 1:
        return DistInfo(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    for name in _REQUIRED_ENV:
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but environment variable {name} is not set (use torchrun)")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if use_cuda else "gloo"),
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=where)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (a no-op for a single process).

    DDP wrappers that are no longer referenced go first: a reducer torn down after its group (at garbage
    collection or interpreter exit, once a peer has exited) can deadlock, and dropping the last reference is not
    enough when a reference cycle holds the wrapper."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@torch.no_grad()
def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a detached copy of `value`."""
    out = value.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


@torch.no_grad()
def _gather_shapes(x: torch.Tensor) -> list[tuple[int, ...]]:
    local = torch.tensor(list(x.shape), device=x.device, dtype=torch.long)
    shapes = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(shapes, local)
    out = [tuple(int(v) for v in s.tolist()) for s in shapes]
    if any(s[1:] != out[0][1:] for s in out):
        raise ValueError(f"all_gather_with_grad: ranks hold tensors of different trailing shapes: {out}")
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n_r, ...] along dim 0; backward sums all ranks' gradients for my rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        rank, longest = get_rank(), max(sizes)
        # all_gather needs equal shapes: pad to the longest and strip afterwards.
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x.detach()
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded)
        ctx.rows = (sum(sizes[:rank]), sizes[rank])
        return torch.cat([b[:n] for b, n in zip(buffers, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total)  # Σ_r dL_r/d(all features): each rank keeps the rows it owns.
        start, count = ctx.rows
        return total[start : start + count], None


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(every rank's x concatenated with gradient, the row count of each rank)."""
    sizes = [s[0] for s in _gather_shapes(x)]
    return _AllGatherWithGrad.apply(x, tuple(sizes)), sizes


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` [n_r, ...] concatenated in rank order; ranks may hold different n_r.

    Gradients flow back to each owner: the gradient of my rows is the sum over all ranks of the gradient
    their losses put on those rows. Single process: `x` itself.
    """
    return _gather_rows(x)[0] if is_distributed() else x


def global_values(parts: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Values: each part summed over ranks (the global loss). Gradients: world_size * d part, for DDP's average."""
    totals = all_reduce_sum(torch.stack([p.detach().double() for p in parts.values()]))  # one collective
    out = {}
    for (key, part), total in zip(parts.items(), totals):
        scaled = world_size * part
        out[key] = scaled + (total.to(scaled.dtype) - scaled.detach())
    return out


def gather_strip(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[Strip, int]:
    """(this rank's strip of the global similarity matrix, global batch size) from local features [n, D]."""
    dim = image_features.shape[1]
    # One collective for both modalities: [n, 2D] -> [B, 2D].
    both, sizes = _gather_rows(torch.cat([image_features, text_features], dim=1))
    image_all, text_all = both[:, :dim], both[:, dim:]
    offset = sum(sizes[: get_rank()])  # where my rows start in the global batch
    return Strip(image_features, text_features, image_all, text_all, offset), both.shape[0]


def distributed_compute_loss(
    cfg: LossConfig,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """`compute_loss` on the global batch spread over ranks, each rank passing its local features [n, D].

    Every entry's value is the global-batch value on every rank; backpropagating "loss" on each rank under
    DDP (which averages gradients) gives exactly the single-process gradient. Without an initialised
    process group of more than one rank this is `compute_loss`.
    DDP waits for a gradient for every parameter that requires one: when the objective does not read
    logit_scale or logit_bias (`cfg.uses_logit_scale`, `cfg.uses_logit_bias`), set requires_grad=False on
    them before wrapping the model.
    """
    if not is_distributed():
        return compute_loss(cfg, image_features, text_features, logit_scale, logit_bias)
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"distributed loss '{cfg.name}': image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape [n, D]"
        )
    strip, batch = gather_strip(image_features, text_features)
    world_size = get_world_size()
    needs_negatives = cfg.name == "triplet" or (cfg.margin_lambda > 0 and cfg.margin_form == "hinge")
    if needs_negatives and batch < 2:
        raise ValueError(f"distributed loss '{cfg.name}': needs a global batch of at least 2 pairs, got {batch}")
    parts = strip_loss_parts(cfg, strip, batch, logit_scale, logit_bias)
    return global_values(parts, world_size)


def distributed_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`clip_loss` of the global batch (see `distributed_compute_loss` for the gradient convention)."""
    cfg = LossConfig(name="clip", chunk_size=chunk_size)
    return distributed_compute_loss(cfg, image_features, text_features, logit_scale)["loss"]


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` (any picklable value) on every rank; `obj` itself for a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank `src`'s, in place (nothing for one process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:  # the same order on every rank
            dist.broadcast(tensor.data, src=src)


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` for a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
