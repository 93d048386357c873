"""The embedded default data: a procedural world of coloured shapes with captions.

Every sample is a pure function of (seed, stream, index), so the data set is infinite, costs no disk and is
identical on every machine. A set of (colour, shape) combinations is held out of training images entirely,
so zero-shot evaluation can measure composition on combinations the model has never seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import ConfigError
from ..transforms import normalize, to_tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 40),
    "purple": (140, 50, 185),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")
SIZES: dict[str, float] = {"small": 0.14, "large": 0.22}  # object radius as a fraction of the image side
COLOUR_JITTER = 14  # each channel of an object's colour moves by up to this much in every image
BACKGROUND_GREY = (70.0, 190.0)  # the range a background's mean grey level is drawn from, before its tint

# Streams keep training, evaluation and caption-noise draws independent for the same index.
STREAM_TRAIN, STREAM_EVAL, STREAM_ZEROSHOT, STREAM_NOISE = 0, 1, 2, 3
STREAM_VALIDATION = 4  # the validation pairs that plateau stopping (train.early_stop) measures
STREAM_TWIN = 5  # the draws that make a training pair the shape twin of the one before it (shape_twin_prob)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}.",
    "a picture of {}.",
    "an image of {}.",
    "a photo of {}.",
    "a drawing of {}.",
    "a rendering of {}.",
    "there is {}.",
    "this image shows {}.",
    "a scene with {}.",
    "{} on a plain background.",
    "a simple picture showing {}.",
    "i can see {}.",
    "a small image containing {}.",
    "an illustration of {}.",
)


def default_heldout() -> tuple[str, ...]:
    """One combination per colour and per shape (a permutation), so every word is still seen in training."""
    colours = list(COLOURS)
    return tuple(f"{colours[i]} {SHAPES[(3 * i + 1) % len(SHAPES)]}" for i in range(len(colours)))


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic world. `heldout` lists 'colour shape' combinations never drawn in training images."""

    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    object_count_weights: tuple[float, ...] = (0.6, 0.25, 0.15)
    heldout: tuple[str, ...] = field(default_factory=default_heldout)
    caption_noise: float = 0.0  # fraction of captions replaced by the caption of a random other image
    omit_prob: float = 0.25  # probability that a caption leaves out some of the objects
    attribute_prob: float = 0.3  # probability of naming an object's size, and separately its position
    reorder_prob: float = 0.35  # probability of a shape-first phrase ("a circle in red")
    # probability that an object of a training caption is named by one attribute only, its shape ("a ring") or
    # its colour ("a black shape"), half each; 0 draws no random number, so the default captions are unchanged
    single_attribute_prob: float = 0.0
    # probability that an object of a training image is drawn in a random colour off the palette and named by its
    # shape alone ("a ring"); the colour is redrawn unless it stays nearer to another palette colour than to any
    # colour held out for that shape, so no held-out combination appears. 0 draws no random number.
    random_colour_prob: float = 0.0
    # the range of a training background's grey level; evaluation images always use BACKGROUND_GREY. A wider
    # range puts every object colour both above and below its background, so a shape's edges are not tied to one
    # contrast polarity. The default draws exactly the evaluation range, so default streams are unchanged.
    train_background_grey: tuple[float, float] = BACKGROUND_GREY
    # probability that an odd-indexed training pair is the "shape twin" of the pair before it: the same scene,
    # rendering and caption wording with one named object's shape changed to another shape seen in its colour.
    # A batch reads consecutive indices, so each twin meets its original as an in-batch hard negative that
    # differs in one shape alone (NegCLIP-style hard negatives, as whole pairs). 0 draws no random number.
    shape_twin_prob: float = 0.0

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("caption_noise", "omit_prob", "attribute_prob", "reorder_prob", "single_attribute_prob",
                     "random_colour_prob", "shape_twin_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"config key '{p}{name}': expected a fraction in [0, 1], got {value}")
        if not 1 <= self.max_objects <= 3:
            raise ConfigError(f"config key '{p}max_objects': expected 1 to 3, got {self.max_objects}")
        weights = self.object_count_weights
        usable = len(weights) >= self.max_objects and all(w >= 0 for w in weights)
        if not (usable and sum(weights[: self.max_objects]) > 0):
            raise ConfigError(f"config key '{p}object_count_weights': expected {self.max_objects} non-negative weights, "
                              f"not all zero, got {list(weights)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"config key '{p}seed': expected an integer in [0, 2**32), got {self.seed}")
        if self.image_size < 16:
            raise ConfigError(f"config key '{p}image_size': expected at least 16, got {self.image_size}")
        for combo in self.heldout:
            parse_combo(combo, f"{p}heldout")
        low, high = self.train_background_grey
        if not 0.0 <= low <= high <= 255.0:
            raise ConfigError(f"config key '{p}train_background_grey': expected [low, high] with "
                              f"0 <= low <= high <= 255, got {list(self.train_background_grey)}")


def parse_combo(text: str, key: str = "heldout") -> tuple[str, str]:
    parts = text.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise ConfigError(
            f"config key '{key}': {text!r} is not 'colour shape' with colour in {list(COLOURS)} "
            f"and shape in {list(SHAPES)}"
        )
    return parts[0], parts[1]


def all_classnames() -> list[str]:
    """Every 'colour shape' combination, the zero-shot label space (8 x 8 = 64 classes)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float
    angle: float  # degrees
    rgb: tuple[int, int, int] | None = None  # an off-palette colour (random_colour_prob): named by shape alone

    @property
    def position(self) -> str:
        horizontal = "left" if self.x < 0.38 else "right" if self.x > 0.62 else ""
        vertical = "top" if self.y < 0.38 else "bottom" if self.y > 0.62 else ""
        if horizontal and vertical:
            return f"at the {vertical} {horizontal}"
        if horizontal:
            return f"on the {horizontal}"
        if vertical:
            return f"at the {vertical}"
        return "in the middle"


def _shape_points(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a unit shape around the origin, scaled and rotated."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        a, b = 0.32, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 17.0
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 17.0
        pts = list(zip(xs.tolist(), (ys + 0.1).tolist()))
    else:  # pragma: no cover - circles and rings are drawn as ellipses
        raise ValueError(shape)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(radius * (x * c - y * s), radius * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, size: int, grey_range: tuple[float, float] = BACKGROUND_GREY) -> np.ndarray:
    """A smooth low-saturation background (plain, a gradient, or soft blotches) with a little pixel noise.

    Backgrounds vary in brightness, tint and texture, but stay free of sharp edges and strong colours so that
    the only shapes and colour words in a scene belong to the objects.
    """
    grey = rng.uniform(*grey_range)
    tint = rng.uniform(-18, 18, size=3)
    base = np.clip(grey + tint, 0, 255)  # [3]
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size] / size  # [S, S] each
    if kind == 1:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(theta) * xx + np.sin(theta) * yy)[..., None]  # [S, S, 1]
        img = base + rng.uniform(20, 50) * (ramp - 0.5)
    elif kind == 2:  # soft blotches: a coarse random grid upsampled smoothly
        coarse = Image.fromarray(rng.uniform(0, 255, size=(4, 4)).astype(np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        img = base + rng.uniform(10, 25) * (smooth[..., None] / 255.0 - 0.5)
    else:
        img = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    img = img + 3.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)  # [S, S, 3]


def render(objects: list[SceneObject], rng: np.random.Generator, size: int, variant: str = "default",
           background_grey: tuple[float, float] = BACKGROUND_GREY) -> Image.Image:
    """Draw the objects on a random background.

    Each object's mask is drawn at twice the resolution and downsampled (anti-aliased edges), then the object's
    colour is blended through it; the background itself is made at the output size, which keeps rendering
    cheap next to a training step. `variant` selects a shifted rendering for robustness evaluation (see
    ZEROSHOT_VARIANTS); training images always use "default". `background_grey` bounds the smooth
    background's grey level (SyntheticConfig.train_background_grey).
    """
    if variant not in ZEROSHOT_VARIANTS:
        raise ConfigError(f"unknown synthetic variant '{variant}' (expected one of {', '.join(ZEROSHOT_VARIANTS)})")
    canvas = Image.fromarray(_textured_background(rng, size) if variant == "backgrounds"
                             else _background(rng, size, background_grey))
    big = size * 2
    radii = VARIANT_SIZES if variant == "sizes" else SIZES
    for obj in objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        base = obj.rgb if obj.rgb is not None else COLOURS[obj.colour]
        colour = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(base, jitter))
        radius = radii[obj.size] * big * rng.uniform(0.9, 1.1)
        cx, cy = obj.x * big, obj.y * big
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        if variant == "outline":
            _draw_outline(draw, obj, cx, cy, radius)
        elif obj.shape in ("circle", "ring"):
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if obj.shape == "ring":
                draw.ellipse(box, outline=255, width=max(2, int(radius * 0.38)))
            else:
                draw.ellipse(box, fill=255)
        else:
            pts = _shape_points(obj.shape, radius, obj.angle)
            draw.polygon([(cx + x, cy + y) for x, y in pts], fill=255)
        canvas.paste(colour, (0, 0, size, size), mask.reduce(2))
    return canvas


# --- Shifted renderings, for robustness evaluation only (training images never use them) ---------------------
# "backgrounds": high-contrast grey textures (stripes, checks, speckle) instead of smooth backgrounds;
# "outline": shapes drawn as thin outlines, not filled; "sizes": radii outside the two sizes seen in training.
ZEROSHOT_VARIANTS: tuple[str, ...] = ("default", "backgrounds", "outline", "sizes")
VARIANT_SIZES: dict[str, float] = {"small": 0.08, "large": 0.32}


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey, sharp-edged texture: stripes at a random angle, a checkerboard, or per-pixel speckle.

    Grey only, so that the colour words of a scene still belong to its objects alone.
    """
    low, high = sorted(rng.uniform(40, 215, size=2))
    high = max(high, low + 50)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)  # [S, S] each
    kind = rng.integers(3)
    if kind == 0:  # stripes
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.2) * size
        mask = np.floor((np.cos(theta) * xx + np.sin(theta) * yy) / (period / 2)) % 2
    elif kind == 1:  # checkerboard
        cell = rng.uniform(0.06, 0.16) * size
        mask = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    else:  # speckle: an independent grey level per pixel
        mask = rng.random((size, size))
    grey = low + (high - low) * mask  # [S, S]
    return np.clip(np.repeat(grey[..., None], 3, axis=2), 0, 255).astype(np.uint8)  # [S, S, 3]


