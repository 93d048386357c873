"""Image and text features of a frozen model, with image features cached on disk.

Evaluations (zero-shot, retrieval, linear probes) are pure functions over these features, so each image set is
encoded once per model. The cache key covers the model's weights (a checksum of its state dict), the dataset
and split, the preprocessing and the number of images; any change makes a new entry, never a stale hit.
Works with any model that has `encode_image(images)` / `encode_text(tokens)` (duck typing, as
CLIP_benchmark does).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset


def model_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's state dict (hex)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype
    return digest.hexdigest()


def _images_and_targets(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, list[Any]]:
    """Collate that stacks the images [B, 3, H, W] and leaves labels or caption lists as a plain list."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def input_device(model: Any, device: str | torch.device | None = None) -> torch.device:
    """Where a model's inputs go: `device` if given, else the device of the model's parameters."""
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def encode_images(
    model: Any,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, list[Any]]:
    """L2-normalised image features [N, D] (float32, on CPU) and each item's target (label or captions)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_images_and_targets)
    features, targets = [], []
    for images, batch_targets in loader:
        encoded = model.encode_image(images.to(input_device(model, device)))  # [B, D]
        features.append(torch.nn.functional.normalize(encoded.float(), dim=-1).cpu())
        targets.extend(batch_targets)
    return torch.cat(features), targets


@torch.no_grad()
def encode_texts(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """L2-normalised text features [T, D] (float32, on CPU)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(input_device(model, device))  # [b, L]
        chunks.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(chunks)


def cache_path(cache_dir: str | Path, dataset_key: str, checksum: str, transform: Any, count: int) -> Path:
    """The cache file of one (model, dataset split, preprocessing, size); readable prefix + hash of the rest."""
    key = f"{checksum}|{dataset_key}|{transform!r}|{count}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_key).strip("-")
    return Path(cache_dir) / f"{readable}-{digest}.safetensors"


def cached_image_features(
    model: Any,
    dataset: Dataset,
    dataset_key: str,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image features [N, D] and, for a classification dataset, labels [N]; read from the cache when present.

    `dataset_key` names the data, e.g. "emoji/test"; `cache_dir=None` disables the cache.
    """
    path = None
    if cache_dir is not None:
        transform = getattr(dataset, "transform", None)
        path = cache_path(cache_dir, dataset_key, model_checksum(model), transform, len(dataset))  # type: ignore[arg-type]
        if path.is_file():
            stored = load_file(str(path))
            return stored["features"], stored.get("labels")
    features, targets = encode_images(model, dataset, batch_size, device, num_workers)
    labels = torch.tensor(targets, dtype=torch.long) if targets and isinstance(targets[0], int) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": features.contiguous()}
        if labels is not None:
            tensors["labels"] = labels
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"dataset": dataset_key})
        tmp.replace(path)  # atomic: a crash never leaves a truncated cache entry
    return features, labels
