"""Image preprocessing with PIL and torch only (no torchvision at run time).

Eval: RGB (alpha composited on white) -> resize the shorter side to `size` (bicubic) -> centre crop -> [0, 1]
-> normalise with CLIP's mean and std, as OpenAI's pipeline. Train: a random resized crop instead.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white rather than dropped to black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (bicubic)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(
    tensor: torch.Tensor, mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD
) -> torch.Tensor:
    m = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - m) / s


class EvalTransform:
    """Deterministic preprocessing: to RGB, resize shorter side, centre crop, normalise."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = center_crop(resize_shorter(to_rgb(image), self.size), self.size)
        return normalize(to_tensor(image))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


class TrainTransform:
    """Random resized crop (scale range of the crop's area, aspect in [3/4, 4/3]) then normalise."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0), seed: int | None = None) -> None:
        self.size = size
        self.scale = scale
        self.rng = random.Random(seed)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = self.rng.randint(0, width - w)
                top = self.rng.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to a centre square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        box = self._crop_box(*image.size)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return normalize(to_tensor(image))

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale})"


def image_transform(size: int, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """The train or eval preprocessing for a model with input resolution `size`."""
    return TrainTransform(size) if train else EvalTransform(size)
