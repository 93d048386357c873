"""Zero-shot classification: class names x prompt templates -> classifier weights -> top-k accuracy."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from .features import input_device
from .metrics import classification_metrics


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the normalised mean of its normalised template embeddings.

    This is the prompt ensemble of Radford et al. (2021), sec. 3.1.4; with one template it reduces to the
    plain prompt embedding.
    """
    if len(classnames) == 0:
        raise ConfigError("zero-shot classification needs at least one class name; the class list is empty")
    if len(templates) == 0:
        raise ConfigError("zero-shot classification needs at least one prompt template; the template list is empty")
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(texts).to(input_device(model, device))  # [C*T, L]
    features = []
    for start in range(0, len(texts), 1024):
        features.append(model.encode_text(tokens[start:start + 1024], normalize=True).float())
    per_prompt = torch.cat(features).view(len(classnames), len(templates), -1)  # [C, T, D]
    weights = F.normalize(per_prompt.mean(dim=1), dim=-1)  # [C, D]
    return weights.t().contiguous().cpu()  # [D, C], on CPU beside the image features


@torch.no_grad()
def encode_images(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256,
                  device: str | torch.device | None = None, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image features [N, D], labels [N]) of a (image, label) dataset."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, target in loader:
        feats.append(model.encode_image(images.to(input_device(model, device)), normalize=True).float().cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels)


def zeroshot_scores(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall of features [N, D] against zero-shot weights [D, C]."""
    return classification_metrics(image_features @ classifier.to(image_features.dtype), labels)  # [N, C] logits
