"""Figures of evaluation results, written as PNG files (matplotlib's Agg canvas; pyplot's global state unused).

- `plot_zero_shot_vs_kshot`: few-shot linear-probe accuracy against k with the zero-shot accuracy as a level,
  and the k at which the probe catches up (the CLIP paper's figure where zero-shot matches a k-shot probe).
- `plot_per_class_accuracy`: one bar per class, sorted, with the mean per-class recall marked.
- `plot_recall_at_k`: retrieval recall@k curves for both directions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    return path


def matching_shots(zero_shot: float, shots: Sequence[int], means: Sequence[float]) -> float | None:
    """The k (log-linearly interpolated between measured shots) where the probe first reaches zero-shot
    accuracy; None when it never does within the measured range."""
    pairs = sorted(zip(shots, means))
    if pairs and pairs[0][1] >= zero_shot:
        return float(pairs[0][0])
    for (k0, a0), (k1, a1) in zip(pairs, pairs[1:]):
        if a0 < zero_shot <= a1:
            t = (zero_shot - a0) / (a1 - a0)
            return math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
    return None


def plot_zero_shot_vs_kshot(
    path: str | Path,
    zero_shot: float,
    shots: Sequence[int],
    means: Sequence[float],
    stds: Sequence[float] | None = None,
    title: str = "Zero-shot vs few-shot linear probe",
    metric: str = "top-1 accuracy",
) -> Path:
    """Few-shot probe accuracy (mean ± std over draws) against shots per class, with zero-shot as a level."""
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.errorbar(list(shots), list(means), yerr=list(stds) if stds is not None else None, marker="o",
                capsize=3, label="linear probe (k shots per class)")  # fmt: skip
    ax.axhline(zero_shot, color="tab:red", linestyle="--", label=f"zero-shot ({zero_shot:.1%})")
    match = matching_shots(zero_shot, shots, means)
    if match is not None:
        fewest = min(shots)
        label = (f"the {fewest}-shot probe already beats zero-shot" if match == fewest
                 else f"probe matches zero-shot at k≈{match:.1f}")
        ax.axvline(match, color="grey", linestyle=":", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(shots), [str(k) for k in shots])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def plot_per_class_accuracy(
    path: str | Path, classnames: Sequence[str], recalls: Sequence[float], title: str = "Per-class accuracy"
) -> Path:
    """Horizontal bars of each class's top-1 recall, best first; NaN (absent) classes are left out."""
    pairs = sorted(((r, c) for c, r in zip(classnames, recalls) if r == r), reverse=True)  # r == r drops NaN
    if not pairs:
        raise ValueError("plot_per_class_accuracy: no class has a recall value")
    figure = Figure(figsize=(6, max(2.5, 0.25 * len(pairs) + 1)))
    ax = figure.add_subplot()
    ax.barh([c for _, c in pairs], [r for r, _ in pairs], color="tab:blue")
    mean = sum(r for r, _ in pairs) / len(pairs)
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean per-class recall {mean:.1%}")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 recall")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    return _save(figure, path)


def plot_recall_at_k(path: str | Path, metrics: Mapping[str, float], title: str = "Retrieval recall@k") -> Path:
    """Recall@k curves from a `retrieval_metrics` dict (`image_retrieval_recall@k`, `text_retrieval_recall@k`)."""
    figure = Figure(figsize=(5, 4))
    ax = figure.add_subplot()
    drawn, ks = 0, set()
    for prefix, label in (("image_retrieval_recall@", "text → image"), ("text_retrieval_recall@", "image → text")):
        points = sorted((int(key[len(prefix) :]), value) for key, value in metrics.items() if key.startswith(prefix))
        if points:
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=label)
            drawn += 1
            ks.update(k for k, _ in points)
    if not drawn:
        raise ValueError("plot_recall_at_k: no image_retrieval_recall@k or text_retrieval_recall@k entries")
    ax.set_xscale("log")
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)
