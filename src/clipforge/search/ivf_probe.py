"""Probing an IVF index for the rows of a folder: lists until they hold twice the rows the tuned search scans.

An IVF search tuned for the whole index (its `nprobe` lists nearest the query) reaches its recall by scanning
the rows of those lists. Through a selector that keeps only a folder, the same lists hold fewer of the rows it
may return: `share` as many for a folder scattered over the collection, and often none at all for a folder of a
few subjects (a trip, an event) far from the query. A fixed widening (nprobe / share, `removed.selector_params`)
covers the first case only. So each query here probes its lists nearest first until the folder's rows in them
reach `SCOPE_DEPTH` times the rows its tuned probe would have scanned, and skips the lists that hold none of
them: faiss's `search_preassigned` with a coarse assignment made here, in which -1 ends a query's lists.

Why twice the rows: a folder's nearest rows lie further from the query than the whole index's, where the order of
the centroids says less about which list holds them. On 200,000 clustered rows (benchmarks/bench_scope.py, IVF-PQ
tuned to 0.93 recall@10 on these queries), folders of whole clusters holding 20% / 50% of the rows reach 0.88 /
0.88 at once the rows, 0.93 / 0.93 at twice, 0.96 / 0.96 at four times (scattered folders 0.98-0.99 at twice),
each under a millisecond a query.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import require
from .removed import SCOPE_DEPTH

__all__ = ["ListCounts", "ivf_of", "probe_search"]

ORDER_ENTRIES = 1 << 22  # (query, list) pairs ordered at once: 48 MB of scores, list numbers and plan


def ivf_of(index: Any) -> Any:
    """The index as a faiss IndexIVF when it is one (what `index build` makes as IVF-PQ), else None."""
    faiss = require("faiss")
    inner = faiss.downcast_index(index)  # type: ignore[attr-defined]
    return inner if isinstance(inner, faiss.IndexIVF) else None  # type: ignore[attr-defined]


class ListCounts:
    """Rows per inverted list of an IVF index: all of them, and those a boolean row map `allowed` keeps."""

    def __init__(self, ivf: Any, allowed: np.ndarray) -> None:
        faiss = require("faiss")
        invlists = ivf.invlists
        self.sizes = np.zeros(ivf.nlist, dtype=np.int64)  # [nlist]
        self.kept = np.zeros(ivf.nlist, dtype=np.int64)  # [nlist]
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if not size:
                continue
            pointer = invlists.get_ids(lst)
            ids = faiss.rev_swig_ptr(pointer, size)  # type: ignore[attr-defined]  # a view of faiss's memory
            self.sizes[lst] = size
            self.kept[lst] = int(np.count_nonzero(allowed[ids]))
            invlists.release_ids(lst, pointer)


def probe_plan(counts: ListCounts, order: np.ndarray, nprobe: int, depth: float = SCOPE_DEPTH) -> np.ndarray:
    """The coarse assignment [n, width] for lists `order` [n, nlist] (nearest first): each query's lists up to the
    one at which the kept rows reach `depth` x the rows of its first `nprobe` lists, those holding no kept row
    as -1."""
    scanned = depth * counts.sizes[order[:, :nprobe]].sum(axis=1)  # [n] rows the tuned search scans, x depth
    kept = counts.kept[order]  # [n, nlist]
    reached = np.cumsum(kept, axis=1) >= scanned[:, None]
    # the first list at which the kept rows reach the target; all lists when they never do
    last = np.where(reached.any(axis=1), reached.argmax(axis=1), order.shape[1] - 1)  # [n]
    width = int(last.max()) + 1
    plan = order[:, :width].copy()
    beyond = np.arange(width)[None, :] > last[:, None]  # [n, width]
    plan[beyond | (kept[:, :width] == 0)] = -1
    return plan


def probe_search(ivf: Any, counts: ListCounts, selector: Any, queries: np.ndarray, k: int) -> tuple:
    """(scores [n, k], ids [n, k]) of an IVF search of float32 `queries` [n, d] through `selector`, each query
    probing lists by `probe_plan` (faiss pads with id -1 where fewer than k rows were found)."""
    # every query orders all lists: a block of queries at a time keeps that [block, nlist] order small
    block = max(1, ORDER_ENTRIES // ivf.nlist)
    parts = [_probe_block(ivf, counts, selector, queries[i:i + block], k) for i in range(0, len(queries), block)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _probe_block(ivf: Any, counts: ListCounts, selector: Any, queries: np.ndarray, k: int) -> tuple:
    faiss = require("faiss")
    n = queries.shape[0]
    centroid_scores, order = ivf.quantizer.search(queries, ivf.nlist)  # [n, nlist] each, nearest first
    plan = probe_plan(counts, order, ivf.nprobe, SCOPE_DEPTH)
    width = plan.shape[1]
    centroid_scores = np.ascontiguousarray(centroid_scores[:, :width], dtype=np.float32)
    plan = np.ascontiguousarray(plan, dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    params = faiss.SearchParametersIVF(sel=selector, nprobe=width)  # type: ignore[attr-defined]
    # the C++ entry point: faiss's Python wrapper of search_preassigned takes no parameters (no selector)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(plan),  # type: ignore[attr-defined]
                             faiss.swig_ptr(centroid_scores), faiss.swig_ptr(scores), faiss.swig_ptr(ids),
                             False, params)
    return scores, ids
