"""Preprocessing against an independent re-implementation of OpenAI's pipeline, on real images.

OpenAI's eval pipeline (torchvision): resize the shorter side to `size` with PIL bicubic, centre crop,
to RGB, to a [0, 1] tensor, normalise. Ours differs on purpose in one place: transparency is composited on
white (OpenAI's `convert("RGB")` keeps whatever colour transparent pixels happen to store). The reference
below composites with numpy, then follows OpenAI's steps with PIL and numpy only.

Real images: the Debian package `openclipart-png` (clip art, most with alpha, most not square).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EvalTransform, TrainTransform, image_transform

CLIPART = Path("/usr/share/openclipart/png")
MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float64).reshape(3, 1, 1)
STD = np.array(OPENAI_CLIP_STD, dtype=np.float64).reshape(3, 1, 1)


@lru_cache(maxsize=None)
def _all_clipart() -> tuple[Path, ...]:
    return tuple(sorted(CLIPART.rglob("*.png")))


def clipart_sample(count: int = 16) -> list[Path]:
    """`count` files spread evenly over the sorted collection (the same ones on every machine)."""
    if not CLIPART.is_dir():
        pytest.fail(f"{CLIPART} not found: install the Debian package (apt-get install -y openclipart-png)")
    files = _all_clipart()
    step = max(1, len(files) // count)
    return list(files[::step][:count])


def reference_eval(image: Image.Image, size: int) -> np.ndarray:
    """[3, size, size] in [0, 1]: composite on white, shorter side to `size` (bicubic), centre crop."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # [H, W, 4]
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    flat = Image.fromarray(np.floor(rgb + 0.5).astype(np.uint8), "RGB")
    width, height = flat.size
    if min(width, height) != size:
        if width <= height:
            target = (size, int(size * height / width))
        else:
            target = (int(size * width / height), size)
        flat = flat.resize(target, Image.BICUBIC)
    width, height = flat.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    cropped = np.asarray(flat, dtype=np.float64)[top : top + size, left : left + size]  # [S, S, 3]
    return cropped.transpose(2, 0, 1) / 255.0


def unnormalise(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy() * STD + MEAN


def test_sample_covers_alpha_and_non_square() -> None:
    images = [Image.open(path) for path in clipart_sample()]
    assert any(im.mode in ("RGBA", "LA", "P") for im in images)
    assert any(im.size[0] != im.size[1] for im in images)
    assert any(im.size[0] > im.size[1] for im in images) and any(im.size[0] < im.size[1] for im in images)


@pytest.mark.parametrize("size", [224, 288, 336])
def test_eval_transform_matches_reference_on_clipart(size: int) -> None:
    transform = EvalTransform(size)
    worst = 0.0
    for path in clipart_sample():
        with Image.open(path) as image:
            image.load()
            got = transform(image)
            expected = reference_eval(image, size)
        assert got.shape == (3, size, size) and got.dtype == torch.float32, path.name
        worst = max(worst, float(np.abs(unnormalise(got) - expected).max()))
    assert worst <= 1.0 / 255.0 + 1e-6, f"largest pixel difference {worst * 255:.2f}/255"


def test_eval_transform_on_opaque_rgb_is_exact() -> None:
    """Without transparency there is nothing to composite: ours and the reference must agree exactly."""
    rng = np.random.default_rng(0)
    for width, height in [(300, 200), (180, 400), (224, 224), (225, 500)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        got = unnormalise(EvalTransform(224)(image))
        np.testing.assert_allclose(got, reference_eval(image, 224), atol=1e-6, rtol=0)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (64, 48), (10, 200, 30, 0))  # fully transparent, green underneath
    got = unnormalise(EvalTransform(32)(image))
    np.testing.assert_allclose(got, np.ones((3, 32, 32)), atol=1e-6)


def test_train_transform_shape_range_and_randomness() -> None:
    low = (0.0 - MEAN) / STD
    high = (1.0 - MEAN) / STD
    path = clipart_sample(4)[1]
    with Image.open(path) as image:
        image.load()
        first = [TrainTransform(224, seed=5)(image) for _ in range(2)]
        other = TrainTransform(224, seed=6)(image)
    for out in first + [other]:
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and torch.isfinite(out).all()
        array = out.double().numpy()
        assert (array >= low - 1e-6).all() and (array <= high + 1e-6).all()
    assert torch.equal(first[0], first[1])  # same seed, same crop
    assert not torch.equal(first[0], other)
    assert isinstance(image_transform(224, train=True), TrainTransform)
    assert isinstance(image_transform(224, train=False), EvalTransform)


def test_train_crop_boxes_respect_scale_and_aspect() -> None:
    transform = TrainTransform(64, scale=(0.5, 1.0), seed=0)
    width, height = 400, 300
    for _ in range(200):
        left, top, right, bottom = transform._crop_box(width, height)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        if (w, h) == (height, height):  # the centre-square fallback
            continue
        area = w * h / (width * height)
        assert 0.5 - 0.01 <= area <= 1.0 + 0.01
        assert math.log(3 / 4) - 0.02 <= math.log(w / h) <= math.log(4 / 3) + 0.02


# ---------------------------------------------------------------- preprocess="openai": exact parity


def torchvision_openai_transform(size: int):
    """OpenAI's `clip._transform` (clip/clip.py), built from torchvision as OpenAI and OpenCLIP build it."""
    from clip_reference import import_open_clip

    import_open_clip()  # puts the test-only torchvision on the path
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor(), Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def synthetic_palette_and_transparent() -> list[Image.Image]:
    """A palette image with hard colour edges and a transparent palette entry, and an RGBA image whose
    transparent pixels store a saturated colour (what `convert("RGB")` then shows)."""
    rng = np.random.default_rng(0)
    indices = (rng.integers(0, 4, (9, 13)).repeat(17, axis=0).repeat(23, axis=1)).astype(np.uint8)
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 20] + [0] * 756)
    palette_image.info["transparency"] = 3
    rgba = rng.integers(0, 256, (150, 110, 4)).astype(np.uint8)
    rgba[:60, :, 3] = 0
    rgba[:60, :, :3] = (255, 0, 255)
    return [palette_image, Image.fromarray(rgba, "RGBA")]


