"""Rows deleted from a built index without rebuilding it (tombstones), as `clipforge index sync` records them.

faiss's flat index renumbers the rows left after `remove_ids` and its HNSW cannot remove at all, while our ids
are row numbers of the embedding folders (metadata, stored vectors, image files all hang off them). So a
removal is a sorted list of ids in index.json (`removed`, written with the index file it applies to), and every
reader leaves those rows out: faiss searches through an `IDSelectorNot(IDSelectorBatch)` (flat, IVF and HNSW
all honour it), exact scans mask them, and asking for a removed id by number is an error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from .errors import SearchError, require

__all__ = ["SCOPE_DEPTH", "Removed", "RowFilter", "selector_params"]

# A folder searched through a selector looks at this many times as many of its own rows as the search tuned for
# all rows looks at: its best rows lie further from the query than the whole index's, where an IVF centroid order
# or an HNSW graph says less about them (benchmarks/bench_scope.py: folders of whole clusters fall 0.04-0.07
# short of the whole index's recall@10 at once the rows; at twice, they reach it).
SCOPE_DEPTH = 2


class RowFilter(Protocol):
    """Rows a search skips (`Removed`, or everything outside a `scope.Scope`): what scanners and faiss take."""

    def __bool__(self) -> bool: ...

    def mask(self, start: int, rows: int) -> np.ndarray | None:
        """Boolean [rows], True at the skipped ids among start..start+rows-1; None when none is skipped."""
        ...

    def faiss_params(self, index: Any) -> Any:
        """faiss SearchParameters that skip those rows, or None when none is skipped."""
        ...

    def faiss_search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (scores [n, k], ids [n, k]) for float32 `queries` [n, d], skipping those rows."""
        ...


MAX_EF_SEARCH = 4096  # the widest HNSW search a selector may ask for


def selector_params(index: Any, selector: Any, kept: float = 1.0) -> Any:
    """faiss SearchParameters with `selector` and the index's own nprobe / efSearch (a parameters object replaces
    them for the call; their defaults would be 1 and 16), both widened by 1 / `kept`, the fraction of rows the
    selector lets through: a graph or inverted-list search tuned for all rows finds about `kept` as many of the
    rows it may return (HNSW, 200k clustered rows, a scattered 1% of them: recall@10 0.24 with 66% of the places
    filled as tuned, 0.93 and all filled with efSearch x 100; IVF-PQ 0.32 -> 0.73 with nprobe x 100)."""
    faiss = require("faiss")
    inner = faiss.downcast_index(index)  # type: ignore[attr-defined]
    if isinstance(inner, faiss.IndexPreTransform):  # type: ignore[attr-defined]
        inner = faiss.downcast_index(inner.index)  # type: ignore[attr-defined]
    widen = 1.0 / min(1.0, max(kept, 1e-6))
    if isinstance(inner, faiss.IndexIVF):  # type: ignore[attr-defined]
        nprobe = min(math.ceil(inner.nprobe * widen), inner.nlist)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[attr-defined]
    if isinstance(inner, faiss.IndexHNSW):  # type: ignore[attr-defined]
        ef = max(inner.hnsw.efSearch, min(math.ceil(inner.hnsw.efSearch * widen), MAX_EF_SEARCH))
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)  # type: ignore[attr-defined]
    return faiss.SearchParameters(sel=selector)  # type: ignore[attr-defined]


class Removed:
    """A set of removed ids over an index of `total` rows: membership, per-chunk masks, faiss parameters."""

    def __init__(self, ids: Iterable[int] | np.ndarray, total: int, where: str = "index.json",
                 widen: bool = False) -> None:
        array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if array.size and (array.dtype.kind not in "iu" or array.ndim != 1):
            raise SearchError(f"{where}: 'removed' must be a list of integer ids")
        self.ids = np.unique(array.astype(np.int64)) if array.size else np.empty(0, dtype=np.int64)  # sorted
        if self.ids.size and (self.ids[0] < 0 or self.ids[-1] >= total):
            raise SearchError(f"{where}: 'removed' holds ids outside 0..{total - 1}")
        self.total = int(total)
        self.widen = widen  # a large share skipped (images without captions): search wider, as a scope does
        self._selector: Any = None
        self._batch: Any = None  # the IDSelectorNot only points at it: kept alive here

    def __len__(self) -> int:
        return int(self.ids.size)

    def __bool__(self) -> bool:
        return bool(self.ids.size)

    def __contains__(self, id_: object) -> bool:
        if not isinstance(id_, (int, np.integer)) or not self.ids.size:
            return False
        at = int(np.searchsorted(self.ids, int(id_)))
        return at < self.ids.size and int(self.ids[at]) == int(id_)

    def live(self) -> np.ndarray:
        """The ids not removed, ascending [total - len(self)]."""
        keep = np.ones(self.total, dtype=bool)
        keep[self.ids] = False
        return np.flatnonzero(keep).astype(np.int64)

    def mask(self, start: int, rows: int) -> np.ndarray | None:
        """Boolean [rows], True at the removed ids among start..start+rows-1; None when there are none."""
        lo, hi = np.searchsorted(self.ids, [start, start + rows])
        if lo == hi:
            return None
        out = np.zeros(rows, dtype=bool)
        out[self.ids[lo:hi] - start] = True
        return out

    def faiss_params(self, index: Any) -> Any:
        """faiss SearchParameters that skip the removed ids (`selector_params`); None when there are none."""
        if not self.ids.size:
            return None
        faiss = require("faiss")
        if self._selector is None:
            self._batch = faiss.IDSelectorBatch(self.ids)  # type: ignore[attr-defined]
            self._selector = faiss.IDSelectorNot(self._batch)  # type: ignore[attr-defined]
        # not widened: removals are a small share whose effect the measured recall already includes (index sync
        # re-measures past 5% of changes), and compaction must then answer exactly as before it
        kept = 1.0 - self.ids.size / max(self.total, 1) if self.widen else 1.0
        return selector_params(index, self._selector, kept)

    def faiss_search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (scores [n, k], ids [n, k]) for float32 `queries` [n, d], the removed rows skipped."""
        return index.search(queries, k, params=self.faiss_params(index))
