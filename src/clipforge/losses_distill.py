"""Distillation from a teacher CLIP's image-text similarity distributions, as a pure function of features.

For a batch of B pairs, each model gives a B x B matrix of scaled cosine similarities. Row i of the image->text
matrix, after a softmax, is the model's belief about which caption belongs to image i (and the columns, for
text->image). The student is trained to match the teacher's beliefs: the cross-entropy between the teacher's
softmax and the student's log-softmax, averaged over rows, in both directions and halved. This is the loss of
open_clip's DistillClipLoss (there added to the contrastive loss with weight 1); the cross-entropy equals the
KL divergence plus the teacher's entropy, a constant for the student, so the gradients are the KL's.

`temperature` None uses each model's own learned logit scale; a value T scales both models' cosines by 1/T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class DistillConfig:
    """`loss.distill`: the teacher checkpoint (any format `load_model` reads), the weight of the distillation
    term added to the objective, and an optional shared temperature."""

    teacher: str
    weight: float = 1.0
    temperature: float | None = None

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not self.teacher:
            raise ConfigError(f"config key '{p}teacher': expected the path of a teacher checkpoint")
        if not (math.isfinite(self.weight) and self.weight >= 0.0):
            raise ConfigError(f"config key '{p}weight': expected a finite number >= 0, got {self.weight}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ConfigError(f"config key '{p}temperature': expected a positive number or null, got {self.temperature}")


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum_j softmax(teacher)_ij * log_softmax(student)_ij; both [B, B]."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def distill_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    student_scale: torch.Tensor | float,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Scalar: (CE over image->text rows + CE over text->image rows) / 2, features L2-normalised [B, D]
    (the two models' D may differ), scales the logit multipliers (exp of the models' parameters)."""
    if student_image.shape[0] != teacher_image.shape[0] or student_text.shape[0] != teacher_text.shape[0]:
        raise ValueError(f"distill_loss: student batch {student_image.shape[0]} and teacher batch "
                         f"{teacher_image.shape[0]} differ")
    student = student_scale * student_image @ student_text.t()  # [B, B] image -> text
    teacher = teacher_scale * teacher_image @ teacher_text.t()  # [B, B]
    return (soft_cross_entropy(teacher, student) + soft_cross_entropy(teacher.t(), student.t())) / 2
