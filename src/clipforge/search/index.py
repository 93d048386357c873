"""Reading a built index: `open_index(dir)` -> `VectorIndex` (search, metadata, vectors, image bytes by id).

    INDEX/index.json    kind, faiss factory string, build and search parameters, measured 10-recall@10 per
                        query modality, the no-good-match threshold, model fingerprint and spec, dim, rows,
                        the embedding directories it covers (ids count through them in order), the ids
                        removed since (`removed`, see removed.py) and the size and sha256 of index.faiss
    INDEX/index-<sha256 prefix>.faiss  the faiss index (inner product on L2-normalised vectors = cosine);
                        named by its hash so that `index add` writes a new file and switches index.json to it
                        atomically, never leaving index.json pointing at a half-written index
    INDEX/captions-<sha256 prefix>.faiss  the same kind of index over the caption vectors, for `modality="text"`
                        (index.json's `captions`: kind, build, search parameters, measured recall, file), built
                        when every row has a caption (without one, caption search scans the stored vectors)

`VectorIndex` is read-only after opening, so any number of threads may search it at once (faiss releases the
GIL and its search is const); metadata parts are read lazily under a lock.
"""

from __future__ import annotations

import json
import mimetypes
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SearchError, require
from .parts import EmbeddingSet, open_embeddings
from .removed import Removed, RowFilter
from .scope import SCAN_ROWS, Scope, ScopeCache, normalize_under

__all__ = ["INDEX_FORMAT", "VectorIndex", "apply_search_params", "index_chunks", "load_index_info", "open_index",
           "search_faiss", "vector_chunks"]

INDEX_FORMAT = "clipforge-index"
INFO_FILE = "index.json"
# faiss's flat search gains nothing from batching queries on these CPUs (4.5-4.9 ms a query at 100k x 128 on one
# AVX2 core, for 1 query or 256), while a matrix product per block of stored rows and a running top-k answers
# 256 queries 3.55x faster (one query: faiss is 2x faster; `bench_search.py --section batch`, AMD EPYC AVX2). So
# flat indices take the block path from FLAT_BATCH_QUERIES queries up (`search --queries`, `search_batch`).
FLAT_BATCH_QUERIES = 8
FLAT_BLOCK_ROWS = 32_768
FLAT_BLOCK_QUERIES = 256  # scores held at once: FLAT_BLOCK_QUERIES x FLAT_BLOCK_ROWS float32 = 32 MiB
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
                (b"BM", "image/bmp"))


def load_index_info(index_dir: Path) -> dict[str, Any]:
    path = index_dir / INFO_FILE
    if not index_dir.is_dir():
        raise SearchError(f"{index_dir}: no such index directory")
    if not path.is_file():
        raise SearchError(f"{path}: missing (is {index_dir} a `clipforge index build` output?)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SearchError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise SearchError(f"{path}: not a clipforge index (format != {INDEX_FORMAT!r})")
    for key in ("kind", "dim", "rows", "fingerprint", "sources", "index_file"):
        if key not in info:
            raise SearchError(f"{path}: missing key {key!r}")
    return info


def read_faiss(path: Path, expected_bytes: int, mmap: bool = False) -> Any:
    """faiss.read_index with size check first (a truncated file is named, not a C++ exception)."""
    faiss = require("faiss")
    if not path.is_file():
        raise SearchError(f"{path}: index file is missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise SearchError(f"{path}: {size} bytes, index.json says {expected_bytes} (truncated or replaced)")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0  # type: ignore[attr-defined]
    try:
        return faiss.read_index(str(path), flags)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise SearchError(f"{path}: corrupt index file ({first[:160]})") from None


def apply_search_params(index: Any, params: dict[str, Any]) -> None:
    """Set nprobe (IVF) / efSearch (HNSW) on a faiss index, looking through pre-transforms (OPQ)."""
    faiss = require("faiss")
    inner = index
    if isinstance(inner, faiss.IndexPreTransform):  # type: ignore[attr-defined]
        inner = faiss.downcast_index(inner.index)  # type: ignore[attr-defined]
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])  # type: ignore[attr-defined]
    if "efSearch" in params:  # (a "rerank" entry is ours, applied by `search_faiss`)
        faiss.downcast_index(inner).hnsw.efSearch = int(params["efSearch"])  # type: ignore[attr-defined]


