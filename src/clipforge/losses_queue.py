"""The CLIP loss with a queue of negatives: each image is also scored against the last K texts, each text
against the last K images (MoCo, He et al. 2020, applied to both directions of CLIP's loss).

Queue entries are features of earlier batches; they carry no gradient. With an empty queue the loss is exactly
`losses.clip_loss`. Pure functions of tensors: the queue's state lives in `train.queue.NegativeQueue`.
"""

from __future__ import annotations

import torch

from .config import ConfigError
from .losses import LossConfig, Strip, _check_pair, _rows_cross_entropy_sum, strip_loss_parts

# A queue may take at most this fraction of the memory it lives in, counting the queue itself (two [K, D]
# tables) and the per-step logits, softmax and their gradient (three [b, B + K] matrices per direction).
QUEUE_MEMORY_FRACTION = 0.25
MAX_QUEUE_SIZE = 1 << 20


def queue_strip_clip(strip: Strip, batch: int, logit_scale: torch.Tensor | float, image_queue: torch.Tensor,
                     text_queue: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The strip's share of the queue-augmented CLIP loss, normalised by the global `batch`.

    Rows i of the strip: image i against [all batch texts; text queue] and text i against [all batch images;
    image queue], positive at column offset + i. Summed over strips that partition the batch, this is the
    single-process value.
    """
    texts = torch.cat([strip.text_all, text_queue.detach().to(strip.text_all.dtype)])  # [B + K, D]
    images = torch.cat([strip.image_all, image_queue.detach().to(strip.image_all.dtype)])  # [B + K, D]
    i2t = _rows_cross_entropy_sum(strip.image_rows, texts, logit_scale, strip.offset, chunk)
    t2i = _rows_cross_entropy_sum(strip.text_rows, images, logit_scale, strip.offset, chunk)
    return (i2t + t2i) / (2 * batch)


def queue_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                    image_queue: torch.Tensor, text_queue: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over [batch; queue] columns.

    image_features, text_features [B, D] (L2-normalised, row i a positive pair); image_queue, text_queue
    [K, D] (K may be 0): negatives only, detached. `chunk_size` tiles the rows (same value and gradients).
    """
    _check_pair("queue_clip_loss", image_features, text_features)
    if image_queue.shape != text_queue.shape or image_queue.ndim != 2 or (
            image_queue.shape[0] and image_queue.shape[1] != image_features.shape[1]):
        raise ValueError(f"queue_clip_loss: image queue {tuple(image_queue.shape)} and text queue "
                         f"{tuple(text_queue.shape)} must both be [K, {image_features.shape[1]}]")
    strip = Strip.full(image_features, text_features)
    return queue_strip_clip(strip, image_features.shape[0], logit_scale, image_queue, text_queue, chunk_size)


def queue_strip_parts(cfg: LossConfig, strip: Strip, batch: int, logit_scale: torch.Tensor | float,
                      image_queue: torch.Tensor, text_queue: torch.Tensor) -> dict[str, torch.Tensor]:
    """`losses.strip_loss_parts` with the "clip" objective scored against the queue as well.

    The margin term (when margin_lambda > 0) is unchanged: it reads positive pairs and in-batch negatives only.
    """
    main = queue_strip_clip(strip, batch, logit_scale, image_queue, text_queue, cfg.chunk_size)
    parts = {"clip": main}
    total = main
    if cfg.margin_lambda > 0.0:
        margin = strip_loss_parts(cfg, strip, batch, logit_scale)["margin"]
        parts["margin"] = margin
        total = total + cfg.margin_lambda * margin
    return {"loss": total, **parts}


def check_queue_size(queue_size: int, embed_dim: int, global_batch: int, rank_batch: int, memory_bytes: int) -> None:
    """Refuse a queue that cannot be sane for this embedding size, batch and memory (ConfigError naming the key).

    Memory counted in fp32: the two [K, D] tables, plus per step the logits, their softmax and gradient in
    both directions, [b, B + K] each for a rank's b rows.
    """
    if queue_size > MAX_QUEUE_SIZE:
        raise ConfigError(f"config key 'loss.queue_size': {queue_size} is above the limit {MAX_QUEUE_SIZE}")
    tables = 2 * queue_size * embed_dim * 4
    logits = 2 * 3 * rank_batch * (global_batch + queue_size) * 4
    need, allowed = tables + logits, int(QUEUE_MEMORY_FRACTION * memory_bytes)
    if need > allowed:
        raise ConfigError(
            f"config key 'loss.queue_size': a queue of {queue_size} x {embed_dim}-d features with a batch of "
            f"{global_batch} needs about {need / 2**30:.2f} GiB, above {QUEUE_MEMORY_FRACTION:.0%} of this "
            f"device's {memory_bytes / 2**30:.1f} GiB; choose a smaller queue")
