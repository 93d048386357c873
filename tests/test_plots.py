"""Figures are written as real PNG files; the crossing point of the zero-shot figure is checked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from clipforge.eval.plots import matching_shots, plot_per_class_accuracy, plot_recall_at_k, plot_zero_shot_vs_kshot


def test_matching_shots_interpolates_in_log_k() -> None:
    # 0.5 at k=2, 0.7 at k=8: 0.6 is half-way in accuracy, so half-way in log k -> k = 4.
    assert matching_shots(0.6, [1, 2, 8], [0.3, 0.5, 0.7]) == pytest.approx(4.0)
    assert matching_shots(0.2, [1, 2], [0.3, 0.5]) == 1.0
    assert matching_shots(0.9, [1, 2], [0.3, 0.5]) is None


def test_figures_are_png(tmp_path: Path) -> None:
    paths = [
        plot_zero_shot_vs_kshot(tmp_path / "z.png", 0.6, [1, 2, 4, 8, 16], [0.3, 0.45, 0.55, 0.65, 0.72],
                                [0.05, 0.04, 0.03, 0.02, 0.01]),  # fmt: skip
        plot_per_class_accuracy(tmp_path / "c.png", ["cat", "dog", "bird"], [0.9, 0.4, float("nan")]),
        plot_recall_at_k(
            tmp_path / "r.png",
            {"image_retrieval_recall@1": 0.2, "image_retrieval_recall@5": 0.5, "text_retrieval_recall@1": 0.3},
        ),
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
    with pytest.raises(ValueError, match="no image_retrieval_recall"):
        plot_recall_at_k(tmp_path / "x.png", {"acc1": 0.5})
