"""The embedded synthetic world: determinism, held-out combinations, captions, options."""

import numpy as np
import pytest
import torch

from clipforge.config import ConfigError, from_dict
from clipforge.data.synthetic import (
    COLOUR_JITTER, COLOURS, SHAPES, STREAM_EVAL, STREAM_TRAIN, STREAM_VALIDATION, SyntheticConfig, SyntheticPairs,
    SyntheticWorld, SyntheticZeroShot, all_classnames, default_heldout, render,
)


def test_world_has_at_least_eight_colours_and_shapes():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 8
    assert len(all_classnames()) == len(COLOURS) * len(SHAPES)


def test_default_heldout_uses_each_colour_and_shape_once():
    pairs = [c.split() for c in default_heldout()]
    assert sorted(c for c, _ in pairs) == sorted(COLOURS)
    assert sorted(s for _, s in pairs) == sorted(SHAPES)


def test_pairs_are_a_pure_function_of_seed_and_index():
    world = SyntheticWorld(SyntheticConfig(seed=3))
    again = SyntheticWorld(SyntheticConfig(seed=3))
    other = SyntheticWorld(SyntheticConfig(seed=4))
    for i in (0, 17, 10**8):
        (a_img, a_cap), (b_img, b_cap) = world.pair(STREAM_TRAIN, i), again.pair(STREAM_TRAIN, i)
        assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert [world.pair(STREAM_TRAIN, i)[1] for i in range(20)] != [other.pair(STREAM_TRAIN, i)[1] for i in range(20)]
    assert world.pair(STREAM_TRAIN, 5)[1] != world.pair(STREAM_EVAL, 5)[1] or \
        not np.array_equal(np.asarray(world.pair(STREAM_TRAIN, 5)[0]), np.asarray(world.pair(STREAM_EVAL, 5)[0]))


def test_heldout_combinations_never_appear_in_training_scenes_or_captions():
    cfg = SyntheticConfig()
    world = SyntheticWorld(cfg)
    heldout = set(cfg.heldout)
    for i in range(2000):
        objects, _ = world.scene(STREAM_TRAIN, i)
        assert not {f"{o.colour} {o.shape}" for o in objects} & heldout
        caption = world.pair(STREAM_TRAIN, i)[1]
        for combo in heldout:
            colour, shape = combo.split()
            assert f"{colour} {shape}" not in caption and f"{shape} in {colour}" not in caption


def names(obj, caption):
    return f"{obj.colour} {obj.shape}" in caption or f"{obj.shape} in {obj.colour}" in caption


def test_captions_name_objects_and_are_sometimes_incomplete():
    world = SyntheticWorld(SyntheticConfig(omit_prob=0.5))
    incomplete = 0
    for i in range(500):
        objects, rng = world.scene(STREAM_TRAIN, i)
        caption = world.describe(objects, rng)
        named = sum(names(o, caption) for o in objects)
        assert named >= 1
        incomplete += named < len(objects)
    assert incomplete > 50
    complete_world = SyntheticWorld(SyntheticConfig(omit_prob=0.0))
    for i in range(200):
        objects, rng = complete_world.scene(STREAM_TRAIN, i)
        caption = complete_world.describe(objects, rng)
        assert all(names(o, caption) for o in objects)


def test_caption_noise_replaces_the_requested_fraction():
    clean = SyntheticWorld(SyntheticConfig(caption_noise=0.0))
    noisy = SyntheticWorld(SyntheticConfig(caption_noise=0.4))
    changed = sum(clean.pair(STREAM_TRAIN, i)[1] != noisy.pair(STREAM_TRAIN, i)[1] for i in range(600))
    assert 0.3 * 600 < changed < 0.5 * 600


