"""Robustness to distribution shift: accuracy on shifted copies of a test set, the drop, effective robustness.

Radford et al. (2021, sec. 3.3) compare models by *effective robustness* (Taori et al. 2020): how much better a
model does under shift than baseline models with the same in-distribution accuracy. Baselines trace a line in
logit space (`metrics.fit_baseline`); a model's effective robustness is its shifted accuracy above that line.
With no baselines only the drop is defined, and that is all we report then.

Shifts of real images are applied at the model's resolution, after the evaluation resize and centre crop, so
that a shift means the same thing for a 28-pixel Fashion-MNIST item and a 1000-pixel drawing:

| shift          | what the model sees                                                       |
|----------------|---------------------------------------------------------------------------|
| grayscale      | luminance only                                                            |
| blur           | Gaussian blur, radius 1/32 of the side (2 pixels at 64)                   |
| low-resolution | shrunk to 1/4 of the side and enlarged back with nearest-neighbour pixels |
| sketch         | edge map as dark lines on white (the ImageNet-Sketch idea)                |
| inverted       | negative image                                                            |

The embedded synthetic world has its own shifts, drawn rather than filtered (`data.synthetic.ZEROSHOT_VARIANTS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ..config import ConfigError
from ..transforms import center_crop, normalize, resize_shorter, to_rgb, to_tensor
from .metrics import _logit, effective_robustness, fit_baseline, robustness_drop

REAL_SHIFTS: tuple[str, ...] = ("grayscale", "blur", "low-resolution", "sketch", "inverted")


def apply_shift(image: Image.Image, shift: str) -> Image.Image:
    """The RGB image `image` (already at the model's resolution) under `shift` (one of REAL_SHIFTS)."""
    side = min(image.size)
    if shift == "grayscale":
        return ImageOps.grayscale(image).convert("RGB")
    if shift == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=side / 32))
    if shift == "low-resolution":
        small = image.resize((max(1, image.width // 4), max(1, image.height // 4)), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    if shift == "sketch":
        return sketch(image)
    if shift == "inverted":
        return ImageOps.invert(image)
    raise ConfigError(f"unknown shift '{shift}' (expected one of {', '.join(REAL_SHIFTS)})")


def sketch(image: Image.Image) -> Image.Image:
    """Dark lines on white where the luminance changes, like a pencil sketch of the image."""
    grey = np.pad(np.asarray(ImageOps.grayscale(image), dtype=np.float64), 1, mode="edge")  # [H+2, W+2]
    gx = grey[1:-1, 2:] - grey[1:-1, :-2]  # [H, W] central differences; the padding adds no border edges
    gy = grey[2:, 1:-1] - grey[:-2, 1:-1]
    magnitude = np.hypot(gx, gy)
    # the 99th percentile maps to a full black line, so faint and strong edge maps end up comparable
    scale = np.percentile(magnitude, 99)
    scale = scale if scale > 0 else magnitude.max()
    lines = np.clip(magnitude / scale, 0, 1) if scale > 0 else np.zeros_like(magnitude)
    paper = np.round(255 * (1 - lines)).astype(np.uint8)
    return Image.fromarray(paper, mode="L").convert("RGB")


class ShiftedTransform:
    """The evaluation preprocessing (RGB, resize the shorter side, centre crop) with a shift before normalising."""

    def __init__(self, size: int, shift: str) -> None:
        if shift not in REAL_SHIFTS:
            raise ConfigError(f"unknown shift '{shift}' (expected one of {', '.join(REAL_SHIFTS)})")
        self.size, self.shift = size, shift

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = center_crop(resize_shorter(to_rgb(image), self.size), self.size)
        return normalize(to_tensor(apply_shift(image, self.shift)))

    def __repr__(self) -> str:  # part of the features-cache key
        return f"ShiftedTransform(size={self.size}, shift={self.shift})"


@dataclass(frozen=True)
class RobustnessPoint:
    """One model's top-1 accuracy in distribution and on each shifted variant."""

    acc_in: float
    acc_shift: Mapping[str, float]
    name: str = ""

    @property
    def acc_average(self) -> float:
        """Mean shifted accuracy over the variants (the CLIP paper averages its 7 natural shifts)."""
        return sum(self.acc_shift.values()) / len(self.acc_shift)


def point_from_results(results: Mapping[str, Any], name: str = "") -> RobustnessPoint:
    """The RobustnessPoint of a `clipforge eval robustness` results dict."""
    try:
        acc_in = float(results["in_distribution"]["acc1"])
        shifts = {v: float(r["acc1"]) for v, r in results["variants"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        where = name or "results"
        raise ConfigError(f"{where}: not the output of 'clipforge eval robustness' (missing {exc})") from None
    return RobustnessPoint(acc_in, shifts, name)


def load_point(path: str | Path) -> RobustnessPoint:
    """A baseline model's accuracies, from the JSON that `clipforge eval robustness --output` wrote."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return point_from_results(results, str(path))


def _check_baselines(model: RobustnessPoint, baselines: Sequence[RobustnessPoint]) -> None:
    if len(baselines) < 2:
        raise ConfigError(f"effective robustness needs at least 2 baseline models to fit a line, got {len(baselines)}")
    for base in baselines:
        missing = [v for v in model.acc_shift if v not in base.acc_shift]
        if missing:
            raise ConfigError(f"baseline {base.name or '?'} has no result for variant '{missing[0]}'")
    spread = _logit(torch.tensor([b.acc_in for b in baselines], dtype=torch.float64))
    if float(spread.max() - spread.min()) < 1e-6:
        raise ConfigError("the baseline models all have the same in-distribution accuracy; no line can be fitted")


def summarize(model: RobustnessPoint, baselines: Sequence[RobustnessPoint] = ()) -> dict[str, Any]:
    """Per variant and on average: shifted accuracy, drop, relative drop and, given >= 2 baselines, the
    effective robustness against their logit-linear fit (with the fit's slope and intercept)."""
    if not model.acc_shift:
        raise ConfigError("robustness needs at least one shifted variant")
    if baselines:
        _check_baselines(model, baselines)
    out: dict[str, Any] = {}
    names = [*model.acc_shift, "average"]
    for name in names:
        acc = model.acc_average if name == "average" else model.acc_shift[name]
        drop = robustness_drop(model.acc_in, acc)
        entry: dict[str, Any] = {"acc1": acc, "drop": drop,
                                 "relative_drop": drop / model.acc_in if model.acc_in > 0 else math.nan}
        if baselines:
            shifted = [b.acc_average if name == "average" else b.acc_shift[name] for b in baselines]
            slope, intercept = fit_baseline([b.acc_in for b in baselines], shifted)
            entry["effective_robustness"] = effective_robustness(model.acc_in, acc, (slope, intercept))
            entry["baseline_fit"] = {"slope": slope, "intercept": intercept}
        out[name] = entry
    return out
