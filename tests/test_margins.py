"""Margin diagnostics on toy inputs whose answers are known by hand, against a naive loop, and in random batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.eval.margins import (
    BIN_WIDTH,
    MarginSample,
    batch_margins,
    bin_edges,
    describe,
    diagnose_margins,
    margin_report,
    margins_in_batches,
    merge_reports,
    plot_margin_histogram,
    plot_margin_overlay,
)


def naive_margins(f: torch.Tensor, g: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-pair margins by explicit loops over one batch (the definition, written out)."""
    n = f.shape[0]
    i2t, t2i = [], []
    for i in range(n):
        pos = float(f[i] @ g[i])
        i2t.append(pos - max(float(f[i] @ g[j]) for j in range(n) if j != i))
        t2i.append(pos - max(float(g[i] @ f[j]) for j in range(n) if j != i))
    return i2t, t2i


def test_two_pairs_by_hand():
    # S = f g^T = [[0.6, 0.0], [0.8, 1.0]]
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    sample = batch_margins(f, g, batch_size=2)
    torch.testing.assert_close(sample.i2t, torch.tensor([0.6 - 0.0, 1.0 - 0.8]))
    torch.testing.assert_close(sample.t2i, torch.tensor([0.6 - 0.8, 1.0 - 0.0]))
    torch.testing.assert_close(sample.positive, torch.tensor([0.6, 1.0]))


def test_margins_are_within_batches_and_drop_the_incomplete_one():
    # Pairs 0 and 2 are identical: within one batch of 4 each would be the other's hardest negative (margin 0),
    # but in batches of 2 they never meet. Pair 4 is left out (an incomplete batch).
    e = torch.eye(4)
    f = torch.stack([e[0], e[1], e[0], e[2], e[3]])
    g = f.clone()
    in_pairs = batch_margins(f, g, batch_size=2)
    assert in_pairs.i2t.shape == (4,)
    torch.testing.assert_close(in_pairs.i2t, torch.ones(4))
    whole = batch_margins(f[:4], g[:4], batch_size=4)
    torch.testing.assert_close(whole.i2t, torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_matches_naive_loop_on_random_features():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(24, 8), dim=-1)
    g = F.normalize(f + 0.7 * torch.randn(24, 8), dim=-1)
    sample = batch_margins(f, g, batch_size=6)
    expected_i2t, expected_t2i = [], []
    for b in range(4):
        i2t, t2i = naive_margins(f[6 * b: 6 * b + 6], g[6 * b: 6 * b + 6])
        expected_i2t += i2t
        expected_t2i += t2i
    torch.testing.assert_close(sample.i2t, torch.tensor(expected_i2t))
    torch.testing.assert_close(sample.t2i, torch.tensor(expected_t2i))


@pytest.mark.parametrize(
    "f, g, batch, message",
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), 2, "same shape"),
        (torch.zeros(4, 3), torch.zeros(4, 3), 1, "at least 2"),
        (torch.zeros(3, 3), torch.zeros(3, 3), 4, "fewer than one batch"),
    ],
)
def test_bad_input_is_a_clear_error(f, g, batch, message):
    with pytest.raises(ValueError, match=message):
        batch_margins(f, g, batch)


def test_report_statistics_and_histogram_bins():
    sample = MarginSample(
        i2t=torch.tensor([0.6, 0.2, -0.1, 0.3]),
        t2i=torch.tensor([-0.2, 1.0, 0.5, 0.0]),
        positive=torch.tensor([0.6, 1.0, 0.9, 0.7]),
    )
    report = margin_report(sample, batch_size=2)
    assert report["pairs"] == 4 and report["batch_size"] == 2
    assert report["i2t"]["mean"] == pytest.approx(0.25)
    assert report["i2t"]["frac_negative"] == pytest.approx(0.25)
    assert report["t2i"]["frac_negative"] == pytest.approx(0.25)  # 0.0 is not negative
    assert report["positive"]["mean"] == pytest.approx(0.8)
    assert report["i2t"]["median"] == pytest.approx(np.quantile([0.6, 0.2, -0.1, 0.3], 0.5))
    counts = report["i2t"]["counts"]
    assert len(counts) == len(bin_edges("i2t")) - 1 == round(4.0 / BIN_WIDTH)
    assert sum(counts) == 4
    # 0.6 lies in bin floor((0.6 + 2) / 0.025) = 104 of the margin histogram
    assert counts[104] == 1
    assert sum(report["positive"]["counts"]) == 4
    assert report["positive"]["counts"][-1] == 1  # 1.0 lands in the last (closed) bin