def test_zeroshot_set_labels_and_tensors():
    world = SyntheticWorld(SyntheticConfig())
    data = SyntheticZeroShot(world, world.heldout, per_class=2)
    assert len(data) == 16
    labels = {data[i][1] for i in range(len(data))}
    assert labels == {world.classnames.index(" ".join(c)) for c in world.heldout}
    image, _ = data[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    pairs = SyntheticPairs(world, length=4)
    assert len(pairs) == 4 and isinstance(pairs[0][1], str)


@pytest.mark.parametrize("key,value,match", [
    ("caption_noise", 1.5, "caption_noise"),
    ("single_attribute_prob", -0.1, "single_attribute_prob"),
    ("random_colour_prob", 1.2, "random_colour_prob"),
    ("shape_twin_prob", 2.0, "shape_twin_prob"),
    ("train_background_grey", [200, 100], "train_background_grey"),
    ("train_background_grey", [-5, 100], "train_background_grey"),
    ("heldout", ["red dragon"], "heldout"),
    ("max_objects", 5, "max_objects"),
    ("colour", "red", "unknown config key 'colour'"),
])
def test_bad_synthetic_config_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(SyntheticConfig, {key: value})


def test_some_phrases_are_shape_first():
    world = SyntheticWorld(SyntheticConfig(reorder_prob=0.5))
    captions = [world.pair(STREAM_TRAIN, i)[1] for i in range(200)]
    shape_first = [f"{s} in {c}" for s in SHAPES for c in COLOURS]
    assert any(p in c for c in captions for p in shape_first)
    plain = [SyntheticWorld(SyntheticConfig(reorder_prob=0.0)).pair(STREAM_TRAIN, i)[1] for i in range(200)]
    assert not any(p in c for c in plain for p in shape_first)


def _attributes_named(caption: str) -> tuple[bool, bool]:
    """(names a colour, names one of the shapes) for a one-object caption."""
    words = caption.rstrip(".").split()
    return any(c in words for c in COLOURS), any(s in words for s in SHAPES)


def test_single_attribute_phrases_name_the_shape_or_the_colour_at_the_set_rate():
    n, p = 2000, 0.3
    world = SyntheticWorld(SyntheticConfig(single_attribute_prob=p))
    kinds = {"both": 0, "shape": 0, "colour": 0}
    for i in range(n):
        objects, rng = world.scene(STREAM_TRAIN, i, n_objects=1)
        caption = world.describe(objects, rng)
        colour, shape = _attributes_named(caption)
        assert colour or shape, caption
        if colour and shape:
            kinds["both"] += 1
        elif shape:
            kinds["shape"] += 1
        else:
            assert f"{objects[0].colour} shape" in caption, caption
            kinds["colour"] += 1
    # binomial counts: a 5-sigma band around n*p, and each one-attribute kind about half of them
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(kinds["shape"] + kinds["colour"] - n * p) < 5 * sigma, kinds
    half = (n * p) / 2
    assert abs(kinds["shape"] - half) < 5 * (n * p * 0.25) ** 0.5, kinds


def test_no_single_attribute_phrases_by_default_nor_in_complete_captions():
    default, every = SyntheticWorld(SyntheticConfig()), SyntheticWorld(SyntheticConfig(single_attribute_prob=1.0))
    for i in range(300):
        objects, rng = default.scene(STREAM_TRAIN, i, n_objects=1)
        assert _attributes_named(default.describe(objects, rng)) == (True, True)
        objects, rng = every.scene(STREAM_EVAL, i, n_objects=1)
        assert _attributes_named(every.describe(objects, rng, complete=True)) == (True, True)


def test_random_colour_objects_are_named_by_their_shape_alone_at_the_set_rate():
    n, p = 2000, 0.3
    world = SyntheticWorld(SyntheticConfig(random_colour_prob=p))
    recoloured = 0
    for i in range(n):
        objects, rng = world.scene(STREAM_TRAIN, i, n_objects=1, random_colour_prob=p)
        colour, shape = _attributes_named(world.describe(objects, rng))
        if objects[0].rgb is not None:
            recoloured += 1
            assert (colour, shape) == (False, True)
            assert tuple(objects[0].rgb) not in COLOURS.values()
        else:
            assert (colour, shape) == (True, True)
    assert abs(recoloured - n * p) < 5 * (n * p * (1 - p)) ** 0.5, recoloured


def test_random_colours_stay_off_every_heldout_combination_after_jitter():
    world = SyntheticWorld(SyntheticConfig(random_colour_prob=1.0))
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float64)  # [8, 3]
    heldout = {tuple(c.split()) for c in default_heldout()}
    steps = np.linspace(-COLOUR_JITTER, COLOUR_JITTER, 5)
    jitters = np.stack(np.meshgrid(steps, steps, steps), axis=-1).reshape(-1, 3)  # [125, 3]
    near_heldout_colour = 0
    for i in range(400):
        objects, _ = world.scene(STREAM_TRAIN, i, random_colour_prob=1.0)
        for obj in objects:
            rendered = np.clip(np.array(obj.rgb) + jitters, 0, 255)  # [125, 3]: every jitter the render may draw
            nearest = np.linalg.norm(rendered[:, None] - palette[None], axis=-1).argmin(axis=1)  # [125]
            assert all((names[k], obj.shape) not in heldout for k in nearest), (obj.rgb, obj.shape)
            # colours near a held-out colour still occur, on the other shapes
            near = names[int(np.linalg.norm(palette - np.array(obj.rgb), axis=-1).argmin())]
            near_heldout_colour += any(c == near for c, _ in heldout)
    assert near_heldout_colour > 0


def test_a_random_colour_object_is_drawn_in_its_colour():
    world = SyntheticWorld(SyntheticConfig(random_colour_prob=1.0))
    checked = 0
    for i in range(200):
        objects, rng = world.scene(STREAM_TRAIN, i, n_objects=1, random_colour_prob=1.0)
        obj = objects[0]
        if obj.shape not in ("circle", "square"):
            continue
        image = np.asarray(render(objects, rng, 64)).astype(int)  # [64, 64, 3]
        centre = image[int(obj.y * 64), int(obj.x * 64)]
        assert np.abs(centre - np.array(obj.rgb)).max() <= COLOUR_JITTER, (centre, obj.rgb)
        checked += 1
    assert checked > 20


