"""Searching under a folder on IVF-PQ and HNSW indices: recall@10 and time of each way to search a folder's rows.

`--rows` clustered unit vectors (`--dim`, `--clusters` centres; the search tests' generator, with each row's
cluster kept) are embedded as a collection and indexed as a user would (`index build --kind ivfpq|hnsw`, tuned
to the default target recall on held-out queries). Queries are the caption vectors of `--queries` further rows,
which the index never saw. A folder keeps a share of the rows (`--shares`), laid out two ways:
- scattered: rows drawn at random, unrelated to what they show (the hard case for a filtered IVF / HNSW
  search: the folder's rows are spread thinly over every inverted list and every region of the graph);
- topical: whole clusters, as a trip or an event folder holds photos of a few subjects (the folder's rows sit
  together in a few lists / regions of the graph).
Each folder is searched each way `clipforge.search.index` has had: the exact scan of its stored vectors (what a
folder of up to SCAN_ROWS rows takes: `taken` in the report says which way the index takes for that folder), the
index through a bitmap selector with the index's tuned nprobe / efSearch (`tuned`), the same widened by 1 / share
(`widened`), and the way a larger folder takes now (`scoped`, `Scope.faiss_search`): HNSW widened by
SCOPE_DEPTH / share, IVF-PQ probing each query's lists until they hold SCOPE_DEPTH times as many of the folder's
rows as its tuned probe scans of all rows (`search/ivf_probe.py`). Printed per kind, layout and share: recall@10
against the exact top 10 of the folder's rows (float64 over the stored vectors), the share of the 10 places
filled, and milliseconds per query (median of `--rounds` batches of all the queries).

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_scope.py --threads 1 \\
        --output docs/benchmarks/scope.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import finish_report, hardware_note
from search_helpers import embedding_folder, unit

from clipforge.search.build import BuildOptions, build_index
from clipforge.search.index import (
    VectorIndex,
    open_index,
    scan_rows,
    search_faiss,
    vector_chunks,
)
from clipforge.search.removed import selector_params
from clipforge.search.scope import SCAN_ROWS, Scope

K = 10


class TunedScope(Scope):
    """A scope whose faiss search keeps the index's tuned nprobe / efSearch (no widening): the baseline."""

    def faiss_search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(queries, k, params=selector_params(index, self.selector(), 1.0))


class WidenedScope(Scope):
    """A scope whose faiss search widens nprobe / efSearch by 1 / share for every query (before SCOPE_DEPTH and
    ivf_probe)."""

    def faiss_search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kept = len(self) / int(index.ntotal)
        return index.search(queries, k, params=selector_params(index, self.selector(), kept))


def clustered_rows(rng: np.random.Generator, n: int, dim: int, clusters: int) -> tuple[np.ndarray, ...]:
    """(img, text, cluster) for n rows: unit image vectors around `clusters` centres, captions near their image
    shifted by a common offset (the modality gap), as tests/search_helpers.clustered draws them."""
    centres = unit(rng.standard_normal((clusters, dim)))
    label = rng.integers(0, clusters, n)
    img = unit(centres[label] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)
    gap = unit(rng.standard_normal((1, dim)))
    text = unit(img + 0.6 * gap + 0.25 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)
    return img.astype(np.float32), text.astype(np.float32), label


