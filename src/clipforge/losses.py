"""Contrastive objectives as pure functions of L2-normalised features.

`logit_scale` here is the multiplier exp(t) (as in open_clip's losses), not the model's log-space parameter.

Every objective is a sum over the rows of the B x B similarity matrix S_ij = <f_i, g_j> (image i, text j),
taken in both directions where the objective is symmetric. That lets one formula serve a whole batch and a
distributed rank alike: a `Strip` is the rows [offset, offset + n) of the global matrix in both directions
(local images against all texts, local texts against all images), and `strip_loss_parts` returns each part
normalised by the *global* batch size, so summing it over a partition of the rows gives the global loss.
`clipforge.dist` does the gathering; nothing here touches torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .config import ConfigError
from .losses_distill import DistillConfig
from .losses_chunked import (
    ChunkSize,
    chunked_clip_loss,
    hardest_negatives,
    tiled_cross_entropy_sum,
    tiled_sigmoid_sum,
)
from .losses_regularizers import MARGIN_FORMS, MarginForm, cyclic_sums, cyclic_terms, positive_gap_sum

LossName = Literal["clip", "square", "siglip", "triplet", "cyclip"]
LOSS_NAMES: tuple[str, ...] = ("clip", "square", "siglip", "triplet", "cyclip")


def _check_pair(fn: str, image_features: torch.Tensor, text_features: torch.Tensor, min_batch: int = 1) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"{fn}: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape [B, D]"
        )
    if image_features.shape[0] < min_batch:
        raise ValueError(f"{fn}: needs a batch of at least {min_batch} pairs, got {image_features.shape[0]}")


class Strip(NamedTuple):
    """Rows [offset, offset + n) of the global similarity matrix, in both directions.

    image_rows/text_rows [n, D] are this strip's own pairs; image_all/text_all [B, D] are every pair of the
    global batch (for a single process, the same tensors as the rows and offset 0).
    """

    image_rows: torch.Tensor
    text_rows: torch.Tensor
    image_all: torch.Tensor
    text_all: torch.Tensor
    offset: int

    @classmethod
    def full(cls, image_features: torch.Tensor, text_features: torch.Tensor) -> Strip:
        return cls(image_features, text_features, image_features, text_features, 0)

    @property
    def is_full(self) -> bool:
        return self.image_rows is self.image_all and self.text_rows is self.text_all


def _positive_dots(strip: Strip) -> torch.Tensor:
    return (strip.image_rows * strip.text_rows).sum(dim=-1)  # [n]


def _rows_cross_entropy_sum(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor | float, offset: int, chunk: ChunkSize | None
) -> torch.Tensor:
    """Σ_i CE(scale * rows_i @ cols^T, target offset + i)."""
    if chunk is not None:
        return tiled_cross_entropy_sum(rows, cols, scale, offset, chunk)
    logits = scale * rows @ cols.t()  # [n, B]
    labels = torch.arange(rows.shape[0], device=rows.device) + offset
    return F.cross_entropy(logits, labels, reduction="sum")


def _clip_part(strip: Strip, batch: int, scale: torch.Tensor | float, chunk: ChunkSize | None) -> torch.Tensor:
    if strip.is_full:
        return clip_loss(strip.image_rows, strip.text_rows, scale, chunk)
    i2t = _rows_cross_entropy_sum(strip.image_rows, strip.text_all, scale, strip.offset, chunk)
    t2i = _rows_cross_entropy_sum(strip.text_rows, strip.image_all, scale, strip.offset, chunk)
    return (i2t + t2i) / (2 * batch)


def _siglip_part(
    strip: Strip, batch: int, scale: torch.Tensor | float, bias: torch.Tensor | float, chunk: ChunkSize | None
) -> torch.Tensor:
    rows, cols, offset = strip.image_rows, strip.text_all, strip.offset
    if chunk is not None:
        return tiled_sigmoid_sum(rows, cols, scale, bias, offset, chunk) / batch
    logits = scale * rows @ cols.t() + bias  # [n, B]
    signs = -torch.ones_like(logits)  # z_ij: -1 for negatives, +1 at the positive (i, offset + i)
    idx = torch.arange(rows.shape[0], device=rows.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch


def _square_part(strip: Strip, batch: int) -> torch.Tensor:
    positives = _positive_dots(strip)  # [n]
    positive_term = (positives - 1.0).square().sum() / batch
    if batch < 2:
        return positive_term
    # Σ_{i in strip, all j} S_ij^2 = <F_rows^T F_rows, G_all^T G_all>: two D x D Gram matrices instead of n x B.
    gram_rows = strip.image_rows.t() @ strip.image_rows  # [D, D]
    gram_cols = strip.text_all.t() @ strip.text_all  # [D, D]
    negative_sum = (gram_rows * gram_cols).sum() - positives.square().sum()
    return positive_term + negative_sum / (batch * (batch - 1))


def strip_margins(strip: Strip, chunk: ChunkSize | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [n], t2i [n]): <f_i, g_i> minus the hardest in-batch negative, for the strip's rows.

    The hardest negative is found without a graph (tile by tile with `chunk`); the margin is then recomputed
    with a graph from the chosen features, which gives the same gradient as differentiating the max.
    """
    positives = _positive_dots(strip)  # [n]
    idx_i2t = hardest_negatives(strip.image_rows, strip.text_all, strip.offset, chunk)  # [n]
    idx_t2i = hardest_negatives(strip.text_rows, strip.image_all, strip.offset, chunk)  # [n]
    i2t = positives - (strip.image_rows * strip.text_all[idx_i2t]).sum(dim=-1)
    t2i = positives - (strip.text_rows * strip.image_all[idx_t2i]).sum(dim=-1)
    return i2t, t2i