def test_random_colours_touch_the_training_stream_only():
    plain, recolour = SyntheticWorld(SyntheticConfig()), SyntheticWorld(SyntheticConfig(random_colour_prob=1.0))
    for stream in (STREAM_EVAL, STREAM_VALIDATION):
        for i in range(20):
            (a_img, a_cap), (b_img, b_cap) = plain.pair(stream, i), recolour.pair(stream, i)
            assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    seen = plain.seen
    a, b = SyntheticZeroShot(plain, seen, per_class=1), SyntheticZeroShot(recolour, seen, per_class=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert any(recolour.pair(STREAM_TRAIN, i)[1] != plain.pair(STREAM_TRAIN, i)[1] for i in range(20))


def _median_grey(image) -> float:
    """The median grey level of an image: its background's, as objects cover well under half of it."""
    return float(np.median(np.asarray(image, dtype=np.float64).mean(axis=2)))


def test_training_background_range_sets_the_background_brightness():
    # a background's grey level is drawn from the range, then tinted by at most +-18 per channel and ramped by a
    # gradient whose centre moves it by at most 50 * 1.21 (a third of backgrounds): medians stay near the range
    n = 30
    def medians(grey):
        world = SyntheticWorld(SyntheticConfig(train_background_grey=grey))
        return np.array([_median_grey(world.pair(STREAM_TRAIN, i)[0]) for i in range(n)])
    dark, default, light = medians((20.0, 20.0)), medians((70.0, 190.0)), medians((235.0, 235.0))
    assert dark.max() < 20 + 18 + 61 and light.min() > 235 - 18 - 61
    assert dark.mean() < 45 and light.mean() > 205 and 90 < default.mean() < 160
    assert (dark < default).all() and (default < light).all()


def test_training_background_range_touches_the_training_stream_only():
    plain = SyntheticWorld(SyntheticConfig())
    wide = SyntheticWorld(SyntheticConfig(train_background_grey=(10.0, 245.0)))
    for stream in (STREAM_EVAL, STREAM_VALIDATION):
        for i in range(20):
            (a_img, a_cap), (b_img, b_cap) = plain.pair(stream, i), wide.pair(stream, i)
            assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    a, b = SyntheticZeroShot(plain, plain.heldout, per_class=1), SyntheticZeroShot(wide, wide.heldout, per_class=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    # same scenes and captions in training, only the backgrounds differ
    for i in range(20):
        (a_img, a_cap), (b_img, b_cap) = plain.pair(STREAM_TRAIN, i), wide.pair(STREAM_TRAIN, i)
        assert a_cap == b_cap and not np.array_equal(np.asarray(a_img), np.asarray(b_img))


def _shape_words(caption: str) -> list[str]:
    return [w.strip(".,") for w in caption.split() if w.strip(".,") in SHAPES]


def test_shape_twins_differ_from_the_pair_before_in_one_named_shape_only():
    plain = SyntheticWorld(SyntheticConfig())
    world = SyntheticWorld(SyntheticConfig(shape_twin_prob=1.0))
    heldout, twins = set(world.cfg.heldout), 0
    for i in range(0, 200, 2):
        (a_img, a_cap), (b_img, b_cap) = world.pair(STREAM_TRAIN, i), world.pair(STREAM_TRAIN, i + 1)
        assert plain.pair(STREAM_TRAIN, i)[1] == a_cap  # even pairs are the default stream's
        if b_cap == plain.pair(STREAM_TRAIN, i + 1)[1]:
            continue  # no object of that scene could change shape (rare): the default pair
        twins += 1
        a_words, b_words = a_cap.split(), b_cap.split()
        changed = [(x, y) for x, y in zip(a_words, b_words) if x != y]
        # one word differs, a shape for a shape (an "a"/"an" in front of it may follow the new word)
        assert len(a_words) == len(b_words) and 1 <= len(changed) <= 2
        assert sum(1 for x, y in changed if x.strip(".,") in SHAPES and y.strip(".,") in SHAPES) == 1
        for combo in heldout:
            colour, shape = combo.split()
            assert f"{colour} {shape}" not in b_cap and f"{shape} in {colour}" not in b_cap
        a, b = np.asarray(a_img).astype(int), np.asarray(b_img).astype(int)
        differs = np.abs(a - b).sum(axis=2) > 0  # [S, S]
        assert 0 < differs.mean() < 0.3  # the same background and other objects: only one object's pixels change
    assert twins >= 90


def test_shape_twins_follow_the_set_rate_and_touch_the_training_stream_only():
    plain = SyntheticWorld(SyntheticConfig())
    world = SyntheticWorld(SyntheticConfig(shape_twin_prob=0.5))
    changed = [plain.pair(STREAM_TRAIN, i)[1] != world.pair(STREAM_TRAIN, i)[1] for i in range(1, 801, 2)]
    assert 0.42 < np.mean(changed) < 0.58  # 400 odd pairs at p = 0.5 (a few scenes cannot change)
    for stream in (STREAM_EVAL, STREAM_VALIDATION):
        for i in range(1, 40, 2):
            (a_img, a_cap), (b_img, b_cap) = plain.pair(stream, i), world.pair(stream, i)
            assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
