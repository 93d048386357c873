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


def correct_top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean [N]: the label scores strictly above every other class (ties count as wrong, as above)."""
    true_score = logits.gather(1, labels.view(-1, 1))  # [N, 1]
    return (logits >= true_score).sum(dim=1) == 1


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 recall of each class present in `labels`, averaged with equal weight per class.

    Unlike accuracy, a large class cannot hide a small one that is always missed. logits [N, C], labels [N].
    """
    if len(labels) == 0:
        return float("nan")
    hits = correct_top1(logits, labels).float()  # [N]
    classes = labels.unique()
    per_class = torch.stack([hits[labels == c].mean() for c in classes])  # [K]
    return per_class.mean().item()


def mean_margin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of (label's score − the best other class's score), in the scores' units (cosines for
    zero-shot). Top-1 accuracy is the fraction of rows where this is > 0; the mean also moves when no row changes
    sides, so it can separate two models whose accuracies differ by less than their seed-to-seed spread."""
    if len(labels) == 0 or logits.shape[1] < 2:
        return float("nan")
    true_score = logits.gather(1, labels.view(-1, 1)).squeeze(1)  # [N]
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))  # [N, C], the label's column masked out
    return (true_score - others.max(dim=1).values).mean().item()


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> list[float]:
    """Top-1 recall of every class 0..C-1 (NaN for a class with no example)."""
    num_classes = logits.shape[1] if num_classes is None else num_classes
    hits = correct_top1(logits, labels).float()  # [N]
    return [hits[labels == c].mean().item() if bool((labels == c).any()) else float("nan") for c in range(num_classes)]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall`, as CLIP_benchmark names them."""
    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return {"acc1": acc[1], "acc5": acc[5], "mean_per_class_recall": mean_per_class_recall(logits, labels)}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text retrieval with any number of captions per image, under CLIP_benchmark's metric names.

    image_features [I, D] and text_features [T, D] (normalised, so the dot product is the cosine);
    text_to_image [T] gives the image of each caption. `image_retrieval_recall@k`: a caption finds its
    image among the top k images. `text_retrieval_recall@k`: an image finds ANY of its captions among the
    top k captions. Ties are broken against the query.
    """
    scores = text_features @ image_features.t()  # [T, I]
    return retrieval_metrics_from_scores(scores, text_to_image, ks)


def retrieval_metrics_from_scores(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """As `retrieval_metrics`, from a caption-by-image score matrix [T, I]."""
    num_texts, num_images = scores.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    positives = torch.zeros(num_texts, num_images, dtype=torch.bool)
    positives[torch.arange(num_texts), text_to_image] = True  # [T, I]
    if not bool(positives.any(dim=0).all()):
        missing = int((~positives.any(dim=0)).nonzero()[0])
        raise ValueError(f"image {missing} has no caption in text_to_image")
    image_recall = recall_at_k(scores, positives, ks)  # caption -> images
    text_recall = recall_at_k(scores.t(), positives.t(), ks)  # image -> captions
    out = {f"image_retrieval_recall@{k}": image_recall[k] for k in ks}
    out.update({f"text_retrieval_recall@{k}": text_recall[k] for k in ks})
    return out


def robustness_drop(acc_in: float, acc_shift: float) -> float:
    """Accuracy lost under distribution shift: in-distribution accuracy minus shifted accuracy."""
    return acc_in - acc_shift


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def fit_baseline(acc_in: list[float], acc_shift: list[float]) -> tuple[float, float]:
    """The line that baseline models trace from in-distribution to shifted accuracy, in logit space.

    Taori et al. (2020) found that shifted accuracy is nearly a linear function of in-distribution accuracy
    once both are logit-transformed; this least-squares fit over baseline models (e.g. ones trained on the
    in-distribution data only) returns (slope, intercept) of logit(acc_shift) against logit(acc_in).
    """
    if len(acc_in) != len(acc_shift) or len(acc_in) < 2:
        raise ValueError("fit_baseline needs the same number (at least 2) of in-distribution and shifted accuracies")
    x = _logit(torch.tensor(acc_in, dtype=torch.float64))
    y = _logit(torch.tensor(acc_shift, dtype=torch.float64))
    design = torch.stack([x, torch.ones_like(x)], dim=1)  # [M, 2]
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)  # [2]
    return solution[0].item(), solution[1].item()


def effective_robustness(acc_in: float, acc_shift: float, baseline: tuple[float, float]) -> float:
    """Shifted accuracy above what the baseline fit predicts from the in-distribution accuracy.

    ER = acc_shift - sigmoid(slope * logit(acc_in) + intercept), with (slope, intercept) from `fit_baseline`.
    Zero means "as robust as the baselines, given its accuracy"; the CLIP paper reports zero-shot CLIP well
    above zero on ImageNet's natural shifts. With baseline (1, 0) the prediction is acc_in, so ER = -drop.
    """
    slope, intercept = baseline
    predicted = torch.sigmoid(slope * _logit(torch.tensor(acc_in, dtype=torch.float64)) + intercept).item()
    return acc_shift - predicted