def _hinge_part(strip: Strip, batch: int, target: float, chunk: ChunkSize | None) -> torch.Tensor:
    i2t, t2i = strip_margins(strip, chunk)
    return (F.relu(target - i2t).sum() + F.relu(target - t2i).sum()) / (2 * batch)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: ChunkSize | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy over the scaled cosine-similarity matrix (Radford et al. 2021).

    image_features, text_features: [B, D], L2-normalised, row i of each forming a positive pair.
    Returns the mean of the image->text and text->image cross-entropies. `chunk_size` (int, or (rows, cols))
    selects the tiled path of `losses_chunked`, which never holds the B x B matrix and returns the same value
    and gradients (in fp32).
    """
    _check_pair("clip_loss", image_features, text_features)
    if chunk_size is not None:
        return chunked_clip_loss(image_features, text_features, logit_scale, chunk_size)
    logits = logit_scale * image_features @ text_features.t()  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def margin_regularizer(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """R = mean_i (1 - <f_i, g_i>): the one-sided margin regularizer, without its weight λ.

    Chen, Deng, Li & Gu (ICLR 2024) find that CLIP's zero-shot transfer depends on the margin by which a
    positive pair's similarity exceeds the negatives', and propose adding to the contrastive loss a
    regularizer that acts on positive pairs only ("one-sided": unlike the square loss it never pushes
    negatives anywhere), pulling each image towards its own caption so the margin grows. For unit vectors
    1 - <f, g> = ½‖f - g‖², so R is half the mean squared distance between positive pairs: it is zero only
    when every pair coincides and its gradient never touches a negative pair. Weighted by `margin_lambda`
    in `LossConfig`; `margin_hinge` is the variant that stops once a target margin is met.
    """
    _check_pair("margin_regularizer", image_features, text_features)
    return (1.0 - (image_features * text_features).sum(dim=-1)).mean()


def per_sample_margins(
    image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: ChunkSize | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [B], t2i [B]): <f_i, g_i> - max_{j≠i} <f_i, g_j> and <g_i, f_i> - max_{j≠i} <g_i, f_j>."""
    _check_pair("per_sample_margins", image_features, text_features, min_batch=2)
    return strip_margins(Strip.full(image_features, text_features), chunk_size)


