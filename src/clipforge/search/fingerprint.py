"""A model's identity for the search side: architecture, a hash of its weights and its preprocessing.

Embeddings and an index are only comparable with queries from the same model; the fingerprint is written
next to both and checked before a query is embedded, so a switched model is refused instead of returning
silently wrong neighbours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from ..config import to_dict
from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .errors import SearchError

__all__ = ["check_fingerprint", "model_fingerprint", "weights_sha256"]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor, in sorted name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # bytes of the flat storage; a uint8 view works for every dtype, bfloat16 included
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def preprocessing_spec(image_size: int) -> dict[str, Any]:
    """What `transforms.EvalTransform` does, as data."""
    return {
        "resize": "shorter side, bicubic",
        "crop": "centre",
        "image_size": int(image_size),
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
    }


def model_fingerprint(model: torch.nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """The fingerprint of a clipforge CLIP: {architecture, weights_sha256, preprocessing, dim}."""
    config = getattr(model, "config", None)
    if config is None:
        raise SearchError(f"cannot fingerprint a {type(model).__name__}: it has no architecture config")
    size = image_size if image_size is not None else config.vision_cfg.image_size
    return {
        "architecture": to_dict(config),
        "weights_sha256": weights_sha256(model),
        "preprocessing": preprocessing_spec(size),
        "dim": int(config.embed_dim),
    }


def _first_difference(expected: Any, actual: Any, path: str) -> str | None:
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(expected) | set(actual)):
            where = f"{path}.{key}" if path else str(key)
            if key not in expected or key not in actual:
                return where
            found = _first_difference(expected[key], actual[key], where)
            if found is not None:
                return found
        return None
    return None if expected == actual else path


def _lookup(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key, "<absent>") if isinstance(tree, Mapping) else "<absent>"
    return tree


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], where: str = "index") -> None:
    """Raise SearchError naming the first key where the two fingerprints differ."""
    key = _first_difference(expected, actual, "")
    if key is None:
        return
    want, got = _lookup(expected, key), _lookup(actual, key)
    if key == "weights_sha256":
        want, got = str(want)[:12] + "…", str(got)[:12] + "…"
    raise SearchError(
        f"model fingerprint mismatch: {key} differs ({where} was built with {want!r}, this model has {got!r}); "
        "embed and index again with this model, or query with the model that built it"
    )
