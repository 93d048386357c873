"""Searching part of a collection: `under="2019/summer"` keeps the images of one folder (rclip's "search this
directory", a vector database's payload filter on a path).

A folder is named either by the images' **keys** (a relative name such as `2019/summer`: for a folder collection
the key is the file's path inside the folder embedded, for a manifest its path beside the manifest, for shards
the WebDataset key; the API shows keys, so a client can name a folder without learning server paths) or by an
**absolute path** (the files' own paths, or the tar shards' paths). An image lies under a folder when its key (or
path) equals it or continues it after a `/`: `2019` holds `2019/a` and `2019/summer/b`, not `2019-old/c`.

The rows allowed are computed once per set of folders from the metadata parts (pyarrow's string kernels over
whole columns) and cached. A flat index searches through a bitmap selector (exact; faiss skips the other rows). On
IVF-PQ and HNSW a small scope (up to `SCAN_ROWS` rows) is searched by an exact scan of its stored vectors, which
also avoids a graph or inverted-list search finding few of its rows; a larger one goes through the index's own
search with the selector, as removed rows do: HNSW with efSearch widened by 2 / the share of rows kept, IVF-PQ
probing each query's lists until they hold enough of the folder's rows (`ivf_probe.py`; `removed.SCOPE_DEPTH`).
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import SearchError, require
from .ivf_probe import ListCounts, ivf_of, probe_search
from .removed import SCOPE_DEPTH, selector_params

if TYPE_CHECKING:
    from .index import VectorIndex

__all__ = ["SCAN_ROWS", "Scope", "normalize_under"]

# At most this many rows, a scope is scanned exactly (a [q, d] x [d, rows] product per block of its gathered
# float16 vectors, about a flat search of the same rows); above it the faiss index searches through a selector.
SCAN_ROWS = 65_536
CACHED_SCOPES = 32  # distinct `under` sets kept per index (a server sees the same few folders again and again)


def normalize_under(under: str | Sequence[str] | None) -> tuple[str, ...]:
    """The folders of `under` (one, or a list), each without a trailing `/` and `.`/`..` steps, sorted and
    distinct; () for None. SearchError for an empty or non-text folder."""
    if under is None:
        return ()
    values = [under] if isinstance(under, str) else list(under) if isinstance(under, (list, tuple)) else [under]
    folders = set()
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise SearchError(f"under: expected a folder of the collection (a key prefix such as '2019/summer', "
                              f"or an absolute path), got {value!r}")
        text = value.strip()
        folder = posixpath.normpath(text) if text.startswith("/") else posixpath.normpath(text).lstrip("/")
        if folder in ("", ".") or folder.startswith("../") or folder == "..":
            raise SearchError(f"under {value!r}: not a folder inside the collection")
        folders.add(folder)
    return tuple(sorted(folders))


class Scope:
    """The live rows of an index that lie under some folders: a boolean row map over ids, with the interface
    the scanners and faiss take for rows to skip (`mask`, `faiss_params`)."""

    def __init__(self, allowed: np.ndarray, folders: tuple[str, ...]) -> None:
        self.allowed = allowed  # bool [id_end]
        self.folders = folders
        self.ids = np.flatnonzero(allowed).astype(np.int64)  # [len(self)] ascending
        self._bits: np.ndarray | None = None
        self._selector: Any = None
        # the scope's rows per inverted list, per IVF index searched (the images' and the captions' own lists),
        # by the id() of the index object, which its VectorIndex holds as long as this cache lives
        self._lists: dict[int, ListCounts] = {}
        self._without: tuple[np.ndarray, Scope] | None = None

    def without(self, ids: np.ndarray) -> Scope:
        """This scope less the rows `ids` (caption search: less the images without a caption); the last one made
        is kept, as caption searches of one index always pass the same ids."""
        cached = self._without
        if cached is not None and cached[0] is ids:
            return cached[1]
        allowed = self.allowed.copy()
        allowed[ids[ids < allowed.size]] = False
        scope = Scope(allowed, self.folders)
        self._without = (ids, scope)
        return scope

    def __len__(self) -> int:
        return int(self.ids.size)

    def __bool__(self) -> bool:
        return True  # a scope always filters (an empty one was refused when it was made; `without` may be empty)

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, (int, np.integer)) and 0 <= int(id_) < self.allowed.size and bool(self.allowed[id_])

    def mask(self, start: int, rows: int) -> np.ndarray | None:
        """Boolean [rows], True at the ids start..start+rows-1 outside the scope."""
        return ~self.allowed[start:start + rows]

    def selector(self) -> Any:
        """A faiss selector letting the scope's rows through (made once)."""
        if self._selector is None:
            faiss = require("faiss")
            self._bits = np.packbits(self.allowed, bitorder="little")  # faiss reads bit i of byte i // 8
            self._selector = faiss.IDSelectorBitmap(self._bits)  # type: ignore[attr-defined]
        return self._selector

    def faiss_params(self, index: Any) -> Any:
        """faiss SearchParameters keeping the scope's rows only, nprobe / efSearch widened by SCOPE_DEPTH / the
        share of rows kept (`removed.selector_params`) when that share is below 1."""
        kept = len(self) / max(int(index.ntotal), 1)
        return selector_params(index, self.selector(), kept / SCOPE_DEPTH if kept < 1 else 1.0)

    def faiss_search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (scores [n, k], ids [n, k]) among the scope's rows: an IVF index probes each query's lists by
        the scope's rows in them (`ivf_probe`), an HNSW graph searches wider by `faiss_params`."""
        ivf = ivf_of(index)
        if ivf is None:
            return index.search(queries, k, params=self.faiss_params(index))
        lists = self._lists.get(id(index))
        if lists is None:
            lists = self._lists[id(index)] = ListCounts(ivf, self.allowed)
        return probe_search(ivf, lists, self.selector(), queries, k)