def margin_hinge(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    target: float,
    chunk_size: ChunkSize | None = None,
) -> torch.Tensor:
    """Mean over pairs and both directions of relu(target - margin), margins as in `per_sample_margins`.

    Only pairs whose positive similarity beats the hardest in-batch negative by less than `target` are
    penalised; the gradient moves the positive pair and that one negative.
    """
    _check_pair("margin_hinge", image_features, text_features, min_batch=2)
    batch = image_features.shape[0]
    return _hinge_part(Strip.full(image_features, text_features), batch, float(target), chunk_size)


def square_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Regress similarities onto the identity: mean_i (S_ii - 1)² + mean_{i≠j} S_ij², with no temperature.

    Normalisation: the diagonal term is a mean over the B positive pairs, the off-diagonal term a mean over
    the B(B - 1) negative pairs, so both weigh the same whatever B (for B = 1 only the first exists). This is
    the square-loss baseline that Chen et al. (ICLR 2024) contrast with CLIP's loss: it can be minimised
    without separating positives from negatives by a margin, and fails at zero-shot transfer.
    """
    _check_pair("square_loss", image_features, text_features)
    return _square_part(Strip.full(image_features, text_features), image_features.shape[0])


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    chunk_size: ChunkSize | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023): -(1/B) Σ_ij log σ(z_ij (scale S_ij + bias)).

    z_ij = +1 on the diagonal and -1 elsewhere. The paper initialises t = log 10 (scale 10) and bias -10 so
    that the many negatives start with a small loss; that is the model's business (ModelConfig
    init_logit_scale / init_logit_bias), not this function's.
    """
    _check_pair("siglip_loss", image_features, text_features)
    batch = image_features.shape[0]
    return _siglip_part(Strip.full(image_features, text_features), batch, logit_scale, logit_bias, chunk_size)


def triplet_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    margin: float,
    chunk_size: ChunkSize | None = None,
) -> torch.Tensor:
    """Hinge on the hardest in-batch negative, both directions (VSE++, Faghri et al. 2018).

    mean_i [relu(margin - S_ii + max_{j≠i} S_ij) + relu(margin - S_ii + max_{j≠i} S_ji)]: the two
    directions are summed, as in VSE++, so this equals 2 * margin_hinge(target=margin).
    """
    _check_pair("triplet_loss", image_features, text_features, min_batch=2)
    batch = image_features.shape[0]
    return 2.0 * _hinge_part(Strip.full(image_features, text_features), batch, float(margin), chunk_size)


def cyclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    in_modal_weight: float = 0.25,
    cross_modal_weight: float = 0.25,
) -> torch.Tensor:
    """CyCLIP (Goel et al. 2022): the CLIP loss plus λ₁ · in-modal + λ₂ · cross-modal cyclic consistency.

    The terms (`losses_regularizers.cyclic_terms`) ask the image-image similarities to match the text-text
    ones and the similarity matrix to be symmetric; λ₁ = λ₂ = 0.25 are CyCLIP's published settings.
    """
    _check_pair("cyclip_loss", image_features, text_features)
    in_modal, cross_modal = cyclic_terms(image_features, text_features)
    return (clip_loss(image_features, text_features, logit_scale) + in_modal_weight * in_modal
            + cross_modal_weight * cross_modal)


