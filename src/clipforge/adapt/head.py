"""A linear classifier on frozen image features, initialised from the zero-shot text classifier (LP-FT's first
step, Kumar et al. 2022): W = exp(logit_scale) * class embeddings, b = 0, so before training its predictions are
exactly zero-shot's; then trained with cross-entropy on k labelled examples per class.

Saved as a small `.safetensors` (weight [C, D], bias [C]; class names, dataset and the model's checksum in the
metadata), read by `clipforge eval zeroshot --head FILE` and `clipforge.load_head(path)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ConfigError

HEAD_FORMAT = "clipforge-head"


@dataclass
class LinearHead:
    """logits = features @ weight.T + bias, for L2-normalised image features [N, D]."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    classnames: list[str]
    info: dict[str, str] = field(default_factory=dict)  # dataset, model checksum, training options

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.t() + self.bias  # [N, C]

    @torch.no_grad()
    def classify(self, model: Any, images: torch.Tensor) -> list[str]:
        """Class names of images [B, 3, H, W] (preprocessed for `model`)."""
        features = F.normalize(model.encode_image(images).float(), dim=-1).cpu()
        return [self.classnames[i] for i in self(features).argmax(dim=1).tolist()]

    def save(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write  # noqa: PLC0415

        metadata = {"format": HEAD_FORMAT, "classnames": json.dumps(self.classnames), **self.info}
        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_head(path: str | Path) -> LinearHead:
    """A head written by `clipforge finetune-head`; ConfigError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--head {path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != HEAD_FORMAT or set(tensors) != {"weight", "bias"}:
        raise ConfigError(f"--head {path}: not a clipforge head (written by `clipforge finetune-head`)")
    classnames = json.loads(metadata.pop("classnames", "[]"))
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or len(classnames) != weight.shape[0]:
        raise ConfigError(f"--head {path}: weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and "
                          f"{len(classnames)} class names do not agree")
    metadata.pop("format")
    return LinearHead(weight.float(), bias.float(), classnames, metadata)


def zeroshot_head(classifier: torch.Tensor, logit_scale: float, classnames: Sequence[str]) -> LinearHead:
    """The head whose logits equal zero-shot's: weight = scale * classifier.T ([D, C] -> [C, D]), bias 0."""
    weight = (logit_scale * classifier.t()).float().contiguous()  # [C, D]
    return LinearHead(weight, torch.zeros(weight.shape[0]), list(classnames))


def train_head(head: LinearHead, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
               batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> LinearHead:
    """AdamW on mean cross-entropy over shuffled mini-batches for `epochs` passes; returns a new head."""
    if epochs < 0 or not lr > 0:
        raise ConfigError(f"finetune-head: expected --epochs >= 0 and --lr > 0, got {epochs} and {lr}")
    weight = head.weight.clone().requires_grad_()
    bias = head.bias.clone().requires_grad_()
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            rows = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(features[rows].float() @ weight.t() + bias, labels[rows])
            loss.backward()
            optimizer.step()
    return LinearHead(weight.detach(), bias.detach(), head.classnames, dict(head.info))
