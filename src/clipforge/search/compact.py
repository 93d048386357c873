"""`clipforge index compact INDEX`: rewrite an index without its removed rows, over one embedding folder.

Every `index sync` leaves its removed rows in the faiss index (skipped at search time) and adds an embedding
folder of its own; a library synced daily for a year carries a year of both. Compaction copies the live rows
(vectors byte for byte as embed stored them, and their metadata) into `INDEX/compact/<digest>/`, builds the
faiss index over them, and the caption index likewise when there is one (IVF-PQ: the trained quantiser and
codebooks are kept, so every code is the one it was; flat and HNSW: built again), re-measures recall, and commits
with one write of index.json. Ids are renumbered
(the live rows in their old order), which is why a search answer's ids are only good for the index version
that gave them. Embedding folders the index no longer uses are removed by the next index command that commits
(a server may still read them until it reloads) if they lie inside the index folder (`synced/`, earlier
`compact/`); folders elsewhere, such as the first `embed` output, are the user's.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SearchError, require
from .index import VectorIndex, index_chunks, open_index
from .parts import EmbeddingSet, open_embeddings, write_manifest, write_part

__all__ = ["compact_index", "index_lock", "prune_unused"]

COMPACT_DIR = "compact"
SYNCED_DIR = "synced"  # where `index sync` embeds new files
OWNED_DIRS = (SYNCED_DIR, COMPACT_DIR)  # embedding folders inside an index folder that index commands write


@contextmanager
def index_lock(index_dir: Path, command: str) -> Iterator[None]:
    """Hold INDEX/.sync.lock: one `index sync` or `index compact` at a time on an index."""
    if not index_dir.is_dir():
        raise SearchError(f"{index_dir}: no such index directory")
    with open(index_dir / ".sync.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(f"index {index_dir}: another `index sync` or `index compact` is running on it "
                              f"(this {command} did nothing)") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune_unused(index_dir: Path, info: dict[str, Any], previous: dict[str, Any]) -> None:
    """Remove the embedding folders under INDEX/synced and INDEX/compact that neither the committed index.json
    (`info`) nor the version before it (`previous`) uses: left by an interrupted command, or replaced by a
    compaction one command ago. The previous version's are kept because a server may still be answering from
    it until it reloads (`serve --reload-interval`), reading their metadata lazily."""
    used = {(index_dir / s["path"]).resolve() for version in (info, previous) for s in version["sources"]}
    for owned in OWNED_DIRS:
        for folder in (index_dir / owned).glob("*"):
            if folder.is_dir() and folder.resolve() not in used:
                shutil.rmtree(folder, ignore_errors=True)


def _live_parts(index: VectorIndex) -> Iterator[tuple[EmbeddingSet, Any, np.ndarray]]:
    """(source, part, row positions inside the part that are live) for every part with a live row."""
    start = 0
    for source in index.sources:
        for part in source.parts:
            gone = index.removed.mask(start, part.rows)
            keep = np.arange(part.rows) if gone is None else np.flatnonzero(~gone)
            if keep.size:
                yield source, part, keep
            start += part.rows


def _copy_live_rows(index: VectorIndex, out: Path, part_size: int) -> EmbeddingSet:
    """The live rows, in id order, as a new embedding folder of parts of `part_size` rows."""
    has_text = index.has_captions
    columns = sorted({name for s in index.sources for p in s.parts for name in s.table(p).column_names})
    img: list[np.ndarray] = []
    text: list[np.ndarray] = []
    meta: dict[str, list[str | None]] = {name: [] for name in columns}
    parts = []

    def flush(count: int) -> None:
        rows_img = np.concatenate(img)
        rows_text = np.concatenate(text) if has_text else None
        parts.append(write_part(out, len(parts), rows_img[:count], None if rows_text is None else rows_text[:count],
                                {name: values[:count] for name, values in meta.items()}))
        img[:] = [rows_img[count:]]
        text[:] = [rows_text[count:]] if rows_text is not None else []
        for name in columns:
            del meta[name][:count]

    for source, part, keep in _live_parts(index):
        img.append(np.asarray(source.vectors(part, "img"))[keep])  # float16, as stored
        if has_text:
            text.append(np.asarray(source.vectors(part, "text"))[keep])
        table = source.table(part)
        for name in columns:
            values = table.column(name).to_pylist() if name in table.column_names else [None] * part.rows
            meta[name].extend(None if values[i] is None else str(values[i]) for i in keep.tolist())
        while len(meta[columns[0]]) >= part_size:
            flush(part_size)
    if meta[columns[0]]:
        flush(len(meta[columns[0]]))
    first = index.sources[0].manifest
    header = {key: first[key] for key in ("fingerprint", "dim", "model", "backend", "precision", "device_type",
                                          "batch_size") if key in first}
    header.update(has_text=has_text, part_size=part_size,
                  source={"kind": "compacted", "from": [str(s.root) for s in index.sources]})
    write_manifest(out, parts, header)
    return open_embeddings(out)


def _refill(old: Any, kind: str, factory: str, compacted: EmbeddingSet, role: str) -> Any:
    """A faiss index like `old` holding the compacted rows' `role` vectors: IVF-PQ keeps its trained lists and
    codebooks (every code stays what it was), flat and HNSW are built again."""
    faiss = require("faiss")
    if kind == "ivfpq":
        rebuilt = faiss.clone_index(old)  # type: ignore[attr-defined]
        rebuilt.reset()
    else:
        rebuilt = faiss.index_factory(compacted.dim, factory, faiss.METRIC_INNER_PRODUCT)  # type: ignore
    for _, vectors in index_chunks([compacted], role):
        rebuilt.add(vectors)
    return rebuilt


def compact_index(index_dir: str | Path, part_size: int = 100_000) -> dict[str, Any] | None:
    """Rewrite the index over its live rows only (see the module docstring); returns the new index.json, or
    None when there is nothing to compact (no removed rows and a single embedding folder)."""
    from .build import BuildOptions, finish

    require("faiss")  # a clear error before any work when faiss is missing
    index_dir = Path(index_dir)
    if part_size < 1:
        raise SearchError(f"--part-size: expected a positive number of rows, got {part_size}")
    with index_lock(index_dir, "compact"):
        index = open_index(index_dir)
        info = index.info
        if not index.removed and len(index.sources) == 1:
            return None
        started = time.perf_counter()
        digest = hashlib.sha256(f"{info['index_file']['sha256']}\0{index.removed.ids.tolist()}\0{part_size}"
                                .encode()).hexdigest()[:16]
        out = index_dir / COMPACT_DIR / digest
        shutil.rmtree(out, ignore_errors=True)  # a copy left half-done by an interrupted compaction
        compacted = _copy_live_rows(index, out, part_size)
        rebuilt = _refill(index.faiss_index, info["kind"], info["build"]["factory"], compacted, "img")
        captions = None
        if index.caption_index is not None:
            captions = _refill(index.caption_index, info["captions"]["kind"], info["captions"]["build"]["factory"],
                               compacted, "text")
        opts = BuildOptions(**{k: v for k, v in info["build"].get("options", {}).items()
                               if k in BuildOptions.__dataclass_fields__})
        before = {"rows": int(index.faiss_index.ntotal), "removed": len(index.removed), "sources": len(index.sources)}
        info = {k: v for k, v in info.items() if k not in ("embeddings_dir", "removed")}
        info["compacted"] = {**before, "at": time.time(), "seconds": round(time.perf_counter() - started, 3)}
        previous = index.info
        info = finish(index_dir, rebuilt, [compacted], info, opts, captions=captions)
        prune_unused(index_dir, info, previous)
        return info
