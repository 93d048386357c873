"""Margin diagnostics: how far each positive pair's similarity beats its hardest in-batch negative.

Chen, Deng, Li & Gu (ICLR 2024) tie CLIP's zero-shot transfer to this margin. For a batch of B pairs with
normalised features f_i (image) and g_i (text):

    image -> text margin   m_i = <f_i, g_i> - max_{j != i} <f_i, g_j>
    text -> image margin   m'_i = <g_i, f_i> - max_{j != i} <g_i, f_j>

A negative margin is an in-batch retrieval error. The margin depends on the batch size (more candidates, a
harder negative), so a dataset's pairs are cut into consecutive batches of one fixed size and the margins are
computed within each; a final incomplete batch is left out so every margin sees the same number of negatives.
The positive similarity <f_i, g_i> is reported separately: a term that only pulls positives together can raise
it while the hardest negative rises too, and the margin shrinks.

`margins_in_batches` (random batches, as training draws them; used by `clipforge eval margins`) and
`batch_margins` (consecutive batches, plus the positive similarities; used by the study) share one
computation, `losses.per_sample_margins`, the definition the margin losses train with.

Distributions are stored as counts on fixed bins (margins on [-2, 2], similarities on [-1, 1]), so the
histograms of several seeds add up exactly and overlays can be drawn from the JSON alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from ..checkpoint import atomic_write_text
from ..losses import per_sample_margins
from .features import input_device

MARGIN_RANGE = (-2.0, 2.0)  # margins of unit vectors
SIMILARITY_RANGE = (-1.0, 1.0)
BIN_WIDTH = 0.025
SERIES = ("i2t", "t2i", "positive")  # the three distributions of a report


class MarginSample(NamedTuple):
    """Per-pair values [N] (N = number of complete batches x batch size)."""

    i2t: torch.Tensor
    t2i: torch.Tensor
    positive: torch.Tensor


def _check(image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"margins: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape [N, D]"
        )
    if batch_size < 2:
        raise ValueError(f"margins need batches of at least 2 pairs, got batch size {batch_size}")
    if image_features.shape[0] < batch_size:
        raise ValueError(
            f"{image_features.shape[0]} pairs are fewer than one batch of {batch_size}; use a smaller --batch-size"
        )


def _margins_of(image_features: torch.Tensor, text_features: torch.Tensor, order: torch.Tensor,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) of the pairs `order` [M] (M a multiple of batch_size), cut into consecutive batches."""
    i2t, t2i = [], []
    for batch in order.view(-1, batch_size):  # [batches, batch_size]
        a, b = per_sample_margins(image_features[batch].float(), text_features[batch].float())  # [batch_size] x2
        i2t.append(a)
        t2i.append(b)
    return torch.cat(i2t), torch.cat(t2i)


