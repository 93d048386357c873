"""Metrics as pure functions over logits or features (no model, no data loading)."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits. logits [N, C], labels [N].

    Ties count against the prediction (a label tied with other classes ranks after them), so a degenerate
    model that scores every class the same gets zero, never a flattering number.
    """
    true_score = logits.gather(1, labels.view(-1, 1))  # [N, 1]
    higher = (logits > true_score).sum(dim=1)  # [N]
    tied = (logits == true_score).sum(dim=1) - 1  # [N], other classes with the same score
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        out[k] = ((higher + tied) < k_eff).float().mean().item() if len(labels) else float("nan")
    return out


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Retrieval recall@k: fraction of queries with at least one positive among the top k results.

    similarity [Q, N] query-by-candidate scores; positives [Q, N] boolean, True where candidate is a match.
    Ties are broken pessimistically (a positive tied with negatives ranks after them).
    """
    neg_inf = torch.finfo(similarity.dtype).min
    best_pos = similarity.masked_fill(~positives, neg_inf).max(dim=1).values  # [Q]
    # rank of the best positive = number of negatives scoring >= it
    negatives_ahead = ((similarity >= best_pos[:, None]) & ~positives).sum(dim=1)  # [Q]
    return {k: (negatives_ahead < k).float().mean().item() for k in ks}