def test_merge_adds_counts_and_weights_means():
    a = margin_report(MarginSample(torch.tensor([0.1, 0.3]), torch.tensor([0.0, 0.2]), torch.tensor([0.5, 0.5])), 2)
    b = margin_report(MarginSample(torch.tensor([1.0] * 4), torch.tensor([0.4] * 4), torch.tensor([0.9] * 4)), 2)
    merged = merge_reports([a, b])
    assert merged["pairs"] == 6
    assert merged["i2t"]["mean"] == pytest.approx((0.1 + 0.3 + 4.0) / 6)
    assert merged["positive"]["counts"] == (np.asarray(a["positive"]["counts"]) + b["positive"]["counts"]).tolist()
    c = margin_report(MarginSample(torch.tensor([0.1] * 3), torch.tensor([0.1] * 3), torch.tensor([0.1] * 3)), 3)
    with pytest.raises(ValueError, match="different batch sizes"):
        merge_reports([a, c])


def test_figures_are_written(tmp_path):
    torch.manual_seed(1)
    reports = {}
    for label, noise in (("tight", 0.2), ("loose", 1.0)):
        f = F.normalize(torch.randn(64, 16), dim=-1)
        g = F.normalize(f + noise * torch.randn(64, 16), dim=-1)
        reports[label] = margin_report(batch_margins(f, g, 16), 16)
    one = plot_margin_histogram(tmp_path / "one.png", reports["tight"])
    both = plot_margin_overlay(tmp_path / "both.png", reports, "overlay")
    many = plot_margin_overlay(tmp_path / "many.png", {f"model {i}": reports["tight"] for i in range(16)}, "16")
    for path in (one, both, many):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no reports"):
        plot_margin_overlay(tmp_path / "none.png", {}, "empty")


class _Pairs(torch.utils.data.Dataset):
    """Random images with two captions that alternate, enough for a model's features."""

    def __init__(self, n: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.captions = [f"a {'red' if i % 2 else 'blue'} shape number {i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i], self.captions[i]


def test_diagnose_margins_on_a_model(tmp_path, micro_model):
    from clipforge.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("ViT-Micro-8-32")
    pairs = _Pairs(10, micro_model.image_size)
    report = diagnose_margins(micro_model, tokenizer, pairs, batch_size=4, output_dir=tmp_path, name="m")
    assert report["pairs"] == 8  # two batches of 4; the last 2 pairs are left out
    with torch.no_grad():
        f = micro_model.encode_image(pairs.images[:8], normalize=True)
        g = micro_model.encode_text(tokenizer(pairs.captions[:8]), normalize=True)
    expected = naive_margins(f[:4], g[:4])[0] + naive_margins(f[4:], g[4:])[0]
    assert report["i2t"]["mean"] == pytest.approx(sum(expected) / 8, abs=1e-5)
    assert report["positive"]["mean"] == pytest.approx(float((f * g).sum(-1).mean()), abs=1e-5)
    stored = json.loads((tmp_path / "m.json").read_text())
    assert stored["i2t"]["counts"] == report["i2t"]["counts"]
    assert (tmp_path / "m.png").stat().st_size > 0
    assert not math.isnan(stored["t2i"]["std"])


# Random batches (clipforge eval margins) and the summary statistics.


def test_one_batch_by_hand() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    g = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    # S = f g^T = [[1, .6, .8], [0, .8, .6], [.6, 1, .96]]; rows are images, columns texts
    i2t, t2i, order = margins_in_batches(f, g, batch_size=3)
    expected_i2t = torch.tensor([1 - 0.8, 0.8 - 0.6, 0.96 - 1.0])
    expected_t2i = torch.tensor([1 - 0.6, 0.8 - 1.0, 0.96 - 0.8])
    assert torch.allclose(i2t, expected_i2t[order], atol=1e-6)  # margins come in the shuffled order
    assert torch.allclose(t2i, expected_t2i[order], atol=1e-6)


def test_batches_are_shuffled_whole_and_cover_each_pair_once() -> None:
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(10, 4), dim=-1)
    g = torch.nn.functional.normalize(f + 0.3 * torch.randn(10, 4), dim=-1)
    i2t, t2i, order = margins_in_batches(f, g, batch_size=4, seed=1)
    assert len(order) == 8 and len(set(order.tolist())) == 8  # 2 whole batches; 2 pairs left out
    for b in range(2):
        rows = order[4 * b : 4 * b + 4]
        s = f[rows] @ g[rows].t()  # [4, 4]
        off = s.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
        assert torch.allclose(i2t[4 * b : 4 * b + 4], s.diagonal() - off.max(dim=1).values, atol=1e-6)
        assert torch.allclose(t2i[4 * b : 4 * b + 4], s.diagonal() - off.max(dim=0).values, atol=1e-6)
    again = margins_in_batches(f, g, batch_size=4, seed=1)
    assert torch.equal(again[2], order)
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        margins_in_batches(f, g, batch_size=16)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        margins_in_batches(f, g, batch_size=1)


def test_describe() -> None:
    stats = describe(torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]))
    assert stats["mean"] == pytest.approx(1.0) and stats["median"] == pytest.approx(1.0)
    assert stats["min"] == -1.0 and stats["max"] == 3.0 and stats["positive_fraction"] == pytest.approx(0.6)
    assert stats["p25"] == pytest.approx(0.0) and stats["p75"] == pytest.approx(2.0)
    assert stats["std"] == pytest.approx(2.5**0.5)  # sample standard deviation
