"""`clipforge index check` and `index duplicates`: integrity, re-measured recall and threshold, near-duplicates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import sha256_file
from .build import BuildOptions, caption_truth, ground_truth, query_hits, query_sets
from .errors import SearchError
from .index import VectorIndex, open_index, stored_rows

__all__ = ["check_index", "find_duplicates"]


def _verify_files(index: VectorIndex) -> None:
    captions = index.info.get("captions")
    entries = [index.info["index_file"], *([captions["index_file"]] if captions else [])]
    for entry in entries:
        path = index.index_dir / entry["name"]
        if sha256_file(path) != entry["sha256"]:
            raise SearchError(f"{path}: sha256 does not match index.json (corrupt index file)")
    for source, stored in zip(index.sources, index.info["sources"]):
        if sha256_file(source.root / "manifest.json") != stored.get("manifest_sha256"):
            raise SearchError(f"{source.root / 'manifest.json'}: changed since the index was built")
        for part in source.parts:
            source.verify(part)


def _tolerance(recall: float, hits: np.ndarray, k: int) -> float:
    """Three standard errors of the difference between the stored k-recall@k and the one re-measured on a fresh
    sample of as many queries (`hits`: its per-query recalls): two independent estimates, so sqrt(2) x the SE of
    one. A query's k hits are not independent trials (queries in a hard region miss together), so the variance
    is the one measured across queries, never below the binomial variance of k independent hits."""
    variance = max(float(np.var(hits, ddof=1)) if hits.size > 1 else 0.0, max(recall * (1 - recall), 1e-4) / k)
    return 3.0 * math.sqrt(2.0 * variance / max(1, hits.size))


def _threshold_on(pairs: tuple[np.ndarray, np.ndarray], score: float) -> dict[str, float]:
    positive, negative = pairs
    accepted_pos, accepted_neg = int((positive >= score).sum()), int((negative >= score).sum())
    return {"precision": accepted_pos / max(1, accepted_pos + accepted_neg), "recall": accepted_pos / len(positive)}


def check_index(index_dir: str | Path, seed: int = 1, queries: int | None = None) -> dict[str, Any]:
    """Verify every file's checksum, then re-measure recall and the threshold on a fresh held-out sample.

    `ok` is False when a modality's recall falls more than three standard errors below the stored value (the
    caption index's too: `report["captions"]`, per query modality).
    """
    index = open_index(index_dir)
    _verify_files(index)
    stored = index.info["recall"]
    opts = BuildOptions(queries=queries or int(stored["queries"]), k=int(stored["k"]), seed=seed)
    sets = query_sets(index.sources, opts, index.removed)
    truth = ground_truth(index.sources, sets, opts.k, index.removed)
    measured = query_hits(index.search, sets, truth, opts.k)
    report: dict[str, Any] = {"index": str(index.index_dir), "kind": index.info["kind"], "rows": len(index),
                              "files": "ok", "search": index.info.get("search", {}), "recall": {}, "ok": True}
    report["recall"] = _compare(stored, measured, opts.k)
    captions = index.info.get("captions")
    if captions:
        found = query_hits(index.search_captions, sets, caption_truth(index.sources, sets, opts.k, index.removed),
                           opts.k, own="text")
        report["captions"] = {"search": captions.get("search", {}),
                              "recall": _compare(captions["recall"], found, opts.k)}
    checks = [*report["recall"].values(), *report.get("captions", {}).get("recall", {}).values()]
    report["ok"] = all(r["ok"] for r in checks)
    threshold = index.info.get("threshold")
    if threshold and threshold.get("score") is None:
        report["threshold"] = {"score": None, "reason": threshold.get("reason")}
    elif threshold and "pairs" in truth:
        stored_pr = {key: threshold[key] for key in ("precision", "recall")}
        report["threshold"] = {"score": threshold["score"], "stored": stored_pr,
                               "measured": _threshold_on(truth["pairs"], threshold["score"])}
    return report


def _compare(stored: dict[str, Any], measured: dict[str, np.ndarray], k: int) -> dict[str, dict[str, Any]]:
    """Per query modality: the stored and re-measured recall (from per-query hits), the tolerance, whether it held."""
    out = {}
    for modality, hits in measured.items():
        value, tolerance = round(float(hits.mean()), 4), _tolerance(stored[modality], hits, k)
        out[modality] = {"stored": stored[modality], "measured": value, "tolerance": round(tolerance, 4),
                         "ok": value >= stored[modality] - tolerance}
    return out


def _groups(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the pair graph (union-find), each sorted, largest first."""
    parent: dict[int, int] = {}

    def root(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for node in parent:
        members.setdefault(root(node), []).append(node)
    return sorted((sorted(g) for g in members.values()), key=lambda g: (-len(g), g[0]))


def kept_ids(ids: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """The ids [n] (ascending) but the duplicates: each group keeps its first (lowest) id."""
    dropped = [i for group in groups for i in sorted(group)[1:]]
    return ids[~np.isin(ids, np.asarray(dropped, dtype=np.int64))].astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # [m, dim]


def find_duplicates(index_dir: str | Path, threshold: float = 0.95, k: int = 10, batch: int = 4096) -> dict:
    """Groups of images whose cosine similarity passes `threshold`: candidates from the index's k-NN, each
    pair confirmed with the stored vectors (an approximate index's scores are estimates)."""
    if not -1.0 <= threshold <= 1.0:
        raise SearchError(f"--threshold: a cosine similarity in [-1, 1], got {threshold}")
    index = open_index(index_dir)
    confirmed: set[tuple[int, int]] = set()
    start = 0
    for source in index.sources:
        for part in source.parts:
            vectors = np.asarray(source.vectors(part, "img"), dtype=np.float32)
            for lo in range(0, part.rows, batch):
                chunk = vectors[lo:lo + batch]  # [b, dim]
                _, ids = index.search(chunk, min(k + 1, len(index)))  # [b, k+1]
                own = np.arange(start + lo, start + lo + len(chunk), dtype=np.int64)[:, None]  # [b, 1]
                keep = (ids >= 0) & (ids != own)  # [b, k+1]
                gone = index.removed.mask(start + lo, len(chunk)) if index.removed else None
                if gone is not None:  # a removed row is no one's duplicate (searches already skip it)
                    keep[gone] = False
                rows, cols = np.nonzero(keep)
                if not len(rows):
                    continue
                # confirm every candidate in one read of the stored vectors: an approximate index's scores
                # are estimates
                neighbours = stored_rows(index.sources, ids[rows, cols].astype(np.int64))  # [m, dim]
                # cosines of renormalised copies, as search's dedup takes them: the stored float16 vectors are
                # only nearly unit (and vectors from elsewhere need not be)
                hit = np.einsum("md,md->m", _unit(chunk[rows]), _unit(neighbours)) >= threshold  # [m]
                found = np.stack([own[rows[hit], 0], ids[rows[hit], cols[hit]]], axis=1)  # [h, 2]
                confirmed.update(zip(found.min(axis=1).tolist(), found.max(axis=1).tolist()))
            start += part.rows
    groups = _groups(sorted(confirmed))
    records = index.metadata([i for g in groups for i in g]) if groups else []
    by_id = {r["id"]: r for r in records}
    return {"threshold": threshold, "k": k, "pairs": len(confirmed), "groups": [
        [{"id": i, "key": by_id[i].get("key"), "path": by_id[i].get("path") or by_id[i].get("member")} for i in g]
        for g in groups]}