def stored_rows(sources: Sequence[EmbeddingSet], ids: np.ndarray, role: str = "img") -> np.ndarray:
    """float32 vectors [m, dim] of global ids [m] (all valid), read from the embedding parts."""
    offsets = np.cumsum([0] + [len(s) for s in sources]).astype(np.int64)  # [sources + 1]
    out = np.empty((len(ids), sources[0].dim), dtype=np.float32)
    which = np.searchsorted(offsets, ids, side="right") - 1  # [m] source of each id
    for index in np.unique(which):
        mask = which == index
        out[mask] = sources[index].rows(ids[mask] - offsets[index], role)
    return out


def vector_chunks(sources: Sequence[EmbeddingSet], role: str = "img") -> Iterator[tuple[int, np.ndarray]]:
    """(first global id, float32 vectors [rows, dim]) of every part, in id order: one part in memory at a time."""
    start = 0
    for embeddings in sources:
        for part in embeddings.parts:
            yield start, np.asarray(embeddings.vectors(part, role), dtype=np.float32)
            start += part.rows


def index_chunks(sources: Sequence[EmbeddingSet], role: str = "img") -> Iterator[tuple[int, np.ndarray]]:
    """What a faiss index of `role` holds, as `vector_chunks`: for captions ("text"), an image without one holds its
    image vector in place of its zero caption vector. Zero rows score 0 against every query, alike, and an HNSW
    graph search over a caption index holding many of them got stuck among them (1 of 10 places filled for some
    queries, 30% of 12k rows uncaptioned); caption search skips those rows either way (`caption_skip`)."""
    if role != "text":
        yield from vector_chunks(sources, role)
        return
    for (start, text), (_, img) in zip(vector_chunks(sources, "text"), vector_chunks(sources, "img")):
        missing = ~text.any(axis=1)  # [rows]
        yield start, np.where(missing[:, None], img, text) if missing.any() else text  # a copy: parts are read-only


def uncaptioned_ids(sources: Sequence[EmbeddingSet]) -> np.ndarray:
    """Ascending global ids of the rows whose image has no caption (a zero caption vector)."""
    offsets = np.cumsum([0] + [len(s) for s in sources]).astype(np.int64)  # [sources + 1]
    found = [s.uncaptioned_rows() + offsets[i] for i, s in enumerate(sources)]
    return np.concatenate(found).astype(np.int64) if found else np.empty(0, dtype=np.int64)


def caption_skip(sources: Sequence[EmbeddingSet], removed: Removed | None, total: int) -> Removed | None:
    """The rows a caption search skips: those `removed`, and images without a caption (their zero vectors would
    otherwise answer with score 0 above every negative one)."""
    missing = uncaptioned_ids(sources)
    if not missing.size:
        return removed
    gone = np.union1d(removed.ids, missing) if removed else missing
    return Removed(gone, total, "caption search", widen=True)


def flat_vectors(faiss_index: Any) -> np.ndarray | None:
    """The stored float32 vectors [ntotal, d] of an inner-product IndexFlat, as a view (no copy); else None."""
    faiss = require("faiss")
    flat = faiss.downcast_index(faiss_index)
    if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_INNER_PRODUCT or flat.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def pad_to_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Answers [n, < k] padded to k columns with (-inf, -1), as faiss pads past the end of an index."""
    if ids.shape[1] >= k:
        return scores, ids
    pad = ((0, 0), (0, k - ids.shape[1]))
    return np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)


def topk_scan(chunks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int,
              skip: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of `queries` [n, d] against stored rows given as (first id, vectors [rows, d])
    chunks, one chunk in memory at a time: scores [n, k] float32 and ids [n, k] int64, best first, padded with
    (-inf, -1) past the rows as faiss pads; rows that `skip` masks (removed ones, or those outside a scope) never
    answer. A matrix product per block of rows, then a running top-k."""
    import torch

    blocks = [torch.from_numpy(np.ascontiguousarray(queries[q0:q0 + FLAT_BLOCK_QUERIES], dtype=np.float32))
              for q0 in range(0, queries.shape[0], FLAT_BLOCK_QUERIES)]  # each [b, d]
    best = [(torch.full((len(b), 0), float("-inf")), torch.zeros((len(b), 0), dtype=torch.int64)) for b in blocks]
    for start, vectors in chunks:
        stored = torch.from_numpy(vectors)
        for r0 in range(0, vectors.shape[0], FLAT_BLOCK_ROWS):
            rows = stored[r0:r0 + FLAT_BLOCK_ROWS]
            gone = skip.mask(start + r0, len(rows)) if skip else None
            for j, block in enumerate(blocks):
                scores = block @ rows.T  # [b, rows in block]
                if gone is not None:
                    scores[:, torch.from_numpy(gone)] = float("-inf")
                top_s, top_i = torch.topk(scores, min(k, len(rows)), dim=1)
                merged_s = torch.cat([best[j][0], top_s], 1)
                merged_i = torch.cat([best[j][1], top_i + start + r0], 1)
                kept_s, order = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
                best[j] = (kept_s, torch.gather(merged_i, 1, order))
    scores = np.concatenate([s.numpy() for s, _ in best]).astype(np.float32)
    ids = np.concatenate([i.numpy() for _, i in best]).astype(np.int64)
    ids[scores == -np.inf] = -1  # masked rows that filled a place for want of live ones
    return pad_to_k(scores, ids, k)