def margin_penalty(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    form: MarginForm = "mean",
    logit_scale: torch.Tensor | float = 1.0,
    target: float = 0.2,
) -> torch.Tensor:
    """R in any of its forms (see `LossConfig.margin_form`), without the weight λ.

    "mean" is `margin_regularizer`; "squared" is mean_i (1 - <f_i, g_i>)²; the "-scaled" forms multiply by the
    (detached) logit scale; "hinge" is `margin_hinge(target)`.
    """
    cfg = LossConfig(margin_lambda=1.0, margin_form=form, margin_target=target)
    cfg.validate("margin_penalty")
    needs_negatives = form == "hinge"
    _check_pair("margin_penalty", image_features, text_features, min_batch=2 if needs_negatives else 1)
    strip = Strip.full(image_features, text_features)
    return _margin_part(cfg, strip, image_features.shape[0], logit_scale)


@dataclass(frozen=True)
class LossConfig:
    """Which objective to train with, plus the optional margin regularizer.

    total = objective + margin_lambda * R, with R in the form `margin_form` names:
      mean            mean_i (1 - <f_i, g_i>)              (`margin_regularizer`; = mean ½‖f_i - g_i‖²)
      squared         mean_i (1 - <f_i, g_i>)²
      mean-scaled     (1/T) · mean_i (1 - <f_i, g_i>)      1/T the logit scale, detached
      squared-scaled  (1/T) · mean_i (1 - <f_i, g_i>)²
      hinge           `margin_hinge(target=margin_target)`
    name "cyclip" is the CLIP loss plus cyclip_in_modal · in-modal + cyclip_cross_modal · cross-modal
    consistency (`cyclip_loss`).
    """

    name: LossName = "clip"
    margin_lambda: float = 0.0
    margin_form: MarginForm = "mean"
    margin_target: float = 0.2
    triplet_margin: float = 0.2
    chunk_size: int | None = None
    distill: DistillConfig | None = None  # a teacher whose similarity distributions the student also matches
    cyclip_in_modal: float = 0.25  # λ₁ of CyCLIP
    cyclip_cross_modal: float = 0.25  # λ₂ of CyCLIP
    # A queue of the last `queue_size` image and text features as extra negatives (clip only; see losses_queue),
    # filled by a momentum encoder with this momentum when set (MoCo), else by the model itself.
    queue_size: int = 0
    queue_momentum: float | None = None

    @property
    def uses_logit_scale(self) -> bool:
        """Whether the objective reads the temperature; under DDP freeze the parameter when it does not."""
        return self.name in ("clip", "siglip", "cyclip")

    @property
    def uses_logit_bias(self) -> bool:
        return self.name == "siglip"

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.name not in LOSS_NAMES:
            raise ConfigError(f"config key '{p}name': expected one of {list(LOSS_NAMES)}, got {self.name!r}")
        if self.margin_form not in MARGIN_FORMS:
            raise ConfigError(f"config key '{p}margin_form': expected one of {list(MARGIN_FORMS)}, "
                              f"got {self.margin_form!r}")
        if not (math.isfinite(self.margin_lambda) and self.margin_lambda >= 0.0):
            raise ConfigError(f"config key '{p}margin_lambda': expected a finite number >= 0, got {self.margin_lambda}")
        # Margins of unit vectors lie in [-2, 2]; outside it the hinge is always or never active.
        if not -2.0 <= self.margin_target <= 2.0:
            raise ConfigError(f"config key '{p}margin_target': expected a value in [-2, 2], got {self.margin_target}")
        if not 0.0 <= self.triplet_margin <= 2.0:
            raise ConfigError(f"config key '{p}triplet_margin': expected a value in [0, 2], got {self.triplet_margin}")
        for key in ("cyclip_in_modal", "cyclip_cross_modal"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"config key '{p}{key}': expected a finite number >= 0, got {value}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"config key '{p}chunk_size': expected a positive integer or null, got {self.chunk_size}")
        if self.distill is not None:
            self.distill.validate(f"{p}distill")
        self._validate_queue(p)

    def _validate_queue(self, p: str) -> None:
        if self.queue_size < 0:
            raise ConfigError(f"config key '{p}queue_size': expected an integer >= 0, got {self.queue_size}")
        if self.queue_size and self.name != "clip":
            raise ConfigError(f"config key '{p}queue_size': a queue of negatives works with loss 'clip', not "
                              f"{self.name!r}")
        if self.queue_momentum is not None and not self.queue_size:
            raise ConfigError(f"config key '{p}queue_momentum': only applies with {p}queue_size > 0")
        if self.queue_momentum is not None and not 0.0 <= self.queue_momentum < 1.0:
            raise ConfigError(f"config key '{p}queue_momentum': expected a value in [0, 1), got {self.queue_momentum}")


def _margin_part(cfg: LossConfig, strip: Strip, batch: int, logit_scale: torch.Tensor | float) -> torch.Tensor:
    if cfg.margin_form == "hinge":
        return _hinge_part(strip, batch, cfg.margin_target, cfg.chunk_size)
    return positive_gap_sum(_positive_dots(strip), cfg.margin_form, logit_scale) / batch


def _cyclip_parts(cfg: LossConfig, strip: Strip, batch: int, scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    # The cyclic terms are always dense ([n, B] matrices); `chunk_size` tiles the CLIP part only.
    in_modal, cross_modal = cyclic_sums(strip.image_rows, strip.text_rows, strip.image_all, strip.text_all)
    return {"clip": _clip_part(strip, batch, scale, cfg.chunk_size), "cyclic_in_modal": in_modal / batch,
            "cyclic_cross_modal": cross_modal / batch}


def _objective_part(cfg: LossConfig, strip: Strip, batch_size: int, logit_scale: torch.Tensor | float,
                    logit_bias: torch.Tensor | float | None) -> torch.Tensor:
    chunk = cfg.chunk_size
    if cfg.name == "clip":
        return _clip_part(strip, batch_size, logit_scale, chunk)
    if cfg.name == "siglip":
        if logit_bias is None:
            raise ValueError("loss 'siglip' needs a logit_bias: build the model with init_logit_bias (e.g. -10)")
        return _siglip_part(strip, batch_size, logit_scale, logit_bias, chunk)
    if cfg.name == "square":
        return _square_part(strip, batch_size)
    return 2.0 * _hinge_part(strip, batch_size, cfg.triplet_margin, chunk)


def strip_loss_parts(
    cfg: LossConfig,
    strip: Strip,
    batch_size: int,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """The strip's share of every loss part, normalised by the global `batch_size`.

    Summed over strips that partition the rows, each entry equals the single-process value on the global
    batch. Keys: "loss" (the weighted total), the objective's name (for cyclip: "clip", "cyclic_in_modal",
    "cyclic_cross_modal"), and "margin" when margin_lambda > 0.
    """
    if cfg.name == "cyclip":
        parts = _cyclip_parts(cfg, strip, batch_size, logit_scale)
        main = (parts["clip"] + cfg.cyclip_in_modal * parts["cyclic_in_modal"]
                + cfg.cyclip_cross_modal * parts["cyclic_cross_modal"])
        parts = {"cyclip": main, **parts}
    else:
        main = _objective_part(cfg, strip, batch_size, logit_scale, logit_bias)
        parts = {cfg.name: main}
    total = main
    if cfg.margin_lambda > 0.0:
        margin = _margin_part(cfg, strip, batch_size, logit_scale)
        parts["margin"] = margin
        total = total + cfg.margin_lambda * margin
    return {"loss": total, **parts}


def compute_loss(
    cfg: LossConfig,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss": total, "<objective>": value, ["margin": R]} for one batch of normalised features [B, D]."""
    needs_negatives = cfg.name == "triplet" or (cfg.margin_lambda > 0 and cfg.margin_form == "hinge")
    _check_pair(f"loss '{cfg.name}'", image_features, text_features, min_batch=2 if needs_negatives else 1)
    strip = Strip.full(image_features, text_features)
    return strip_loss_parts(cfg, strip, image_features.shape[0], logit_scale, logit_bias)
