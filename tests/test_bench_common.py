"""The benchmarks' per-round ratio summary (benchmarks/common.py), on hand-computed rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import format_ratio, round_ratios  # noqa: E402


def test_round_ratios_pair_calls_of_the_same_round() -> None:
    # their seconds / ours per round: 1.1 / 1.0, 2.6 / 2.0, 1.2 / 1.0 -> 1.1, 1.3, 1.2
    stats = round_ratios([1.0, 2.0, 1.0], [1.1, 2.6, 1.2])
    assert stats["median"] == pytest.approx(1.2)
    assert (stats["low"], stats["high"]) == (pytest.approx(1.1), pytest.approx(1.3))
    assert stats["rounds"] == 3 and stats["coverage"] == pytest.approx(0.75)  # 1 - 2 * 0.5^3
    # the ratio of medians (1.2 / 1.0) can differ from the median round: both are shown
    assert format_ratio(1.25, stats) == " 1.25x  (rounds 1.10-1.30, n=3, 75%)"
    assert round_ratios([1.0] * 7, [2.0] * 7)["coverage"] == pytest.approx(1 - 2**-6)


def test_round_ratios_refuse_unpaired_rounds() -> None:
    with pytest.raises(ValueError, match="same nonzero number of rounds, got 2 and 3"):
        round_ratios([1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="got 0 and 0"):
        round_ratios([], [])