def margins_in_batches(
    image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Margins of every pair within random batches of exactly `batch_size` pairs.

    The N pairs are shuffled (seeded) and cut into N // batch_size batches, as training batches are; the
    remainder (fewer than `batch_size` pairs) is left out, since a smaller batch has fewer negatives and its
    margins would not be comparable. Returns (i2t [M], t2i [M], pair index [M]) with M = whole batches * size.
    """
    _check(image_features, text_features, batch_size)
    count = image_features.shape[0]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    order = order[: count - count % batch_size]
    i2t, t2i = _margins_of(image_features, text_features, order, batch_size)
    return i2t, t2i, order


def batch_margins(image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int) -> MarginSample:
    """Margins of every pair within consecutive batches of `batch_size` pairs, and positive similarities.

    Features [N, D] must be L2-normalised, row i of each forming a pair. Only the first
    floor(N / batch_size) * batch_size pairs are used (see module docstring).
    """
    _check(image_features, text_features, batch_size)
    used = image_features.shape[0] - image_features.shape[0] % batch_size
    i2t, t2i = _margins_of(image_features, text_features, torch.arange(used), batch_size)
    positive = (image_features[:used].float() * text_features[:used].float()).sum(dim=-1)  # [N]
    return MarginSample(i2t, t2i, positive)


def describe(values: torch.Tensor) -> dict[str, float]:
    """Mean, spread, quantiles and the fraction of positive margins (pairs ranked first in their batch)."""
    v = values.double()
    quantiles = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    out: dict[str, Any] = {"mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0,
                           "min": v.min().item(), "max": v.max().item()}
    for name, q in zip(("p05", "p25", "median", "p75", "p95"), quantiles.tolist()):
        out[name] = q
    out["positive_fraction"] = (v > 0).double().mean().item()
    return out


def bin_edges(series: str) -> np.ndarray:
    """The fixed histogram edges of a series ('i2t', 't2i' or 'positive')."""
    low, high = SIMILARITY_RANGE if series == "positive" else MARGIN_RANGE
    return np.linspace(low, high, round((high - low) / BIN_WIDTH) + 1)


def margin_report(sample: MarginSample, batch_size: int) -> dict[str, object]:
    """JSON-ready summary of a sample: per series its statistics and its histogram counts on the fixed bins.

    For the margins, `frac_negative` is the share of pairs whose hardest negative beats the positive
    (in-batch retrieval errors); statistics as `describe`.
    """
    report: dict[str, object] = {"batch_size": batch_size, "pairs": int(sample.positive.numel()),
                                 "bin_width": BIN_WIDTH}  # fmt: skip
    for name in SERIES:
        values = getattr(sample, name)
        stats = describe(values)
        if name != "positive":
            stats["frac_negative"] = (values < 0).double().mean().item()
        edges = bin_edges(name)
        clipped = np.clip(values.double().numpy(), edges[0], edges[-1])  # rounding can step a hair outside
        counts, _ = np.histogram(clipped, bins=edges)
        report[name] = {**stats, "counts": counts.astype(int).tolist()}
    return report


def merge_reports(reports: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One report from several (e.g. seeds): histogram counts add up; `mean` is the pair-weighted mean."""
    if not reports:
        raise ValueError("merge_reports: no reports to merge")
    sizes = {r["batch_size"] for r in reports}
    if len(sizes) != 1:
        raise ValueError(f"merge_reports: reports computed at different batch sizes {sorted(sizes)}")
    total = sum(int(r["pairs"]) for r in reports)  # type: ignore[arg-type]
    merged: dict[str, object] = {"batch_size": sizes.pop(), "pairs": total, "bin_width": BIN_WIDTH}
    for name in SERIES:
        counts = np.sum([np.asarray(r[name]["counts"]) for r in reports], axis=0)  # type: ignore[index]
        mean = sum(float(r[name]["mean"]) * int(r["pairs"]) for r in reports) / total  # type: ignore[index]
        merged[name] = {"mean": mean, "counts": counts.astype(int).tolist()}
    return merged


@torch.no_grad()
def encode_pairs(model: torch.nn.Module, tokenizer: Callable, pairs: Dataset, batch_size: int = 256,
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (image, text) features [N, D] x2 (fp32, CPU) of an (image tensor, caption) dataset."""
    images, texts = [], []
    for start in range(0, len(pairs), batch_size):  # type: ignore[arg-type]
        items = [pairs[i] for i in range(start, min(len(pairs), start + batch_size))]  # type: ignore[arg-type]
        batch = torch.stack([img for img, _ in items]).to(input_device(model, device))  # [b, 3, H, W]
        tokens = tokenizer([cap for _, cap in items]).to(input_device(model, device))  # [b, L]
        images.append(model.encode_image(batch, normalize=True).float().cpu())
        texts.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(images), torch.cat(texts)


def diagnose_margins(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    pairs: torch.utils.data.Dataset,
    batch_size: int,
    output_dir: str | Path | None = None,
    name: str = "margins",
    device: str | torch.device | None = None,
) -> dict[str, object]:
    """Encode a dataset of (image tensor, caption) pairs and report the margins within batches of `batch_size`.

    With `output_dir`, writes `<name>.json` (the report) and `<name>.png` (its histograms).
    """
    image_features, text_features = encode_pairs(model, tokenizer, pairs, device=device)  # [N, D] x2
    report = margin_report(batch_margins(image_features, text_features, batch_size), batch_size)
    if output_dir is not None:
        output_dir = Path(output_dir)
        atomic_write_text(output_dir / f"{name}.json", json.dumps(report, indent=1))
        plot_margin_histogram(output_dir / f"{name}.png", report, title=f"In-batch margins ({name})")
    return report


def _density(report: Mapping[str, object], series: str) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, density) of one series of a report."""
    counts = np.asarray(report[series]["counts"], dtype=np.float64)  # type: ignore[index]
    edges = bin_edges(series)
    return (edges[:-1] + edges[1:]) / 2, counts / max(counts.sum(), 1.0) / np.diff(edges)


def _occupied_range(reports: Sequence[Mapping[str, object]], series: str, pad: float = 0.1) -> tuple[float, float]:
    """The x range holding every non-empty bin of `series` across reports, padded, within the bin range."""
    edges = bin_edges(series)
    total = np.sum([np.asarray(r[series]["counts"]) for r in reports], axis=0)  # type: ignore[index]
    filled = np.nonzero(total)[0]
    if len(filled) == 0:
        return float(edges[0]), float(edges[-1])
    low, high = edges[filled[0]] - pad, edges[filled[-1] + 1] + pad
    return max(float(edges[0]), float(low)), min(float(edges[-1]), float(high))


def _save(figure: Figure, path: str | Path) -> Path:
    from .plots import _save as save_png  # noqa: PLC0415 - the shared PNG writer of eval.plots

    return save_png(figure, path)


def plot_margin_histogram(path: str | Path, report: Mapping[str, object], title: str = "In-batch margins") -> Path:
    """Two panels: the image->text and text->image margin densities, and the positive-similarity density."""
    figure = Figure(figsize=(9, 3.6))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for series, label in (("i2t", "image → text"), ("t2i", "text → image")):
        _, density = _density(report, series)
        mean = float(report[series]["mean"])  # type: ignore[index]
        left.stairs(density, bin_edges(series), label=f"{label} (mean {mean:.3f})")
    left.axvline(0.0, color="grey", linestyle=":")
    left.set_xlim(*_occupied_range([report, {"i2t": report["t2i"]}], "i2t"))
    right.set_xlim(*_occupied_range([report], "positive"))
    left.set_xlabel(f"margin within batches of {report['batch_size']}")
    left.set_ylabel("density")
    left.legend(fontsize="small")
    _, density = _density(report, "positive")
    right.stairs(density, bin_edges("positive"), color="tab:green",
                 label=f"mean {float(report['positive']['mean']):.3f}")  # type: ignore[index]  # fmt: skip
    right.set_xlabel("positive similarity ⟨f_i, g_i⟩")
    right.legend(fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


OVERLAY_INLINE = 6  # lines a margin overlay labels inside its panels


def plot_margin_overlay(
    path: str | Path,
    reports: Mapping[str, Mapping[str, object]],
    title: str,
    series: str = "i2t",
) -> Path:
    """One line per model: the margin density of `series` (left) and the positive-similarity density (right)."""
    if not reports:
        raise ValueError("plot_margin_overlay: no reports to draw")
    # Up to OVERLAY_INLINE lines: a legend in each panel. More: one key beside the panels (both means per line),
    # and colours from a 20-colour map so that no two lines share one.
    many = len(reports) > OVERLAY_INLINE
    figure = Figure(figsize=(14, 4 + 0.1 * max(0, len(reports) - 14)) if many else (10, 4))
    grid = figure.add_gridspec(1, 3 if many else 2, width_ratios=[1, 1, 0.8] if many else [1, 1])
    left, right = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    palette = matplotlib.colormaps["tab20"].colors if len(reports) > 10 else [None]
    handles, keys = [], []
    for i, (label, report) in enumerate(reports.items()):
        colour = palette[i % len(palette)]  # past 20 lines colours repeat, but no line is dropped
        _, density = _density(report, series)
        mean = float(report[series]["mean"])  # type: ignore[index]
        positive = float(report["positive"]["mean"])  # type: ignore[index]
        line = left.stairs(density, bin_edges(series), label=f"{label} ({mean:.3f})", color=colour)
        _, density = _density(report, "positive")
        right.stairs(density, bin_edges("positive"), color=line.get_edgecolor(), label=f"{label} ({positive:.3f})")
        handles.append(line)
        keys.append(f"{label}: margin {mean:.3f}, pos. {positive:.3f}")
    for ax, name in ((left, series), (right, "positive")):
        ax.set_xlim(*_occupied_range([r for r in reports.values()], name))
    direction = {"i2t": "image → text", "t2i": "text → image"}.get(series, series)
    batch = next(iter(reports.values()))["batch_size"]
    left.axvline(0.0, color="grey", linestyle=":")
    left.set_xlabel(f"{direction} margin within batches of {batch}" + ("" if many else " (legend: mean)"))
    left.set_ylabel("density")
    right.set_xlabel("positive similarity ⟨f_i, g_i⟩" + ("" if many else " (legend: mean)"))
    for ax in (left, right):
        if not many:
            ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    if many:
        key = figure.add_subplot(grid[0, 2])
        key.axis("off")
        key.legend(handles, keys, loc="center left", fontsize="x-small", frameon=False, title="mean of each")
    figure.suptitle(title)
    return _save(figure, path)


__all__ = [
    "MarginSample", "margins_in_batches", "describe", "batch_margins", "margin_report", "merge_reports", "diagnose_margins", "bin_edges",
    "plot_margin_histogram", "plot_margin_overlay",
]  # fmt: skip
