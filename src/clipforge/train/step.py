"""The training step: features -> loss -> backward -> clip -> AdamW -> clamp, in every precision and mode.

`train_step` is the one step that `clipforge train` runs and `benchmarks/bench_train_step.py` times. What varies
is fixed once, in `build_stepper`, from the config:

- precision: `fp32`; `bf16` (autocast); `bf16-master` (the model computes with bf16 matmul weights and no
  autocast, the optimizer updates fp32 master copies, which checkpoints save and evaluators read); both bf16
  modes fall back to fp32 on a device without fast bf16 (`speed.resolve_precision`: a CPU without AVX-512 BF16
  or AMX emulates bf16: on an AVX2-only AMD EPYC the demo's step took 25 s in bf16, 3 s in fp32, one thread);
- `accum_chunk`: exact contrastive accumulation (`gradcache`): each rank's batch is embedded in chunks
  without a graph, the loss is taken over the whole batch, then each chunk is replayed with its gradient;
- `compile`: `torch.compile` of the model that computes (DDP-wrapped under torchrun);
- the loss, built from `cfg.loss` in one place (`build_loss`): a function of the batch's `Features`, exact
  over the global batch when several ranks train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..losses import LossConfig, compute_loss
from ..models.clip import CLIP
from ..speed import MasterWeights, autocast, resolve_precision
from .config import TrainConfig
from .gradcache import gradcache_backward
from .optim import build_optimizer


class Features(NamedTuple):
    """What the loss reads: normalised features [b, D] (at least fp32) and the logit multiplier (and bias)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor  # exp(model.logit_scale)
    logit_bias: torch.Tensor | None
    images: torch.Tensor | None = None  # the batch they embed ([b, 3, H, W], [b, L]), for loss terms that
    tokens: torch.Tensor | None = None  # read it too (e.g. a teacher's features)


LossFn = Callable[[Features], dict[str, torch.Tensor]]


def build_loss(cfg: LossConfig, distributed: bool = False, queue: Any = None, teacher: Any = None) -> LossFn:
    """The objective of `cfg` as a function of the features: {"loss": total, parts...}. Under torchrun it is
    the exact loss of the global batch (`dist.distributed_compute_loss`); with `loss.queue_size` the queue's
    loss (its negatives added, then the batch enqueued); with `loss.distill` the teacher's term added."""
    if queue is not None:
        fn = queue.loss
    elif distributed:
        from ..dist import distributed_compute_loss as fn  # noqa: PLC0415 - the one module touching torch.distributed
    else:
        fn = compute_loss

    def loss(f: Features) -> dict[str, torch.Tensor]:
        parts = fn(cfg, f.image, f.text, f.logit_scale, f.logit_bias)
        if teacher is not None:  # the teacher's similarity distributions, added to the objective
            parts = teacher.add_loss(parts, f.images, f.tokens, f.image, f.text, f.logit_scale)
        return parts

    return loss


@dataclass(frozen=True)
class Stepper:
    """Everything one step uses. `model` computes (the CLIP, its bf16 twin, a DDP wrapper, compiled); `core`
    is the fp32 CLIP the optimizer updates, checkpoints save and evaluators read."""

    model: nn.Module
    core: CLIP
    optimizer: torch.optim.Optimizer
    loss: LossFn
    precision: str = "fp32"
    accum_chunk: int | None = None
    grad_clip: float | None = None
    master: MasterWeights | None = None
    no_sync: Callable | None = None  # DDP's no_sync: chunks before the last do not all-reduce
    queue: Any = None  # train.queue.NegativeQueue: its momentum encoder embeds each batch first

    def zero_grad(self) -> None:
        if self.master is not None:
            self.master.zero_grad()  # master gradients are overwritten by grads_to_master
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def release(self) -> None:
        """Drop the DDP / compiled wrapper (the one change after setup): it must go before its process group."""
        object.__setattr__(self, "model", self.master.model if self.master is not None else self.core)
        object.__setattr__(self, "no_sync", None)

    def update(self) -> None:
        self.optimizer.step()
        self.core.clamp_logit_scale()
        if self.master is not None:
            self.master.master_to_model()


class StepOutput(NamedTuple):
    parts: dict[str, torch.Tensor]  # loss entries (detached)
    grad_norm: torch.Tensor  # before clipping
    skipped: bool  # the update was not applied


