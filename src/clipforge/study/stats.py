"""Statistics that can carry a verdict: a paired t confidence interval and agrees / disagrees / inconclusive.

A claim of the paper says the sign of a difference (variant minus baseline, same seed): "R raises zero-shot
accuracy" is a positive difference in zero-shot top-1. With n paired seeds the 95% interval is
mean ± t_{0.975, n-1} · sd / √n. The verdict: `agrees` when the whole interval lies on the claimed side of 0,
`disagrees` when it lies wholly on the other side, and `inconclusive` when it contains 0 or fewer than
`MIN_SEEDS` seeds are paired: the data cannot tell at this number of seeds, which is not evidence of no effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy.stats import t as student_t

from ..config import ConfigError

Verdict = Literal["agrees", "disagrees", "inconclusive"]
MIN_SEEDS = 3  # no verdict from fewer paired seeds, however narrow their interval
# The metrics whose paired differences the report computes (and a claim may name).
CLAIM_METRICS: tuple[str, ...] = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "retrieval_t2i_r1",
                                  "probe_top1", "margin_i2t", "margin_t2i", "positive_similarity",
                                  "zeroshot_seen_margin", "zeroshot_heldout_margin")


@dataclass(frozen=True)
class PairedCI:
    mean: float
    low: float
    high: float
    n: int
    level: float

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of a list of numbers."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def paired_t_interval(differences: Sequence[float], level: float = 0.95) -> PairedCI:
    """The t confidence interval of the mean of paired differences (infinite half-width for n < 2)."""
    n = len(differences)
    if n == 0:
        raise ValueError("paired_t_interval: no differences")
    mean = math.fsum(differences) / n
    if n < 2:
        return PairedCI(mean, -math.inf, math.inf, n, level)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return PairedCI(mean, mean - half, mean + half, n, level)


def verdict(ci: PairedCI, claimed_sign: int) -> Verdict:
    """Whether the interval backs a claimed positive (+1) or negative (-1) difference."""
    if claimed_sign not in (1, -1):
        raise ValueError(f"claimed_sign must be +1 or -1, got {claimed_sign}")
    if ci.n < MIN_SEEDS:
        return "inconclusive"
    low, high = (ci.low, ci.high) if claimed_sign > 0 else (-ci.high, -ci.low)
    if low > 0:
        return "agrees"
    if high < 0:
        return "disagrees"
    return "inconclusive"


@dataclass(frozen=True)
class ClaimSpec:
    """One claim of the paper, tested on every variant listed (or every variant whose id starts with a
    `prefix`): the metric's paired difference against the baseline has sign `sign` (+1 raises, -1 lowers)."""

    id: str
    text: str
    metric: str
    sign: int = 1
    variants: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.sign not in (1, -1):
            raise ConfigError(f"config key '{p}sign': expected 1 or -1, got {self.sign}")
        if not self.variants and not self.prefixes:
            raise ConfigError(f"config key '{p}variants': claim '{self.id}' names no variants or prefixes")

    def members(self, variant_ids: Sequence[str]) -> list[str]:
        return [v for v in variant_ids if v in self.variants or any(v.startswith(p) for p in self.prefixes)]