@pytest.mark.parametrize("size", [224, 64])
def test_openai_mode_equals_openais_pipeline_on_palette_and_transparent_files(size: int) -> None:
    """Bit-for-bit: palette (P) files, P files with a transparent entry, RGBA and LA clip art, and the
    synthetic cases; torchvision's Resize and CenterCrop call the same PIL operations in the same order."""
    reference = torchvision_openai_transform(size)
    ours = EvalTransform(size, "openai")
    images = [Image.open(path) for path in clipart_sample(64)]
    modes = {(im.mode, "transparency" in im.info) for im in images}
    assert {("P", True), ("P", False), ("RGBA", False), ("LA", False)} <= modes, modes
    for image in images + synthetic_palette_and_transparent():
        got, want = ours(image), reference(image)
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (3, size, size)
        assert torch.equal(got, want), (image.mode, (got - want).abs().max())


def test_the_two_pipelines_differ_where_documented() -> None:
    """Where the choice matters: palette images (nearest in palette space vs bicubic on true colour) and
    transparent pixels (stored colour vs white). On opaque RGB the two are the same pipeline."""
    palette_image, rgba = synthetic_palette_and_transparent()
    size = 64
    openai, ours = EvalTransform(size, "openai"), EvalTransform(size, "clipforge")
    assert torch.equal(openai(palette_image.convert("RGB").convert("RGB")), ours(palette_image.convert("RGB")))
    resized_nearest = np.asarray(palette_image.resize((90, 64), Image.NEAREST).convert("RGB"))
    colours = {tuple(c) for c in resized_nearest.reshape(-1, 3)}
    assert len(colours) <= 4  # nearest in palette space: only palette colours, hard edges
    assert not torch.equal(openai(palette_image), ours(palette_image))
    top = ours(rgba)[:, 0, :]  # the transparent top rows: white, normalised
    white = (1.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(top, white[:, None].expand_as(top), atol=1e-6, rtol=0)
    # OpenAI's: PIL resizes RGBA with premultiplied alpha, so fully transparent pixels come out black after a
    # resize, and keep their stored colour (here magenta) only where no resize happens; alpha is then dropped.
    black = (0.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(openai(rgba)[:, 0, :], black[:, None].expand_as(top), atol=1e-6, rtol=0)
    magenta = (torch.tensor([1.0, 0.0, 1.0]) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    unresized = EvalTransform(110, "openai")(rgba)  # shorter side already 110: no resize
    torch.testing.assert_close(unresized[:, 0, :], magenta[:, None].expand(3, 110), atol=1e-6, rtol=0)


def test_preprocess_config_round_trips_and_names_bad_values() -> None:
    from clipforge.config import ConfigError
    from clipforge.transforms import PreprocessConfig

    cfg = PreprocessConfig("openai", 64)
    assert PreprocessConfig.from_dict(cfg.to_dict(), "x") == cfg
    assert PreprocessConfig.from_dict(cfg.to_openclip(), "x", openclip=True) == cfg
    assert PreprocessConfig.from_dict({**cfg.to_openclip(), "mode": "RGB"}, "x", openclip=True) == cfg
    assert repr(cfg.eval_transform()) == "EvalTransform(size=64, mode='openai')"  # part of the cache key
    with pytest.raises(ConfigError, match="f.json: bad preprocessing config .'resize_mode' is 'squash'"):
        PreprocessConfig.from_dict({"resize_mode": "squash"}, "f.json")
    with pytest.raises(ConfigError, match="'mode' is 'mine'"):
        PreprocessConfig.from_dict({"mode": "mine"}, "f.json")