def _wide(x: torch.Tensor) -> torch.Tensor:
    """bf16 (or fp16) features in fp32 for the loss; fp32 and fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bias(core: CLIP) -> torch.Tensor | None:
    return None if core.logit_bias is None else _wide(core.logit_bias)


def _accumulate(s: Stepper, images: torch.Tensor, tokens: torch.Tensor, loss: LossFn) -> dict[str, torch.Tensor]:
    """Gradients of the whole batch, embedded `accum_chunk` pairs at a time (`gradcache_backward`)."""
    params = [s.core.logit_scale] + ([s.core.logit_bias] if s.core.logit_bias is not None else [])

    def encode(im: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(im.device, s.precision):
            image, text, _ = s.model(im, tok)
        return _wide(image), _wide(text)

    def chunk_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return loss(Features(image, text, log_scale.exp(), None if bias is None else _wide(bias), images, tokens))

    assert s.accum_chunk is not None
    return gradcache_backward(encode, chunk_loss, (images, tokens), s.accum_chunk, params, s.no_sync,
                              stats_module=s.model)


def forward_backward(s: Stepper, images: torch.Tensor, tokens: torch.Tensor,
                     poison: bool = False) -> dict[str, torch.Tensor]:
    """Loss entries of one batch; gradients in `.grad`. `poison` multiplies the loss by NaN (the
    `debug.nan_steps` fault injection), which makes every gradient NaN."""

    def loss(f: Features) -> dict[str, torch.Tensor]:
        parts = s.loss(f)
        if poison:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    if s.queue is not None:
        with autocast(images.device, s.precision):
            s.queue.prepare(s.core, images, tokens)
    if s.accum_chunk is not None and s.accum_chunk < images.shape[0]:
        return _accumulate(s, images, tokens, loss)
    with autocast(images.device, s.precision):
        image, text, scale = s.model(images, tokens)
    parts = loss(Features(_wide(image), _wide(text), _wide(scale), _bias(s.core), images, tokens))
    parts["loss"].backward()
    return {k: v.detach() for k, v in parts.items()}


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (returns the total norm before clipping), bit for bit, minus one pass.

    torch always multiplies every gradient by min(1, max_norm / (norm + 1e-6)), to avoid a host-device sync;
    when that factor is 1 the pass changes nothing and costs ~2% of a CPU training step (151M fp32 gradients of
    ViT-B-32 read and written: aten::mul_ in docs/benchmarks/profile-amx.md). The trainer reads the norm on the
    host every step anyway (non-finite guard, log), so deciding here moves that sync rather than adding one.
    A NaN/inf norm still multiplies, as torch does.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm is not None and not bool(max_norm / (norm + 1e-6) >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train_step(s: Stepper, images: torch.Tensor, tokens: torch.Tensor, lr: float,
               skip: Callable[[torch.Tensor, torch.Tensor], bool] | None = None, poison: bool = False) -> StepOutput:
    """One optimizer step at learning rate `lr`. `skip(loss, grad_norm)`, when given, decides after the
    backward pass whether to drop this update (the trainer's non-finite guard, agreed over the ranks)."""
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    s.zero_grad()
    parts = forward_backward(s, images, tokens, poison)
    if s.master is not None:
        s.master.grads_to_master()
    params = [p for p in s.core.parameters() if p.grad is not None]
    grad_norm = clip_gradients(params, s.grad_clip)
    skipped = skip(parts["loss"], grad_norm) if skip is not None else False
    if not skipped:
        s.update()
    return StepOutput(parts, grad_norm, skipped)


def build_stepper(cfg: TrainConfig, core: CLIP, distributed: bool = False, queue: Any = None,
                  teacher: Any = None) -> Stepper:
    """The step's pieces for `core` (already initialised or restored): precision, optimizer, DDP, compile."""
    master = None
    compute: nn.Module = core
    precision = resolve_precision(cfg.precision, next(core.parameters()).device)
    if precision == "bf16-master":
        master = MasterWeights(core)  # casts `core` in place to the bf16 compute model
        compute, core = master.model, master.master  # type: ignore[assignment]
    optimizer = build_optimizer(core, cfg.optim)
    no_sync = None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        device = next(core.parameters()).device
        compute = DistributedDataParallel(compute, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = compute.no_sync
    if cfg.compile:
        compute = torch.compile(compute)  # type: ignore[assignment]
    return Stepper(compute, core, optimizer, build_loss(cfg.loss, distributed, queue, teacher), precision,
                   cfg.accum_chunk, cfg.optim.grad_clip, master, no_sync, queue)