def folder_rows(layout: str, share: float, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean [rows]: a folder holding `share` of the rows, scattered or made of whole clusters (the last one
    cut to hit the share)."""
    rows, want = labels.size, max(1, round(share * labels.size))
    allowed = np.zeros(rows, dtype=bool)
    if layout == "scattered":
        allowed[rng.choice(rows, want, replace=False)] = True
        return allowed
    for cluster in rng.permutation(int(labels.max()) + 1):
        members = np.flatnonzero(labels == cluster)[: want - int(allowed.sum())]
        allowed[members] = True
        if allowed.sum() >= want:
            break
    return allowed


def exact_top(stored: np.ndarray, allowed: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    """The ids of each query's exact top K among the allowed rows (float64 over the stored vectors)."""
    ids = np.flatnonzero(allowed)
    scores = queries.astype(np.float64) @ stored[ids].T  # [q, rows in the folder]
    best = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return [set(ids[row].tolist()) for row in best]


def measure(index: VectorIndex, way: str, scope: Scope, queries: np.ndarray, rounds: int) -> tuple[np.ndarray, float]:
    """(ids [q, K] of the last round, median seconds per query) of one way of searching the scope."""
    def run() -> np.ndarray:
        if way == "scan":
            return scan_rows(index.sources, scope.ids, queries, K)[1]
        return search_faiss(index.faiss_index, index.sources, queries, K, index.rerank, scope)[1]

    run()  # warm-up: the selector's bitmap, first touches of the stored vectors
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        ids = run()
        seconds.append((time.perf_counter() - start) / len(queries))
    return ids, statistics.median(seconds)


def score(ids: np.ndarray, truth: list[set[int]], allowed: np.ndarray) -> tuple[float, float]:
    """(recall@K, share of the K places filled); asserts that no answer lies outside the folder."""
    found = ids[ids >= 0]
    assert allowed[found].all(), "a scoped search answered a row outside its folder"
    recall = sum(len(set(row.tolist()) & want) for row, want in zip(ids, truth, strict=True)) / (K * len(truth))
    return recall, found.size / ids.size


def bench_kind(kind: str, emb: Path, root: Path, data: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    build_index([emb], root / kind, BuildOptions(kind=kind, queries=args.tune_queries))
    index = open_index(root / kind)
    built = time.perf_counter() - start
    if "stored" not in data:  # the float16 vectors embed stores, which scans and reranking score: the truth
        data["stored"] = np.concatenate([chunk for _, chunk in vector_chunks(index.sources)]).astype(np.float64)
    queries, stored, labels = data["queries"], data["stored"], data["labels"]
    everything = np.ones(labels.size, dtype=bool)
    whole, _ = score(index.search(queries, K)[1], exact_top(stored, everything, queries), everything)
    print(f"{kind}: built and tuned in {built:.0f} s; recall@{K} of the whole index {whole:.3f}")
    rows = []
    for layout in args.layouts:
        for share in args.shares:
            allowed = folder_rows(layout, share, labels, np.random.default_rng(int(share * 1e6)))
            truth = exact_top(stored, allowed, queries)
            out = {"kind": kind, "layout": layout, "share": share, "folder_rows": int(allowed.sum()),
                   "whole_index_recall": whole}
            ways = {"scan": Scope, "tuned": TunedScope, "widened": WidenedScope, "scoped": Scope}
            out["taken"] = "scan" if out["folder_rows"] <= SCAN_ROWS else "scoped"
            for way, make in ways.items():
                scope = make(allowed, ("bench",))
                ids, seconds = measure(index, way, scope, queries, args.rounds)
                recall, filled = score(ids, truth, allowed)
                out[way] = {"recall": recall, "filled": filled, "ms_per_query": seconds * 1e3}
            rows.append(out)
            print(f"  {layout:9s} {share:6.1%} ({out['folder_rows']:7d} rows): " + "; ".join(
                f"{way} recall {out[way]['recall']:.3f} filled {out[way]['filled']:.2f} "
                f"{out[way]['ms_per_query']:.2f} ms" for way in ways) + f" (takes {out['taken']})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=400)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--tune-queries", type=int, default=500, help="held-out queries `index build` tunes on")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.05, 0.2, 0.5])
    parser.add_argument("--layouts", nargs="+", choices=["scattered", "topical"], default=["scattered", "topical"])
    parser.add_argument("--kinds", nargs="+", choices=["ivfpq", "hnsw"], default=["ivfpq", "hnsw"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    img, text, labels = clustered_rows(np.random.default_rng(0), args.rows + args.queries, args.dim, args.clusters)
    report: dict[str, Any] = {"machine": hardware_note(args.threads), "rows": args.rows, "dim": args.dim,
                              "clusters": args.clusters, "queries": args.queries, "k": K, "results": []}
    print(report["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        emb = embedding_folder(root / "emb", img[: args.rows], text[: args.rows], part_rows=50_000)
        data = {"queries": text[args.rows:], "labels": labels[: args.rows]}
        for kind in args.kinds:
            report["results"] += bench_kind(kind, emb, root, data, args)
    finish_report(report, args.threads, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
