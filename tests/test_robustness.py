"""Robustness: drop and effective robustness on toy accuracies with hand-derived answers; image shifts on
images whose shifted pixels are known; the synthetic world's shifted renderings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from clipforge.config import ConfigError
from clipforge.data.synthetic import (
    COLOURS, SIZES, VARIANT_SIZES, ZEROSHOT_VARIANTS, SyntheticConfig, SyntheticWorld, SyntheticZeroShot,
)
from clipforge.eval.robustness import REAL_SHIFTS, RobustnessPoint, ShiftedTransform, apply_shift, summarize


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_drop_without_baselines() -> None:
    out = summarize(RobustnessPoint(0.8, {"a": 0.6, "b": 0.7}))
    assert out["a"]["drop"] == pytest.approx(0.2) and out["b"]["drop"] == pytest.approx(0.1)
    assert out["a"]["relative_drop"] == pytest.approx(0.25)
    assert out["average"]["acc1"] == pytest.approx(0.65) and out["average"]["drop"] == pytest.approx(0.15)
    assert "effective_robustness" not in out["a"]


def test_effective_robustness_against_a_baseline_line() -> None:
    # Baselines lie exactly on logit(shift) = logit(in) - 1, so the fit is slope 1, intercept -1.
    baselines = [RobustnessPoint(p, {"a": sigmoid(logit(p) - 1)}, f"b{p}") for p in (0.3, 0.5, 0.9)]
    out = summarize(RobustnessPoint(0.7, {"a": 0.6}), baselines)
    assert out["a"]["baseline_fit"]["slope"] == pytest.approx(1.0, abs=1e-9)
    assert out["a"]["baseline_fit"]["intercept"] == pytest.approx(-1.0, abs=1e-9)
    predicted = 0.7 * math.exp(-1) / (0.7 * math.exp(-1) + 0.3)  # odds 7/3 scaled by e^-1
    assert out["a"]["effective_robustness"] == pytest.approx(0.6 - predicted, abs=1e-9)
    # a model on the baseline line has zero effective robustness, whatever its drop
    on_line = summarize(RobustnessPoint(0.5, {"a": sigmoid(-1)}), baselines)
    assert on_line["a"]["effective_robustness"] == pytest.approx(0.0, abs=1e-9)
    assert on_line["a"]["drop"] == pytest.approx(0.5 - sigmoid(-1))


def test_average_uses_the_baselines_averages() -> None:
    baselines = [RobustnessPoint(0.4, {"a": 0.2, "b": 0.4}), RobustnessPoint(0.8, {"a": 0.5, "b": 0.7})]
    out = summarize(RobustnessPoint(0.6, {"a": 0.5, "b": 0.5}), baselines)
    # two points define the line through (logit .4, logit .3) and (logit .8, logit .6)
    slope = (logit(0.6) - logit(0.3)) / (logit(0.8) - logit(0.4))
    intercept = logit(0.3) - slope * logit(0.4)
    assert out["average"]["baseline_fit"]["slope"] == pytest.approx(slope, abs=1e-9)
    assert out["average"]["effective_robustness"] == pytest.approx(
        0.5 - sigmoid(slope * logit(0.6) + intercept), abs=1e-9)


@pytest.mark.parametrize("baselines,match", [
    ([RobustnessPoint(0.5, {"a": 0.4})], "at least 2 baseline models"),
    ([RobustnessPoint(0.5, {"a": 0.4}), RobustnessPoint(0.5, {"a": 0.3})], "same in-distribution accuracy"),
    ([RobustnessPoint(0.5, {"a": 0.4}), RobustnessPoint(0.6, {"b": 0.3}, "base.json")], "base.json has no result"),
])
def test_unusable_baselines_are_clear(baselines: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        summarize(RobustnessPoint(0.7, {"a": 0.6}), baselines)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_inverted_and_grayscale_pixels() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    assert np.array_equal(pixels(apply_shift(image, "inverted")), 255 - array.astype(np.int64))
    grey = pixels(apply_shift(image, "grayscale"))
    array = array.astype(np.int64)
    luma = (array[..., 0] * 299 + array[..., 1] * 587 + array[..., 2] * 114) / 1000  # ITU-R 601-2
    assert np.abs(grey[..., 0] - luma).max() <= 1 and (grey[..., 0] == grey[..., 2]).all()


def test_low_resolution_is_blocks_of_means() -> None:
    array = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = pixels(apply_shift(Image.fromarray(array), "low-resolution"))
    means = array.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))  # [8, 8, 3]: one value per 4x4 block
    assert np.abs(out - np.kron(means, np.ones((4, 4, 1)))).max() <= 1


def test_blur_and_sketch_on_an_edge() -> None:
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, 16:] = 255  # black left half, white right half
    blurred = pixels(apply_shift(Image.fromarray(array), "blur"))
    assert blurred[:, 2].max() == 0 and blurred[:, 29].min() == 255  # far from the edge: unchanged
    assert 0 < blurred[16, 15, 0] < 128 < blurred[16, 16, 0] < 255  # at the edge: a ramp
    sketch = pixels(apply_shift(Image.fromarray(array), "sketch"))[..., 0]  # [H, W]
    assert sketch[4:28, 15:17].min(axis=1).max() < 64  # every row has a dark pixel at the edge
    assert sketch[4:28, :13].min() == 255 and sketch[4:28, 19:].min() == 255  # white paper elsewhere
    flat = pixels(apply_shift(Image.new("RGB", (32, 32), (90, 30, 200)), "sketch"))
    assert (flat == 255).all()  # no edges, no lines


def test_shifted_transform_shapes_and_repr() -> None:
    for shift in REAL_SHIFTS:
        tensor = ShiftedTransform(32, shift)(Image.new("RGB", (60, 40), (10, 200, 30)))
        assert tensor.shape == (3, 32, 32)
    assert repr(ShiftedTransform(32, "blur")) != repr(ShiftedTransform(32, "sketch"))  # distinct cache keys
    with pytest.raises(ConfigError, match="unknown shift 'fog'"):
        ShiftedTransform(32, "fog")


def object_mask(image: Image.Image, colour: str) -> np.ndarray:
    """Pixels within 40 of the object's colour in every channel."""
    return (np.abs(pixels(image) - np.array(COLOURS[colour])) < 40).all(axis=2)


