"""WiSE-FT (Wortsman et al. 2022): the weight-space interpolation (1 - alpha) * A + alpha * B of a zero-shot model A
and its fine-tuned copy B, and a sweep over alpha plotted as accuracy on the fine-tuning task against accuracy on
what the model knew before.

Interpolation runs in float64 and is rounded once to float32, so alpha = 0 and 1 return A and B bitwise and
alpha = 0.5 is the correctly rounded average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ConfigError
from ..formats.infer import flatten
from ..models.clip import CLIP


def check_same_architecture(a: CLIP, b: CLIP, names: tuple[str, str] = ("A", "B")) -> None:
    """ConfigError naming the first architecture key (or tensor) in which the two models differ."""
    fa, fb = flatten(a.config), flatten(b.config)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            raise ConfigError(f"merge: models {names[0]} and {names[1]} have different architectures "
                              f"({key}: {fa.get(key)!r} vs {fb.get(key)!r})")
    sa, sb = a.state_dict(), b.state_dict()
    for key in sorted(set(sa) | set(sb)):
        if key not in sa or key not in sb or sa[key].shape != sb[key].shape:
            raise ConfigError(f"merge: models {names[0]} and {names[1]} differ in tensor '{key}'")


@torch.no_grad()
def interpolate(a: CLIP, b: CLIP, alpha: float) -> CLIP:
    """A new model with weights (1 - alpha) * A + alpha * B (architecture checked; alpha in [0, 1]).

    Integer buffers (BatchNorm's batch counters) cannot be averaged: they come from the nearer endpoint."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"merge: --alpha {alpha}: expected a value in [0, 1] (0 is model A, 1 is model B)")
    check_same_architecture(a, b)
    from ..factory import build_model  # noqa: PLC0415

    out = build_model(a.config)
    sb = b.state_dict()
    merged = {}
    for key, wa in a.state_dict().items():
        wb = sb[key]
        if wa.is_floating_point():
            mixed = (1.0 - alpha) * wa.double() + alpha * wb.double()
            merged[key] = mixed.to(wa.dtype)
        else:
            merged[key] = (wb if alpha >= 0.5 else wa).clone()
    out.load_state_dict(merged)
    return out.eval()


def sweep(a: CLIP, b: CLIP, alphas: Sequence[float], evaluate: Callable[[CLIP], dict[str, float]]) -> list[dict]:
    """`evaluate` of the interpolated model at every alpha: [{"alpha": a, **metrics}, ...]."""
    return [{"alpha": float(alpha), **evaluate(interpolate(a, b, float(alpha)))} for alpha in alphas]


def plot_sweep(path: str | Path, points: Sequence[dict], x_key: str, y_key: str, x_label: str, y_label: str,
               title: str) -> Path:
    """Each alpha as a point (x: accuracy on what the model knew, y: on the fine-tuning task), joined in order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from ..checkpoint import atomic_write  # noqa: PLC0415

    figure = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    xs, ys = [p[x_key] for p in points], [p[y_key] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"α={p['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
