"""Shared by the search tests: a tiny saved model, tiny image collections, synthetic embedding folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.search.parts import write_manifest, write_part

MODEL_NAME = "ViT-Micro-8-32"


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    from clipforge import create_model
    from clipforge.checkpoint import save_model

    torch.manual_seed(seed)
    return save_model(create_model(MODEL_NAME).eval(), path)


def make_image(i: int, size: int = 20) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((size + i % 7, size + i % 5, 3)) * 255).astype(np.uint8))


def image_folder(root: Path, n: int, bad: bool = True) -> Path:
    """n PNG images with sidecar captions in three subfolders, plus (if `bad`) one undecodable image."""
    for i in range(n):
        sub = root / f"g{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        make_image(i).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"picture number {i}\n")
    if bad:
        (root / "g0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        (root / "g0" / "broken.txt").write_text("a broken file\n")
    return root


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 40, noise: float = 0.35) -> tuple:
    """Image vectors around `clusters` centres and captions near their image, shifted by a common offset (a
    modality gap, as real CLIP embeddings have): (img, text) [n, dim] unit rows."""
    centres = unit(rng.standard_normal((clusters, dim)))
    img = unit(centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)
    gap = unit(rng.standard_normal((1, dim)))
    text = unit(img + 0.6 * gap + 0.25 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)
    return img, text


def embedding_folder(root: Path, img: np.ndarray, text: np.ndarray | None, part_rows: int,
                     fingerprint: dict | None = None, key_prefix: str = "k", keys: list[str] | None = None) -> Path:
    """An embedding folder (as `clipforge embed` writes) holding the given vectors, row i keyed KEY_PREFIX + i
    (or keys[i]), its image at /nowhere/KEY.png."""
    parts = []
    keys = keys or [f"{key_prefix}{i}" for i in range(len(img))]
    for number, start in enumerate(range(0, len(img), part_rows)):
        rows = range(start, min(len(img), start + part_rows))
        columns = {"key": [keys[i] for i in rows], "path": [f"/nowhere/{keys[i]}.png" for i in rows],
                   "caption": [f"caption {i}" for i in rows]}
        parts.append(write_part(root, number, img[rows.start:rows.stop],
                                None if text is None else text[rows.start:rows.stop], columns))
    header = {"fingerprint": fingerprint or {"model": "synthetic"}, "dim": img.shape[1], "model": "synthetic",
              "has_text": text is not None, "source": {"kind": "synthetic"}}
    write_manifest(root, parts, header)
    return root


RANK_TOL = 1e-5  # batched and single forward passes, faiss and numpy, round differently in the last bits


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(id, score) of the k best rows of `vectors` [n, d] for a query [d] (normalised here), by float64 dot
    products; equal scores by id."""
    scores = vectors.astype(np.float64) @ (query / np.linalg.norm(query)).astype(np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [(int(i), float(scores[i])) for i in order]


def assert_ranking(results: list[dict], want: list[tuple[int, float]], tol: float = RANK_TOL) -> None:
    """Hits equal to the (id, score) list, ids trading places only where their scores tie within `tol`."""
    import pytest

    assert [h["score"] for h in results] == pytest.approx([s for _, s in want], abs=tol)
    for hit, (id_, score) in zip(results, want):
        assert hit["id"] == id_ or abs(hit["score"] - score) <= 2 * tol
