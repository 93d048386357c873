"""The teacher of `loss.distill`: built once in setup, run beside the student in each step.

The teacher runs in eval mode without gradients and under bf16 autocast on CPU (fp32 elsewhere); its
features are cast to fp32 before the loss. When the teacher's input resolution differs from the student's,
the batch's images are resized for it (bicubic with antialiasing, on the normalised tensors: resizing is
linear, so it commutes with the per-channel normalisation). Its text tower must read the student's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..losses_distill import DistillConfig, distill_loss


class Teacher:
    def __init__(self, cfg: DistillConfig, device: torch.device, student_context: int) -> None:
        from ..convert import load_model  # noqa: PLC0415
        from ..speed import bf16_supported  # noqa: PLC0415

        self.cfg = cfg
        self.model = load_model(cfg.teacher).to(device).eval().requires_grad_(False)
        self.bf16 = torch.device(device).type == "cpu" and bf16_supported(device)  # CPU autocast, never emulated
        if self.model.config.text_cfg.hf_model_path is not None:
            raise ConfigError(f"loss.distill.teacher {cfg.teacher}: its text tower uses another tokenizer than "
                              "the student's; distillation needs a teacher with CLIP's BPE text tower")
        if self.model.context_length < student_context:
            raise ConfigError(f"loss.distill.teacher {cfg.teacher}: context length {self.model.context_length} "
                              f"is shorter than the student's tokens ({student_context})")

    @torch.no_grad()
    def features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised teacher features [B, D_t] x 2 (fp32) and its logit multiplier."""
        size = self.model.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            image_features, text_features, scale = self.model(images, tokens)
        return image_features.float(), text_features.float(), scale.float()

    def add_loss(self, parts: dict[str, torch.Tensor], images: torch.Tensor, tokens: torch.Tensor,
                 student_image: torch.Tensor, student_text: torch.Tensor,
                 student_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss parts with "distill" added and `weight` times it in "loss"."""
        teacher_image, teacher_text, teacher_scale = self.features(images, tokens)
        if self.cfg.temperature is not None:
            student_scale = teacher_scale = torch.tensor(1.0 / self.cfg.temperature, device=images.device)
        value = distill_loss(student_image, student_text, student_scale, teacher_image, teacher_text, teacher_scale)
        return {**parts, "distill": value, "loss": parts["loss"] + self.cfg.weight * value}