def search_faiss(faiss_index: Any, sources: Sequence[EmbeddingSet], queries: np.ndarray, k: int,
                 rerank: int = 0, skip: RowFilter | None = None, role: str = "img") -> tuple[np.ndarray, np.ndarray]:
    """faiss top-k; with `rerank` > 1, the top k x rerank candidates rescored exactly with the stored vectors
    (those of `role`: "img", or "text" for a caption index).
    Rows `skip` names (removed ids, rows outside a scope) are skipped by faiss itself (a search-time selector),
    so k of the other rows still come back.

    Product-quantised scores are estimates: rescoring the candidates with the float16 vectors that embed
    wrote (memory-mapped, so they cost disk rather than RAM) restores both the ranking and exact cosines.
    """
    if rerank <= 1:
        stored = flat_vectors(faiss_index) if queries.shape[0] >= FLAT_BATCH_QUERIES else None
        if stored is not None:
            return topk_scan([(0, stored)], queries, k, skip)
        scores, ids = skip.faiss_search(faiss_index, queries, k) if skip else faiss_index.search(queries, k)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)
    n, fetch = queries.shape[0], min(k * rerank, max(k, int(faiss_index.ntotal)))
    _, candidates = (skip.faiss_search(faiss_index, queries, fetch) if skip
                     else faiss_index.search(queries, fetch))  # [n, fetch]
    flat = candidates.reshape(-1)
    vectors = np.zeros((flat.shape[0], queries.shape[1]), dtype=np.float32)
    vectors[flat >= 0] = stored_rows(sources, flat[flat >= 0], role)
    exact = np.einsum("nfd,nd->nf", vectors.reshape(n, fetch, -1), queries)  # [n, fetch]
    exact[candidates < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
    ids = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    return pad_to_k(scores, ids, k)  # fewer candidates than k


def scan_rows(sources: Sequence[EmbeddingSet], ids: np.ndarray, queries: np.ndarray, k: int,
              role: str = "img") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries` [n, d] over the stored vectors of `ids` [m] only (gathered a block at a time):
    scores [n, k], ids [n, k], padded with (-inf, -1) as `topk_scan` pads."""
    blocks = ((p0, stored_rows(sources, ids[p0:p0 + FLAT_BLOCK_ROWS], role))
              for p0 in range(0, len(ids), FLAT_BLOCK_ROWS))  # (first position in `ids`, vectors [b, d])
    scores, positions = topk_scan(blocks, queries, k)
    return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)


class VectorIndex:
    """A built index opened for search. `info` is the parsed index.json (with `embeddings_dir` resolved).
    Ids count every row ever added; `removed` ones (index sync) are left out of every answer and `len()`."""

    def __init__(self, index_dir: Path, info: dict[str, Any], faiss_index: Any, sources: list[EmbeddingSet],
                 caption_index: Any = None) -> None:
        self.index_dir = index_dir
        self.info = info
        self.fingerprint: dict[str, Any] = info["fingerprint"]
        self.dim = int(info["dim"])
        self.faiss_index = faiss_index
        self.sources = sources
        self.rerank = int(info.get("search", {}).get("rerank", 0))
        self.caption_index = caption_index  # faiss index of the caption vectors (same ids), or None: exact scans
        self._caption_flat = caption_index is not None and flat_vectors(caption_index) is not None
        self.caption_rerank = int(info.get("captions", {}).get("search", {}).get("rerank", 0))
        self._offsets = np.cumsum([0] + [len(s) for s in sources]).astype(np.int64)  # [sources + 1]
        self.removed = Removed(info.get("removed", []), int(self._offsets[-1]), str(index_dir / INFO_FILE))
        self._caption_skip: Removed | None = None  # made on the first caption search
        self._tar_lock = threading.Lock()
        self._tar_members: dict[str, dict[str, tuple[int, int]]] = {}
        self._scopes = ScopeCache(self)
        # faiss's flat scan skips the rows a selector leaves out, exactly and faster than gathering them (0.5-0.9
        # ms vs 3.8 ms for 10k of 200k x 64 rows, one AMD EPYC core), so only IVF and HNSW scan small scopes
        self._flat = flat_vectors(faiss_index) is not None or int(faiss_index.ntotal) == 0

    def __len__(self) -> int:
        """The rows a search can return (those added, less those removed)."""
        return int(self.faiss_index.ntotal) - len(self.removed)

    @property
    def id_end(self) -> int:
        """One past the largest id (ids count every row added, removed ones included)."""
        return int(self._offsets[-1])

    def scope(self, under: str | Sequence[str] | None) -> Scope | None:
        """The live rows under the folders `under` names (`scope.py`; cached), or None for the whole index."""
        folders = normalize_under(under)
        return self._scopes.get(folders) if folders else None

    def search(self, queries: np.ndarray, k: int, scope: Scope | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores [n, k] float32 and ids [n, k] int64 (id -1, score -inf past the end);
        with a `scope`, among its rows only."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(f"queries: expected shape [n, {self.dim}], got {list(queries.shape)}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k: expected a positive integer, got {k!r}")
        if not np.all(np.isfinite(queries)):
            raise SearchError("queries: contain NaN or infinite values")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if scope is not None and len(scope) <= SCAN_ROWS and not self._flat:
            return scan_rows(self.sources, scope.ids, queries, int(k))
        return search_faiss(self.faiss_index, self.sources, queries, int(k), self.rerank, scope or self.removed)

    @property
    def has_captions(self) -> bool:
        """Whether every embedding folder holds caption vectors (`embed` of a collection where some image has a
        caption; the images without one are skipped by caption search)."""
        return all(source.has_text for source in self.sources)

    def caption_skip(self) -> Removed:
        """The rows caption search skips: removed ones and images without a caption (computed once)."""
        if self._caption_skip is None:
            self._caption_skip = caption_skip(self.sources, self.removed, self.id_end) or self.removed
        return self._caption_skip

    def search_captions(self, queries: np.ndarray, k: int,
                        scope: Scope | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k stored caption vectors by inner product: scores [n, k], ids [n, k] (the id of the caption's
        image). Through the caption index when there is one (`captions-*.faiss`, tuned as the image index is),
        else by an exact scan of the embedding parts (one part in memory at a time, as float32); a small scope
        is scanned exactly unless the caption index is flat, as `search` does."""
        if not self.has_captions:
            raise SearchError(f"index {self.index_dir}: its embeddings hold no caption vectors (the collection "
                              "was embedded without captions), so there are no captions to search")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        skip = self.caption_skip()
        if scope is not None and skip is not self.removed:
            scope = scope.without(skip.ids)  # its images that have a caption
        if scope is not None and len(scope) <= SCAN_ROWS and not self._caption_flat:  # flat: a bitmap skips rows
            return scan_rows(self.sources, scope.ids, queries, k, "text")
        if self.caption_index is not None:
            return search_faiss(self.caption_index, self.sources, queries, int(k), self.caption_rerank,
                                scope or skip, role="text")
        return topk_scan(vector_chunks(self.sources, "text"), queries, k, scope or skip)

    def _locate(self, id_: int) -> tuple[EmbeddingSet, int]:
        if not isinstance(id_, (int, np.integer)) or not 0 <= int(id_) < int(self._offsets[-1]):
            raise SearchError(f"id {id_!r} does not exist (the index has ids 0..{int(self._offsets[-1]) - 1})")
        if id_ in self.removed:
            raise SearchError(f"id {id_} was removed from the index (its file left or changed: index sync)")
        source = int(np.searchsorted(self._offsets, int(id_), side="right")) - 1
        return self.sources[source], int(id_) - int(self._offsets[source])

    def metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """For each id: {id, key, caption (or None), path | shard + member, extra columns}."""
        out = []
        for id_ in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            source, row = self._locate(id_)
            record = source.row_metadata(row)
            record.setdefault("caption", None)
            record["id"] = id_
            out.append(record)
        return out

    def image_vector(self, id_: int) -> np.ndarray:
        """The stored (L2-normalised) image embedding of `id_` as float32 [dim]."""
        self._locate(id_)
        return stored_rows(self.sources, np.array([int(id_)], dtype=np.int64))[0]

    def image_vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored image embeddings of valid ids as float32 [len(ids), dim]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= int(self._offsets[-1])):
            raise SearchError(f"ids: expected 0..{int(self._offsets[-1]) - 1}, got {int(ids.min())}..{int(ids.max())}")
        gone = ids[np.isin(ids, self.removed.ids)]
        if gone.size:
            raise SearchError(f"ids {gone[:5].tolist()} were removed from the index (index sync)")
        return stored_rows(self.sources, ids) if ids.size else np.empty((0, self.dim), dtype=np.float32)

    def _tar_member(self, shard: str, member: str) -> tuple[int, int]:
        with self._tar_lock:
            members = self._tar_members.get(shard)
            if members is None:
                try:
                    with tarfile.open(shard, "r:") as tar:
                        members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
                except (OSError, tarfile.TarError) as exc:
                    raise SearchError(f"{shard}: unreadable tar shard ({exc})") from None
                self._tar_members[shard] = members
        if member not in members:
            raise SearchError(f"{shard}: no member {member!r}")
        return members[member]

    def read_image_bytes(self, id_: int) -> tuple[bytes, str]:
        """The image file of `id_` (from the metadata only: a file path or a tar shard member) and its MIME type."""
        record = self.metadata([id_])[0]
        try:
            if record.get("path"):
                name = str(record["path"])
                data = Path(name).read_bytes()
            elif record.get("shard") and record.get("member"):
                name = str(record["member"])
                offset, size = self._tar_member(str(record["shard"]), name)
                with open(record["shard"], "rb") as handle:
                    handle.seek(offset)
                    data = handle.read(size)
            else:
                raise SearchError(f"id {id_}: its metadata names no image file")
        except OSError as exc:
            raise SearchError(f"id {id_}: image unreadable ({exc.strerror or exc})") from None
        return data, _mime(name, data)


def _mime(name: str, data: bytes) -> str:
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def resolve_source(index_dir: Path, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else (index_dir / path).resolve()


def open_index(index_dir: str | Path, mmap: bool = False) -> VectorIndex:
    """Open a built index for search. `mmap` memory-maps IVF indices instead of reading them into RAM."""
    index_dir = Path(index_dir)
    info = load_index_info(index_dir)
    sources = []
    for entry in info["sources"]:
        embeddings = open_embeddings(resolve_source(index_dir, entry["path"]))
        if len(embeddings) != int(entry["rows"]):
            raise SearchError(f"{embeddings.root}: {len(embeddings)} rows, index.json expects {entry['rows']}")
        sources.append(embeddings)
    info["embeddings_dir"] = str(sources[0].root) if sources else None
    faiss_index = _load_faiss(index_dir, info, info["index_file"], info.get("search", {}), "vectors", mmap)
    return VectorIndex(index_dir, info, faiss_index, sources, open_caption_index(index_dir, info, mmap))


def _load_faiss(index_dir: Path, info: dict[str, Any], entry: dict[str, Any], search: dict[str, Any], what: str,
                mmap: bool) -> Any:
    """The faiss file index.json's `entry` names, checked against its rows x dim, its search parameters set."""
    path = index_dir / str(entry["name"])
    index = read_faiss(path, int(entry["bytes"]), mmap)
    if index.d != int(info["dim"]) or index.ntotal != int(info["rows"]):
        raise SearchError(f"{path}: {index.ntotal} x {index.d} {what}, index.json says {info['rows']} x {info['dim']}")
    apply_search_params(index, search)
    return index


def open_caption_index(index_dir: Path, info: dict[str, Any], mmap: bool = False) -> Any:
    """The caption index index.json's `captions` names (read, checked, its search parameters set), or None."""
    captions = info.get("captions")
    if not captions:
        return None
    if not isinstance(captions, dict) or not isinstance(captions.get("index_file"), dict):
        raise SearchError(f"{index_dir / INFO_FILE}: 'captions' must be an object with an 'index_file'")
    return _load_faiss(index_dir, info, captions["index_file"], captions.get("search", {}), "caption vectors", mmap)

