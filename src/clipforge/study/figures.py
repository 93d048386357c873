"""The study's margin histograms, one panel per variant (the picture of the paper's Figure 3).

Chen, Deng, Li & Gu show the distribution of margins for models trained at several temperatures. Each cell
of a synthetic-setting study stores its margins as counts on fixed bins (`eval.margins.margin_report`), so
the seeds of a variant pool exactly (`merge_reports`), and the panels here are drawn from those counts alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..eval.margins import bin_edges


@dataclass(frozen=True)
class MarginPanel:
    """One variant: its label, its (pooled) margin report, and its mean end temperature when known."""

    label: str
    report: Mapping[str, object]
    temperature: float | None = None


@dataclass(frozen=True)
class Histogram:
    """A series' histogram: bin edges [K+1], density [K] (integrates to 1), mean, share below 0, pairs."""

    edges: np.ndarray
    density: np.ndarray
    mean: float
    frac_negative: float
    pairs: int


def histogram_of(report: Mapping[str, object], series: str = "i2t") -> Histogram:
    """The histogram of one series of a margin report, from its counts on the fixed bins.

    0 is a bin edge (of the margin and of the similarity bins), so the share of negative values is exact from
    the counts: the bins left of 0 hold exactly the values < 0 (a value of exactly 0 falls in the bin at 0).
    """
    edges = bin_edges(series)
    counts = np.asarray(report[series]["counts"], dtype=np.float64)  # type: ignore[index]
    if counts.shape != (len(edges) - 1,):
        raise ValueError(f"margin report: {series} has {counts.size} counts, expected {len(edges) - 1} bins")
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"margin report: {series} has no pairs")
    density = counts / total / np.diff(edges)
    zero = int(np.argmin(np.abs(edges)))  # the edge at 0
    frac_negative = float(counts[:zero].sum() / total)
    mean = float(report[series]["mean"])  # type: ignore[index]
    return Histogram(edges, density, mean, frac_negative, int(total))


def _x_range(histograms: Sequence[Histogram], pad: float = 0.05) -> tuple[float, float]:
    """The range of every non-empty bin across the histograms, padded."""
    low, high = np.inf, -np.inf
    for h in histograms:
        filled = np.nonzero(h.density)[0]
        low, high = min(low, h.edges[filled[0]]), max(high, h.edges[filled[-1] + 1])
    return float(low - pad), float(high + pad)


def plot_margin_panels(path: str | Path, panels: Sequence[MarginPanel], title: str, series: str = "i2t") -> Path:
    """One panel per variant, side by side on a shared x axis: the density of its margins, 0 and the mean
    marked, the mean, the share of negative margins (in-batch errors) and the end temperature written in."""
    from ..eval.plots import _save  # noqa: PLC0415 - the shared PNG writer

    if not panels:
        raise ValueError("plot_margin_panels: no panels to draw")
    histograms = [histogram_of(p.report, series) for p in panels]
    figure = Figure(figsize=(3.2 * len(panels) + 1.0, 3.6))
    axes = figure.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    direction = {"i2t": "image → text", "t2i": "text → image"}.get(series, series)
    for ax, panel, h in zip(axes, panels, histograms):
        ax.stairs(h.density, h.edges, fill=True, alpha=0.6)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(h.mean, color="tab:red", linestyle="--", linewidth=1.0)
        temperature = "" if panel.temperature is None else f"T (end) {panel.temperature:.3f}\n"
        ax.text(0.97, 0.95, f"{temperature}mean {h.mean:.3f}\n{100 * h.frac_negative:.0f}% < 0\n{h.pairs} pairs",
                transform=ax.transAxes, ha="right", va="top", fontsize="small")
        ax.set_title(panel.label, fontsize="small")
        ax.set_xlabel(f"{direction} margin")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    axes[0].set_xlim(*_x_range(histograms))
    batch = panels[0].report.get("batch_size")
    figure.suptitle(f"{title}; within batches of {batch}" if batch else title)
    return _save(figure, path)