def _under_mask(column: Any, folders: Sequence[str]) -> np.ndarray:
    """Boolean [rows]: the column's value equals a folder or starts with folder + '/'."""
    pc = require("pyarrow.compute")
    hit = None
    for folder in folders:
        one = pc.or_(pc.equal(column, folder), pc.starts_with(column, folder + "/"))  # type: ignore[attr-defined]
        hit = one if hit is None else pc.or_(hit, one)  # type: ignore[attr-defined]
    return np.asarray(pc.fill_null(hit, False), dtype=bool)  # type: ignore[attr-defined]


def _file_column(table: Any) -> Any:
    """Each row's file: its path, or its tar shard's path."""
    pc = require("pyarrow.compute")
    names = table.column_names
    path = table.column("path") if "path" in names else None
    shard = table.column("shard") if "shard" in names else None
    if path is None or shard is None:
        return path if path is not None else shard
    return pc.coalesce(path, shard)  # type: ignore[attr-defined]


def build_scope(index: VectorIndex, folders: tuple[str, ...]) -> Scope:
    """The live rows of `index` under `folders` (absolute ones match file paths, the others keys)."""
    by_path = [f for f in folders if f.startswith("/")]
    by_key = [f for f in folders if not f.startswith("/")]
    allowed = np.zeros(index.id_end, dtype=bool)
    start, example = 0, None
    for source in index.sources:
        for part in source.parts:
            table = source.columns(part, ("key", "path", "shard"))
            hit = np.zeros(part.rows, dtype=bool)
            if by_key and "key" in table.column_names:
                hit |= _under_mask(table.column("key"), by_key)
            files = _file_column(table) if by_path else None
            if files is not None:
                hit |= _under_mask(files, by_path)
            allowed[start:start + part.rows] = hit
            if example is None and part.rows:
                example = table.column("key")[0].as_py() if "key" in table.column_names else None
            start += part.rows
    allowed[index.removed.ids] = False
    if not allowed.any():
        shown = ", ".join(folders)
        hint = f" (keys look like {example!r}; absolute paths match the files' paths)" if example else ""
        raise SearchError(f"under {shown}: no image of the index lies under it{hint}")
    return Scope(allowed, folders)


class ScopeCache:
    """Scopes of one opened index by their folders, the most recent `CACHED_SCOPES` kept (thread-safe)."""

    def __init__(self, index: VectorIndex) -> None:
        self._index = index
        self._lock = threading.Lock()
        self._scopes: OrderedDict[tuple[str, ...], Scope] = OrderedDict()

    def get(self, folders: tuple[str, ...]) -> Scope:
        with self._lock:
            scope = self._scopes.get(folders)
            if scope is not None:
                self._scopes.move_to_end(folders)
                return scope
        scope = build_scope(self._index, folders)  # outside the lock: metadata reads take their own
        with self._lock:
            self._scopes[folders] = scope
            while len(self._scopes) > CACHED_SCOPES:
                self._scopes.popitem(last=False)
        return scope
