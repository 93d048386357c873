"""Per-sample margins: a hand-computed batch, batching of a larger set, and the summary statistics."""

from __future__ import annotations

import pytest
import torch

from clipforge.eval.margins import describe, margins_in_batches


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