def _draw_outline(draw: ImageDraw.ImageDraw, obj: SceneObject, cx: float, cy: float, radius: float) -> None:
    """The object's contour as a thin line in its mask; a ring becomes its two edge circles."""
    width = max(2, int(round(radius * 0.16)))
    if obj.shape in ("circle", "ring"):
        radii = (radius, radius * 0.62) if obj.shape == "ring" else (radius,)
        for r in radii:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
        return
    pts = [(cx + x, cy + y) for x, y in _shape_points(obj.shape, radius, obj.angle)]
    draw.line(pts + pts[:1], fill=255, width=width, joint="curve")


def _fit_inside(obj: SceneObject, radius: float) -> SceneObject:
    """The object moved, if needed, so that a disc of `radius` (a fraction of the side) stays in the image."""
    lo, hi = radius * 1.1 + 0.02, 1 - radius * 1.1 - 0.02
    return replace(obj, x=float(np.clip(obj.x, lo, hi)), y=float(np.clip(obj.y, lo, hi)))


class SyntheticWorld:
    """Scenes, images and captions of the synthetic world, each a pure function of (stream, index)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        heldout = {parse_combo(c) for c in cfg.heldout}
        self.heldout = sorted(heldout)
        self.seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout]
        self._heldout_colours = {s: {c for c, hs in heldout if hs == s} for s in SHAPES}
        self.classnames = all_classnames()

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, stream, index])

    def _place(self, rng: np.random.Generator, sizes: list[str]) -> list[tuple[float, float]]:
        """Centres for the objects that do not overlap; an object that does not fit is made small."""
        placed: list[tuple[float, float, float]] = []  # (x, y, radius)
        for k, size in enumerate(sizes):
            for attempt in range(60):
                if attempt == 30:
                    sizes[k] = size = "small"
                r = SIZES[size]
                x, y = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
                if all(math.hypot(x - px, y - py) > r + pr + 0.03 for px, py, pr in placed):
                    break
            placed.append((float(x), float(y), r))
        return [(x, y) for x, y, _ in placed]

    def _random_colour(self, rng: np.random.Generator, shape: str) -> tuple[int, int, int]:
        """A uniform RGB colour that stays nearer to an allowed palette colour than to any colour held out for
        `shape` even after the render's jitter moves it (by at most |j| = COLOUR_JITTER * sqrt(3), hence the
        margin of twice that)."""
        excluded = self._heldout_colours[shape]
        margin = 2 * COLOUR_JITTER * math.sqrt(3)
        while True:
            rgb = rng.integers(0, 256, size=3)
            dist = {c: math.dist(rgb.tolist(), ref) for c, ref in COLOURS.items()}
            allowed = min(d for c, d in dist.items() if c not in excluded)
            if all(dist[c] > allowed + margin for c in excluded):
                return int(rgb[0]), int(rgb[1]), int(rgb[2])

    def scene(self, stream: int, index: int, combos: list[tuple[str, str]] | None = None,
              n_objects: int | None = None, random_colour_prob: float = 0.0,
              ) -> tuple[list[SceneObject], np.random.Generator]:
        rng = self._rng(stream, index)
        pool = combos if combos is not None else self.seen
        if n_objects is None:
            weights = np.asarray(self.cfg.object_count_weights[: self.cfg.max_objects], dtype=np.float64)
            n_objects = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
        sizes = [str(rng.choice(list(SIZES))) for _ in range(n_objects)]
        centres = self._place(rng, sizes)
        objects = []
        for size, (x, y) in zip(sizes, centres):
            colour, shape = pool[int(rng.integers(len(pool)))]
            angle = float(rng.uniform(-12, 12))
            rgb = None
            if random_colour_prob > 0 and rng.random() < random_colour_prob:
                rgb = self._random_colour(rng, shape)
            objects.append(SceneObject(colour, shape, size, x, y, angle, rgb))
        return objects, rng

    def describe(self, objects: list[SceneObject], rng: np.random.Generator, complete: bool = False) -> str:
        """A caption naming some or all objects, with optional size and position words; a `complete` one (the
        evaluation's) names every object by colour and shape."""
        named = list(objects)
        if not complete and len(named) > 1 and rng.random() < self.cfg.omit_prob:
            keep = int(rng.integers(1, len(named)))
            order = rng.permutation(len(named))[:keep]
            named = [named[i] for i in sorted(order)]
        phrases = []
        for obj in named:
            words = []
            if rng.random() < self.cfg.attribute_prob:
                words.append(obj.size)
            p_single = 0.0 if complete else self.cfg.single_attribute_prob  # complete captions name both
            single = p_single > 0 and rng.random() < p_single
            # Shape-first phrases keep colour and shape words from always standing side by side, so the text
            # tower learns them as separate attributes and composes unseen pairs. One-attribute phrases ask the
            # image tower for a shape feature that holds across colours (and a colour feature across shapes).
            if obj.rgb is not None:  # an off-palette colour has no colour word
                words.append(obj.shape)
            elif single:
                words += [obj.shape] if rng.random() < 0.5 else [obj.colour, "shape"]
            elif rng.random() < self.cfg.reorder_prob:
                words += [obj.shape, "in", obj.colour]
            else:
                words += [obj.colour, obj.shape]
            phrase = " ".join(words)
            phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
            if rng.random() < self.cfg.attribute_prob:
                phrase += " " + obj.position
            phrases.append(phrase)
        if len(phrases) == 1:
            body = phrases[0]
        else:
            body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        return template.format(body)

    def pair(self, stream: int, index: int, complete: bool = False) -> tuple[Image.Image, str]:
        """(image, caption) number `index` of a stream; caption noise, random colours and the training
        background range apply to the training stream only."""
        train = stream == STREAM_TRAIN
        twin = None
        if train and self.cfg.shape_twin_prob > 0 and index % 2 == 1:
            twin = self._shape_twin(index, complete)
        if twin is not None:
            image, caption = twin
        else:
            objects, rng = self.scene(stream, index,
                                      random_colour_prob=self.cfg.random_colour_prob if train else 0.0)
            image = render(objects, rng, self.cfg.image_size,
                           background_grey=self.cfg.train_background_grey if train else BACKGROUND_GREY)
            caption = self.describe(objects, rng, complete=complete)
        if train and self.cfg.caption_noise > 0:
            noise_rng = self._rng(STREAM_NOISE, index)
            if noise_rng.random() < self.cfg.caption_noise:
                other = int(noise_rng.integers(2**62))
                other_objects, other_rng = self.scene(STREAM_NOISE, other)
                caption = self.describe(other_objects, other_rng)
        return image, caption

    def _shape_twin(self, index: int, complete: bool = False) -> tuple[Image.Image, str] | None:
        """Training pair `index` (odd) as the shape twin of pair index - 1, or None where the draw says no, or no
        object named in the caption can change shape without making a held-out combination or an off-palette
        object (whose allowed colours depend on its shape)."""
        choice = self._rng(STREAM_TWIN, index)
        if choice.random() >= self.cfg.shape_twin_prob:
            return None
        objects, rng = self.scene(STREAM_TRAIN, index - 1, random_colour_prob=self.cfg.random_colour_prob)
        state = rng.bit_generator.state  # the original's rendering and caption draws, replayed for the twin

        def draw(scene: list[SceneObject]) -> tuple[Image.Image, str]:
            rng.bit_generator.state = state
            image = render(scene, rng, self.cfg.image_size, background_grey=self.cfg.train_background_grey)
            return image, self.describe(scene, rng, complete=complete)

        original = draw(objects)[1]
        seen = set(self.seen)
        for k in choice.permutation(len(objects)).tolist():
            obj = objects[k]
            shapes = [s for s in SHAPES if s != obj.shape and (obj.colour, s) in seen]
            if obj.rgb is not None or not shapes:
                continue
            shape = shapes[int(choice.integers(len(shapes)))]
            image, caption = draw([replace(o, shape=shape) if j == k else o for j, o in enumerate(objects)])
            if caption != original:  # object k is named (a caption may leave objects out)
                return image, caption
        return None

    def zeroshot_example(self, index: int, combos: list[tuple[str, str]],
                         variant: str = "default") -> tuple[Image.Image, int]:
        """A single-object image of combination combos[index % len(combos)] and its class index.

        A `variant` other than "default" draws the same scene shifted (see ZEROSHOT_VARIANTS).
        """
        combo = combos[index % len(combos)]
        objects, rng = self.scene(STREAM_ZEROSHOT, index, combos=[combo], n_objects=1)
        if variant == "sizes":
            objects = [_fit_inside(obj, VARIANT_SIZES[obj.size]) for obj in objects]
        return render(objects, rng, self.cfg.image_size, variant), self.classnames.index(" ".join(combo))


class SyntheticPairs(torch.utils.data.Dataset):
    """Map-style (image tensor [3, S, S], caption) pairs of one stream."""

    def __init__(self, world: SyntheticWorld, stream: int = STREAM_TRAIN, length: int = 10**9,
                 complete: bool = False) -> None:
        self.world, self.stream, self.length, self.complete = world, stream, length, complete

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.world.pair(self.stream, index, complete=self.complete)
        return normalize(to_tensor(image)), caption


class SyntheticZeroShot(torch.utils.data.Dataset):
    """Single-object images labelled over all 64 colour x shape classes, for the given combinations."""

    def __init__(self, world: SyntheticWorld, combos: list[tuple[str, str]], per_class: int,
                 variant: str = "default", offset: int = 0) -> None:
        """`offset` (a multiple of len(combos) keeps the classes balanced) starts at another range of scenes,
        so that disjoint offsets give disjoint image sets, e.g. to train and test a linear probe."""
        if variant not in ZEROSHOT_VARIANTS:
            raise ConfigError(f"unknown synthetic variant '{variant}' (expected one of {', '.join(ZEROSHOT_VARIANTS)})")
        self.world, self.combos, self.length = world, combos, per_class * len(combos)
        self.variant, self.offset = variant, offset
        self.classnames = world.classnames

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return self.world.classnames.index(" ".join(self.combos[(self.offset + index) % len(self.combos)]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.world.zeroshot_example(self.offset + index, self.combos, self.variant)
        return normalize(to_tensor(image)), label
