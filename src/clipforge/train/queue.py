"""The state behind `loss.queue_size`: a ring buffer of the last K image and text features, and optionally a
momentum encoder (MoCo's key encoder: an exponential moving average of the model) that computes them.

Order within a step: the loss scores the batch against the queue as it stood before the step
(`NegativeQueue.loss`), then the step's features are enqueued. Under DDP every rank enqueues the gathered global
batch, so every rank holds the same queue, and rank 0's copy is the checkpoint's. Without a momentum encoder the
enqueued features are the model's own (detached); with one (`loss.queue_momentum` = m), the encoder's weights
become m * encoder + (1 - m) * model at the start of every step and it embeds the batch for the queue, so the
queue's entries drift slowly instead of coming from K / B different versions of the model.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .. import dist
from ..losses import LossConfig, Strip
from ..losses_queue import check_queue_size, queue_strip_parts
from ..models.config import ModelConfig


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of `device`: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_queue(cfg: LossConfig, model_cfg: ModelConfig, global_batch: int, world_size: int,
                device: torch.device) -> None:
    if cfg.queue_size:
        check_queue_size(cfg.queue_size, model_cfg.embed_dim, global_batch, global_batch // world_size,
                         device_memory_bytes(device))


class NegativeQueue:
    """K image and K text features [K, D] (fp32, no gradient), the write position and how many are filled."""

    def __init__(self, size: int, dim: int, device: torch.device, momentum: float | None = None,
                 model: torch.nn.Module | None = None) -> None:
        self.image = torch.zeros(size, dim, device=device)
        self.text = torch.zeros(size, dim, device=device)
        self.ptr, self.count = 0, 0
        self.momentum = momentum
        self.encoder: torch.nn.Module | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # momentum features of this step's batch
        if momentum is not None:
            if model is None:
                raise ValueError("NegativeQueue: a momentum encoder needs the model to copy")
            self.encoder = copy.deepcopy(model).eval()
            self.encoder.requires_grad_(False)

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled entries (image [n, D], text [n, D]), n = min(steps so far * B, K)."""
        return self.image[: self.count], self.text[: self.count]

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Write a global batch [B, D] at the pointer (wrapping around), keeping its last K rows if B > K.

        A batch with a non-finite feature is not enqueued (its step is skipped by the trainer anyway)."""
        if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
            return
        image, text = image[-self.size:], text[-self.size:]
        rows = (self.ptr + torch.arange(image.shape[0], device=self.image.device)) % self.size  # [B]
        self.image[rows] = image.to(self.image)
        self.text[rows] = text.to(self.text)
        self.ptr = (self.ptr + image.shape[0]) % self.size
        self.count = min(self.count + image.shape[0], self.size)

    @torch.no_grad()
    def prepare(self, model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> None:
        """Momentum encoder only: move it towards `model`, then embed this rank's batch for the queue."""
        if self.encoder is None:
            return
        m = float(self.momentum)  # type: ignore[arg-type]
        for mine, theirs in zip(self.encoder.parameters(), model.parameters()):
            mine.mul_(m).add_(theirs.detach(), alpha=1.0 - m)
        for mine, theirs in zip(self.encoder.buffers(), model.buffers()):
            mine.copy_(theirs)
        image_features, text_features, _ = self.encoder(images, tokens)
        self.pending = (image_features.float(), text_features.float())

    def loss(self, cfg: LossConfig, image_features: torch.Tensor, text_features: torch.Tensor,
             logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """The loss parts of `compute_loss` (or its distributed form) with the queue's negatives, then enqueue."""
        if dist.is_distributed():
            strip, batch = dist.gather_strip(image_features, text_features)
        else:
            strip, batch = Strip.full(image_features, text_features), image_features.shape[0]
        parts = queue_strip_parts(cfg, strip, batch, logit_scale, *self.negatives())
        if dist.is_distributed():
            parts = dist.global_values(parts, dist.get_world_size())
        if self.pending is not None:
            with torch.no_grad():
                keys = tuple(dist.all_gather_with_grad(x) for x in self.pending)
            self.pending = None
        else:
            keys = (strip.image_all.detach(), strip.text_all.detach())
        self.enqueue(*keys)
        return parts

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"image": self.image.clone(), "text": self.text.clone(), "ptr": self.ptr,
                                 "count": self.count}
        if self.encoder is not None:
            state["encoder"] = {k: v.clone() for k, v in self.encoder.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["image"].shape) != tuple(self.image.shape):
            raise ValueError(f"queue state holds {tuple(state['image'].shape)} features, expected "
                             f"{tuple(self.image.shape)}")
        if (self.encoder is None) != ("encoder" not in state):
            raise ValueError("queue state and config disagree on the momentum encoder")
        self.image.copy_(state["image"])
        self.text.copy_(state["text"])
        self.ptr, self.count = int(state["ptr"]), int(state["count"])
        if self.encoder is not None:
            self.encoder.load_state_dict(state["encoder"])


def build_queue(cfg: LossConfig, model: torch.nn.Module, device: torch.device) -> NegativeQueue | None:
    """The run's queue when `cfg.queue_size` > 0 (sized by the model's embedding dimension), else None."""
    if not cfg.queue_size:
        return None
    dim = model.config.embed_dim  # type: ignore[union-attr]
    return NegativeQueue(cfg.queue_size, dim, device, cfg.queue_momentum, model)
