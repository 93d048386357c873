"""Metric functions on toy inputs whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.eval.metrics import (
    classification_metrics,
    effective_robustness,
    fit_baseline,
    mean_per_class_recall,
    per_class_recall,
    recall_at_k,
    retrieval_metrics,
    retrieval_metrics_from_scores,
    robustness_drop,
    topk_accuracy,
)


def one_hot_logits(predictions: list[int], num_classes: int) -> torch.Tensor:
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return logits


def test_mean_per_class_recall_with_class_imbalance() -> None:
    # 8 examples of class 0, all right; 2 of class 1, both predicted as 0.
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = one_hot_logits([0] * 10, 2)
    assert topk_accuracy(logits, labels, ks=(1,))[1] == pytest.approx(0.8)
    assert mean_per_class_recall(logits, labels) == pytest.approx(0.5)  # (1 + 0) / 2
    assert per_class_recall(logits, labels) == pytest.approx([1.0, 0.0])


def test_mean_per_class_recall_partial_and_absent_classes() -> None:
    # class 0: 3 of 4 right; class 2: 1 of 2 right; class 1 never appears.
    labels = torch.tensor([0, 0, 0, 0, 2, 2])
    logits = one_hot_logits([0, 0, 0, 1, 2, 0], 3)
    assert mean_per_class_recall(logits, labels) == pytest.approx((0.75 + 0.5) / 2)
    recalls = per_class_recall(logits, labels)
    assert recalls[0] == pytest.approx(0.75) and math.isnan(recalls[1]) and recalls[2] == pytest.approx(0.5)


def test_tied_logits_score_zero() -> None:
    labels = torch.tensor([0, 1, 2])
    logits = torch.zeros(3, 3)
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == 0.0 and metrics["mean_per_class_recall"] == 0.0
    assert metrics["acc5"] == 1.0  # with 3 classes every label is within the top 5


def test_classification_metrics_names_and_values() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 6)  # class order 0 > 1 > ... > 5 for every row
    metrics = classification_metrics(logits, labels)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert metrics["acc1"] == pytest.approx(1 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)
    assert metrics["mean_per_class_recall"] == pytest.approx(1 / 6)


def test_mean_margin_by_hand() -> None:
    from clipforge.eval.metrics import mean_margin

    logits = torch.tensor([[0.9, 0.2, 0.5],    # label 0: 0.9 - 0.5 = +0.4
                           [0.1, 0.3, 0.7],    # label 1: 0.3 - 0.7 = -0.4
                           [0.2, 0.6, 0.6]])   # label 2: 0.6 - 0.6 = 0 (a tie: wrong for acc1, margin 0)
    labels = torch.tensor([0, 1, 2])
    assert mean_margin(logits, labels) == pytest.approx((0.4 - 0.4 + 0.0) / 3, abs=1e-7)
    assert mean_margin(logits[:1], labels[:1]) == pytest.approx(0.4)
    assert classification_metrics(logits, labels)["acc1"] == pytest.approx(1 / 3)  # exactly the rows with margin > 0
    assert math.isnan(mean_margin(logits[:0], labels[:0]))
    assert math.isnan(mean_margin(torch.ones(2, 1), torch.zeros(2, dtype=torch.long)))  # one class: no rival


def test_retrieval_perfect_ranking() -> None:
    features = torch.eye(4)
    metrics = retrieval_metrics(features, features, torch.arange(4), ks=(1, 2))
    assert metrics == {
        "image_retrieval_recall@1": 1.0,
        "image_retrieval_recall@2": 1.0,
        "text_retrieval_recall@1": 1.0,
        "text_retrieval_recall@2": 1.0,
    }


def test_retrieval_reversed_ranking() -> None:
    # Caption i scores image j with -|i - j| reversed: its own image scores lowest of all 4.
    n = 4
    i = torch.arange(n)
    scores = (i[:, None] - i[None, :]).abs().float()  # [T, I]; own image 0, all others > 0
    metrics = retrieval_metrics_from_scores(scores, torch.arange(n), ks=(1, 3, 4))
    for direction in ("image", "text"):
        assert metrics[f"{direction}_retrieval_recall@1"] == 0.0
        assert metrics[f"{direction}_retrieval_recall@3"] == 0.0
        assert metrics[f"{direction}_retrieval_recall@4"] == 1.0


def test_retrieval_ties_count_against_the_query() -> None:
    scores = torch.ones(3, 3)
    metrics = retrieval_metrics_from_scores(scores, torch.arange(3), ks=(1, 2, 3))
    assert metrics["image_retrieval_recall@1"] == 0.0
    assert metrics["image_retrieval_recall@2"] == 0.0
    assert metrics["image_retrieval_recall@3"] == 1.0


def test_retrieval_several_captions_per_image() -> None:
    # Images A (0) and B (1); captions a1, a2 of A and b1 of B. Scores [caption, image]:
    #   a1: A 0.9, B 0.1 -> finds A at rank 1
    #   a2: A 0.2, B 0.8 -> finds A at rank 2
    #   b1: A 0.7, B 0.6 -> finds B at rank 2
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    text_to_image = torch.tensor([0, 0, 1])
    metrics = retrieval_metrics_from_scores(scores, text_to_image, ks=(1, 2))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(1.0)
    # Image A ranks captions a1 0.9, b1 0.7, a2 0.2: hit at rank 1 (a1 is one of its captions).
    # Image B ranks a2 0.8, b1 0.6, a1 0.1: its only caption b1 is at rank 2.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 2)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_retrieval_any_caption_suffices_for_image_to_text() -> None:
    # Image 0 has captions 0 and 1; only caption 1 scores top for it.
    scores = torch.tensor([[0.0, 0.5], [0.9, 0.1], [0.3, 0.8]])  # [T=3, I=2]
    metrics = retrieval_metrics_from_scores(scores, torch.tensor([0, 0, 1]), ks=(1,))
    assert metrics["text_retrieval_recall@1"] == 1.0  # image 0 -> caption 1 (0.9); image 1 -> caption 2 (0.8)


def test_retrieval_rejects_bad_mapping() -> None:
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics_from_scores(torch.zeros(2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="text_to_image has shape"):
        retrieval_metrics_from_scores(torch.zeros(2, 2), torch.tensor([0, 1, 1]))


def test_recall_at_k_agrees_with_a_naive_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 15, generator=generator)
    positives = torch.rand(20, 15, generator=generator) < 0.15
    positives[torch.arange(15), torch.arange(15)] = True  # every row of the first 15 has a positive
    positives[15:, 0] = True
    fast = recall_at_k(scores, positives, ks=(1, 3, 5))
    for k in (1, 3, 5):
        hits = 0
        for q in range(20):
            top = sorted(range(15), key=lambda j: -scores[q, j].item())[:k]
            hits += any(positives[q, j] for j in top)
        assert fast[k] == pytest.approx(hits / 20)


def test_robustness_drop_and_effective_robustness() -> None:
    assert robustness_drop(0.76, 0.41) == pytest.approx(0.35)

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    # Baselines exactly on logit(shift) = 0.8 logit(in) - 0.5.
    acc_in = [0.5, 0.6, 0.7, 0.8]
    acc_shift = [sigmoid(0.8 * logit(a) - 0.5) for a in acc_in]
    slope, intercept = fit_baseline(acc_in, acc_shift)
    assert slope == pytest.approx(0.8, abs=1e-6) and intercept == pytest.approx(-0.5, abs=1e-6)
    on_line = sigmoid(0.8 * logit(0.75) - 0.5)
    assert effective_robustness(0.75, on_line, (slope, intercept)) == pytest.approx(0.0, abs=1e-6)
    assert effective_robustness(0.75, on_line + 0.1, (slope, intercept)) == pytest.approx(0.1, abs=1e-6)
    # With the identity baseline the expected shifted accuracy is the in-distribution one.
    assert effective_robustness(0.7, 0.6, (1.0, 0.0)) == pytest.approx(-robustness_drop(0.7, 0.6))
    with pytest.raises(ValueError):
        fit_baseline([0.5], [0.4])


def test_zeroshot_scores_carry_the_mean_margin_per_subset() -> None:
    from clipforge.eval.evaluators import scores_with_subsets

    logits = torch.tensor([[0.9, 0.2, 0.5],   # label 0: +0.4
                           [0.1, 0.3, 0.7],   # label 1: -0.4
                           [0.2, 0.1, 0.6]])  # label 2: +0.4
    out = scores_with_subsets(logits, torch.tensor([0, 1, 2]), {"first two": [0, 1], "last": [2]})
    assert out["mean_margin"] == pytest.approx(0.4 / 3)
    assert out["subsets"]["first two"]["mean_margin"] == pytest.approx(0.0, abs=1e-7)  # ranked against all 3
    assert out["subsets"]["last"]["mean_margin"] == pytest.approx(0.4)
    assert out["subsets"]["first two"]["acc1"] == pytest.approx(0.5)
