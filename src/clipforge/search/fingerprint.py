"""A model's identity for the search side: backend, architecture, a hash of its weights and its preprocessing.

Embeddings and an index are only comparable with queries from the same model run by the same backend; the
fingerprint is written next to both and checked before a query is embedded, so a switched model (or the same
model through ONNX Runtime, or quantised to int8) is refused instead of returning silently wrong neighbours.
A torch fingerprint hashes the state dict; an ONNX one the bytes of the graphs the backend runs, export.json,
preprocess.json and the tokenizer files. Fingerprints written before backends existed have no "backend" key
and mean "torch".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .errors import SearchError

__all__ = ["check_fingerprint", "model_fingerprint", "onnx_fingerprint", "weights_sha256"]


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
        "backend": "torch",
        "architecture": to_dict(config),
        "weights_sha256": weights_sha256(model),
        "preprocessing": preprocessing_spec(size),
        "dim": int(config.embed_dim),
    }


def files_sha256(folder: Path, names: list[str]) -> str:
    """sha256 over (relative name, size, bytes) of the files `names` under `folder`, in the order given."""
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(f"{name}|{path.stat().st_size}\n".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def onnx_fingerprint(folder: Path, backend: str, graphs: tuple[str, str], info: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of an export folder run by `backend`: the export's own description of the model, and a
    hash of every file that decides the features: both graphs (and their external data), export.json,
    preprocess.json and the tokenizer files."""
    names = [name for graph in graphs for name in (graph, f"{graph}.data") if (folder / name).is_file()]
    names += ["export.json", "preprocess.json"]
    names += sorted(p.relative_to(folder).as_posix() for p in (folder / "tokenizer").rglob("*") if p.is_file())
    keys = ("format", "vision", "text", "image_size", "context_length", "embed_dim", "opset")
    return {
        "backend": backend,
        "architecture": {key: info.get(key) for key in keys},
        "files_sha256": files_sha256(folder, names),
        "preprocessing": json.loads((folder / "preprocess.json").read_text()),
        "dim": int(info["embed_dim"]),
    }


def backend_of(fingerprint: Mapping[str, Any]) -> str:
    """The backend a fingerprint was made by ("torch" for those written before backends existed)."""
    return str(fingerprint.get("backend", "torch"))


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


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], where: str = "index",
                      other: str = "this model") -> None:
    """Raise SearchError naming the backends when they differ, else the first key where the fingerprints do.
    `where` names the side `expected` comes from, `other` the side of `actual`."""
    if backend_of(expected) != backend_of(actual):
        raise SearchError(
            f"backend mismatch: {where} was embedded with --backend {backend_of(expected)}, {other} with "
            f"--backend {backend_of(actual)}; embeddings of different backends or precisions are not comparable "
            f"(use --backend {backend_of(expected)}, or embed again)"
        )
    expected, actual = {"backend": "torch", **expected}, {"backend": "torch", **actual}
    key = _first_difference(expected, actual, "")
    if key is None:
        return
    want, got = _lookup(expected, key), _lookup(actual, key)
    if key in ("weights_sha256", "files_sha256"):
        want, got = str(want)[:12] + "…", str(got)[:12] + "…"
    raise SearchError(
        f"model fingerprint mismatch: {key} differs ({where} was built with {want!r}, {other} has {got!r}); "
        "embed and index again with this model, or query with the model that built it"
    )