def test_synthetic_variants_draw_the_same_scene_shifted() -> None:
    world = SyntheticWorld(SyntheticConfig(image_size=64))
    combos = [("red", "square"), ("blue", "circle"), ("green", "heart")]
    for index in range(6):
        colour = combos[index % 3][0]
        images = {v: world.zeroshot_example(index, combos, v) for v in ZEROSHOT_VARIANTS}
        assert len({label for _, label in images.values()}) == 1  # same class in every variant
        default = object_mask(images["default"][0], colour).sum()
        outline = object_mask(images["outline"][0], colour).sum()
        assert 0 < outline < 0.8 * default  # a contour covers less than the filled shape
        sized = object_mask(images["sizes"][0], colour).sum()
        size = world.scene(2, index, combos=[combos[index % 3]], n_objects=1)[0][0].size
        expected_ratio = (VARIANT_SIZES[size] / SIZES[size]) ** 2
        assert sized / default == pytest.approx(expected_ratio, rel=0.35)
        background = pixels(images["backgrounds"][0])
        corner = background[:6, :6].reshape(-1, 3)
        assert (np.ptp(corner, axis=1) <= 1).all()  # grey: the colour words still belong to the object
    data = SyntheticZeroShot(world, combos, per_class=2, variant="outline", offset=4)
    assert data.label(0) == world.classnames.index("blue circle")  # scene 4 shows combos[4 % 3]
    assert data[0][1] == data.label(0)


def test_unknown_synthetic_variant_is_clear() -> None:
    world = SyntheticWorld(SyntheticConfig(image_size=32))
    with pytest.raises(ConfigError, match="unknown synthetic variant 'rotated'"):
        SyntheticZeroShot(world, world.seen, 1, variant="rotated")
