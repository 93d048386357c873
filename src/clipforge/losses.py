"""Contrastive objectives as pure functions of L2-normalised features.

`logit_scale` here is the multiplier exp(t) (as in open_clip's losses), not the model's log-space parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy over the scaled cosine-similarity matrix (Radford et al. 2021).

    image_features, text_features: [B, D], L2-normalised, row i of each forming a positive pair.
    Returns the mean of the image->text and text->image cross-entropies.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"clip_loss: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape [B, D]"
        )
    if chunk_size is not None:
        from .losses_chunked import chunked_clip_loss  # noqa: PLC0415

        return chunked_clip_loss(image_features, text_features, logit_scale, chunk_size)
    logits = logit_scale * image_features @ text_features.t()  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# --- minimal objective selection (extended by the objectives work) ---
from dataclasses import dataclass  # noqa: E402
from typing import Literal  # noqa: E402


@dataclass(frozen=True)
class LossConfig:
    name: Literal["clip"] = "clip"
    chunk_size: int | None = None

    def validate(self, prefix: str = "") -> None:
        pass


def compute_loss(cfg: LossConfig, image_features: torch.Tensor, text_features: torch.Tensor,
                 logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    loss = clip_loss(image_features, text_features, logit_scale, cfg.chunk_size)
    return {"loss": loss, "clip": loss.detach()}
