"""How good an index is, measured on its own data: exact top-k, 10-recall@10, parameter tuning, threshold.

Ground truth is exact inner-product search computed part by part in numpy (float32), so it never needs the
whole collection in memory. Image queries are held-out rows of the collection: their own row is dropped from
both the exact and the approximate answer, so each acts as a new image near the collection. Text queries are
the captions of held-out rows, whose own image stays (that is the match a text search should find).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .removed import Removed

__all__ = ["UNSEPARATED", "drop_self", "exact_topk", "no_match_threshold", "query_recalls", "recall_at_k",
           "tune"]

UNSEPARATED = ("no score separates matched from unmatched held-out captions: each caption scores another image "
               "as high as its own (near-duplicate captions or images?), so no query is judged 'no good match'")


def exact_topk(chunks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int,
               removed: Removed | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product over `chunks` of (first global id, vectors [m, d]): scores, ids [n, k], the
    `removed` ids left out.

    Ordered by score descending, then id ascending (as faiss's flat index orders ties)."""
    n = queries.shape[0]
    best_scores = np.full((n, k), -np.inf, dtype=np.float32)
    best_ids = np.full((n, k), -1, dtype=np.int64)
    for start, vectors in chunks:
        scores = queries @ np.asarray(vectors, dtype=np.float32).T  # [n, m]
        gone = removed.mask(start, scores.shape[1]) if removed else None
        if gone is not None:
            scores[:, gone] = -np.inf
        cand_scores, cand_ids = _chunk_topk(scores, k)
        all_scores = np.concatenate([best_scores, cand_scores], axis=1)  # [n, 2k]
        all_ids = np.concatenate([best_ids, cand_ids + np.where(cand_ids < 0, 0, start)], axis=1)
        order = _by_score_then_id(all_scores, all_ids)[:, :k]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_scores, np.where(best_scores == -np.inf, -1, best_ids)


def _by_score_then_id(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the column order by score descending, then id ascending, padding (-1) last."""
    return np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)


def _chunk_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of `scores` [n, m] (scores, column ids [n, k], -1 padding past m).

    A linear-time partition picks them; sorting every column of a 100k-row chunk, as a full sort would, made
    the ground truth of a 1M-row index most of its build time. Where columns tie with a row's k-th score the
    partition's choice among them is arbitrary, so those rows (rare) take the exact ordered path instead."""
    n, m = scores.shape
    if m <= k:
        ids = np.broadcast_to(np.arange(m, dtype=np.int64), (n, m))
        return (np.pad(scores, ((0, 0), (0, k - m)), constant_values=-np.inf),
                np.pad(ids, ((0, 0), (0, k - m)), constant_values=-1))
    ids = np.argpartition(-scores, k - 1, axis=1)[:, :k].astype(np.int64)  # [n, k], unordered
    top = np.take_along_axis(scores, ids, axis=1)
    tied = (scores >= top.min(axis=1, keepdims=True)).sum(axis=1) > k  # a tie at the k-th left columns out
    if tied.any():
        columns = np.broadcast_to(np.arange(m, dtype=np.int64), (int(tied.sum()), m))
        ids[tied] = _by_score_then_id(scores[tied], columns)[:, :k]
        top[tied] = np.take_along_axis(scores[tied], ids[tied], axis=1)
    return top, ids


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its result row and keep the first k of the rest ([n, k+1] -> [n, k])."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, self_ids)):
        kept = found[found != own][:k]
        out[row, : len(kept)] = kept
    return out


def query_recalls(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query [n]: the fraction of its true top-k that the search returned in its top-k."""
    return np.array([len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
                     for f, t in zip(found, truth)], dtype=np.float64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """k-recall@k: the mean fraction of each query's true top-k that the search returned in its top-k."""
    hits = query_recalls(found, truth)
    return float(hits.mean()) if hits.size else float("nan")


SATURATED = 0.005  # recall within this of the best measured: a wider search would only cost time


def tune(candidates: list[int], recall_with: Callable[[int], dict[str, float]],
         target: float) -> tuple[int, dict[str, float], bool]:
    """The smallest candidate whose recall reaches `target` on every query modality, its recall, and True.

    When none does: the smallest candidate whose worst-modality recall is within SATURATED of the best one
    measured, and False. Past that point the quantiser, not the search breadth, limits recall, and the largest
    candidate (for IVF, a scan of every list) would only make each query slower."""
    measured: list[tuple[int, dict[str, float]]] = []
    for value in candidates:
        recall = recall_with(value)
        if min(recall.values()) >= target:
            return value, recall, True
        measured.append((value, recall))
    best = max(min(r.values()) for _, r in measured)
    value, recall = next((v, r) for v, r in measured if min(r.values()) >= best - SATURATED)
    return value, recall, False


def no_match_threshold(positive: np.ndarray, best_negative: np.ndarray) -> dict[str, Any]:
    """The score that best separates matched text queries from unmatched ones (max F1), with its P and R.

    `score` is None (with a `reason`) when that best cut still accepts every unmatched query.

    `positive[i]` is held-out caption i's similarity to its own image (a query whose answer is in the
    collection); `best_negative[i]` its best similarity among the other images (the same query once its
    image is gone: what an unmatched query scores). Their difference is the margin of Chen et al.
    """
    scores = np.concatenate([positive, best_negative]).astype(np.float64)
    matched = np.concatenate([np.ones(len(positive), bool), np.zeros(len(best_negative), bool)])
    best: dict[str, Any] = {}
    for threshold in np.unique(scores):
        accepted = scores >= threshold
        true_pos = int((accepted & matched).sum())
        precision = true_pos / max(1, int(accepted.sum()))
        recall = true_pos / max(1, int(matched.sum()))
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        if not best or f1 > best["f1"]:
            best = {"score": float(threshold), "precision": precision, "recall": recall, "f1": f1}
    margin = positive.astype(np.float64) - best_negative
    out = {**best, "pairs": int(len(positive)), "margin_mean": float(margin.mean()),
           "margin_std": float(margin.std()), "method": "max-F1 split of positive-pair vs best-negative scores"}
    if bool((best_negative >= best["score"]).all()):
        # The best cut accepts every unmatched query, so it would never flag one: storing it would claim a
        # calibration that does not exist (collections of near-identical captions and images end here).
        out.update(score=None, reason=UNSEPARATED)
    return out
