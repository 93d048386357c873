"""`clipforge filter`: every image of an index that a query matches above a score, written out as a dataset.

The use is curation: "all the images of this collection that look like a cat", as training data for the next
model. Three choices differ from a top-k search:
- the scan is exact, over the stored embeddings (one part in memory at a time), whatever the index kind: a
  filter must not lose matches to an approximate index's probing;
- the cut is a score, not a count, by default the index's calibrated no-good-match threshold for text queries
  (the score above which a caption was found to describe its own image);
- the output is a dataset the rest of clipforge reads: a manifest CSV (`image`, `caption`, `score`, `id`, `key`)
  that `embed`, `train` and `data shards` take, a folder of copied images with caption sidecars and that
  manifest, or WebDataset tar shards (img2dataset's layout, as `data shards` writes them) ready for training;
  the last two also take images that live inside tar shards. Folders appear only when complete.
"""

from __future__ import annotations

import csv
import io
import mimetypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_directory, atomic_write_text
from .errors import SearchError
from .index import VectorIndex, vector_chunks
from .scope import Scope

MANIFEST_COLUMNS = ("image", "caption", "score", "id", "key")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def matching(index: VectorIndex, vector: np.ndarray, min_score: float, limit: int | None = None,
             scope: Scope | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids [m] and scores [m] of every stored image (of the `scope`'s, with one) whose inner product with
    `vector` [d] is at least `min_score`, best first (equal scores by id), the first `limit` of them when given."""
    if vector.shape != (index.dim,):
        raise SearchError(f"query: expected a vector of {index.dim} values, got shape {list(vector.shape)}")
    query = np.ascontiguousarray(vector, dtype=np.float32)
    found_ids, found_scores = [], []
    for start, vectors in vector_chunks(index.sources):
        scores = vectors @ query  # [rows]
        skip = scope if scope is not None else index.removed
        gone = skip.mask(start, len(scores)) if skip else None
        keep = np.flatnonzero((scores >= min_score) & (True if gone is None else ~gone))
        found_ids.append(keep.astype(np.int64) + start)
        found_scores.append(scores[keep])
    ids = np.concatenate(found_ids) if found_ids else np.empty(0, dtype=np.int64)
    scores = np.concatenate(found_scores) if found_scores else np.empty(0, dtype=np.float32)
    order = np.lexsort((ids, -scores))[:limit]
    return ids[order], scores[order]


def _manifest_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _row(image: str, record: dict[str, Any], score: float | None) -> dict[str, Any]:
    return {"image": image, "caption": record.get("caption") or "", "score": "" if score is None else f"{score:.6f}",
            "id": record["id"], "key": record.get("key") or ""}


def write_manifest(index: VectorIndex, ids: np.ndarray, scores: np.ndarray | None, path: str | Path) -> Path:
    """The images `ids` (with their `scores`, or none) as a manifest CSV of absolute image paths, atomically.
    Images inside tar shards have no path of their own: they are refused here, naming `--copy-to`, which
    extracts them."""
    rows = []
    for record, score in zip(index.metadata(ids), [None] * len(ids) if scores is None else scores.tolist()):
        if not record.get("path"):
            where = f" (in tar shard {record['shard']})" if record.get("shard") else ""
            raise SearchError(f"id {record['id']}: its image has no file of its own{where}; a manifest cannot "
                              "point at it: use --copy-to DIR, which extracts the images")
        rows.append(_row(str(Path(str(record["path"])).resolve()), record, score))
    return atomic_write_text(path, _manifest_text(rows))


def _file_name(rank: int, record: dict[str, Any], mime: str) -> str:
    stem = _UNSAFE.sub("_", str(record.get("key") or record["id"])).strip("._")[:80] or str(record["id"])
    suffix = {"image/jpeg": ".jpg"}.get(mime) or mimetypes.guess_extension(mime) or ".img"
    return f"{rank:06d}_{stem}{suffix}"


def _empty_target(folder: Path, option: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SearchError(f"{option} {folder}: exists and is not an empty folder (nothing is overwritten)")


def shard_matches(index: VectorIndex, ids: np.ndarray, folder: str | Path, per_shard: int = 1000) -> dict[str, Any]:
    """Write the matched images with their captions as WebDataset tar shards (`data.writer.write_shards`:
    images kept as they are where JPEG/PNG/WebP) into `folder`, which appears complete or not at all. Images
    without a caption or that cannot be read are left out and listed, not fatal."""
    from ..data.writer import write_shards

    folder = Path(folder)
    _empty_target(folder, "--shards")
    left_out: list[dict[str, Any]] = []

    def pairs() -> Iterator[tuple[bytes, str]]:
        for record in index.metadata(ids):
            if not record.get("caption"):
                left_out.append({"id": int(record["id"]), "error": "no caption (a training pair needs one)"})
                continue
            try:
                yield index.read_image_bytes(int(record["id"]))[0], str(record["caption"]).replace("\n", " ")
            except SearchError as exc:
                left_out.append({"id": int(record["id"]), "error": str(exc)})

    with atomic_directory(folder) as tmp:
        summary = write_shards(pairs(), tmp, samples_per_shard=per_shard, image_format="keep", on_error="skip")
    left_out.extend({"id": None, "error": f"{name}: not a readable image"} for name in summary.skipped)
    return {"sharded": summary.samples, "shards": len(summary.shards), "unreadable": left_out}


def copy_matches(index: VectorIndex, ids: np.ndarray, scores: np.ndarray, folder: str | Path) -> dict[str, Any]:
    """Copy the matched images (files or tar shard members) into `folder`, ranked by name, with `.txt` caption
    sidecars and `manifest.csv`. The folder must not exist or be empty; it is built under a temporary name
    and appears complete or not at all. Images that cannot be read are listed, not fatal."""
    folder = Path(folder)
    _empty_target(folder, "--copy-to")
    rows: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []
    with atomic_directory(folder) as tmp:
        for rank, (record, score) in enumerate(zip(index.metadata(ids), scores.tolist()), 1):
            try:
                data, mime = index.read_image_bytes(int(record["id"]))
            except SearchError as exc:
                unreadable.append({"id": int(record["id"]), "error": str(exc)})
                continue
            name = _file_name(rank, record, mime)
            (tmp / name).write_bytes(data)
            if record.get("caption"):
                (tmp / name).with_suffix(".txt").write_text(str(record["caption"]), encoding="utf-8")
            rows.append(_row(name, record, score))
        (tmp / "manifest.csv").write_text(_manifest_text(rows), encoding="utf-8")
    return {"copied": len(rows), "unreadable": unreadable}
