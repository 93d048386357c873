"""Image preprocessing with PIL and torch only (no torchvision at run time).

Two eval pipelines, named by `PreprocessConfig.mode`:

- `clipforge`: RGB first (transparency composited on white, palette images expanded to true colour) -> resize
  the shorter side to `size` (bicubic) -> centre crop -> [0, 1] -> normalise with CLIP's mean and std.
- `openai`: OpenAI's and OpenCLIP's order, reproduced exactly: resize the image as stored (PIL then resizes
  palette images nearest-neighbour in palette space, and RGBA with premultiplied alpha, so fully transparent
  pixels turn black) -> centre crop -> `convert("RGB")` (alpha dropped: where no resize happened, transparent
  pixels show whatever colour they store) -> [0, 1] -> normalise.

The two agree on opaque RGB files. Train: a random resized crop after the `clipforge` RGB conversion.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from .config import ConfigError

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned or mirrored by its EXIF orientation (a phone's portrait photo is
    stored sideways with orientation 6), the tag then dropped; the image itself when it has no such tag."""
    from PIL import ImageOps

    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if not isinstance(orientation, int) or not 2 <= orientation <= 8:  # absent, 1 (upright) or malformed
        return image
    return ImageOps.exif_transpose(image)


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


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image (or uint8 array [H, W, 3]) -> float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(
    tensor: torch.Tensor, mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD
) -> torch.Tensor:
    m = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - m) / s


PREPROCESS_MODES = ("clipforge", "openai")


class EvalTransform:
    """Deterministic preprocessing: resize shorter side, centre crop, normalise; `mode` says where the image
    becomes RGB (see the module docstring)."""

    def __init__(
        self, size: int, mode: str = "clipforge", mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
        std: tuple[float, ...] = OPENAI_CLIP_STD,
    ) -> None:
        if mode not in PREPROCESS_MODES:
            raise ConfigError(f"preprocess {mode!r}: expected one of {list(PREPROCESS_MODES)}")
        self.size, self.mode, self.mean, self.std = size, mode, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.mode == "openai":  # torchvision's Resize and CenterCrop call these same PIL operations
            image = center_crop(resize_shorter(image, self.size), self.size).convert("RGB")
        else:
            image = center_crop(resize_shorter(to_rgb(image), self.size), self.size)
        return normalize(to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:  # part of the features cache key: names everything that changes the pixels
        stats = "" if (self.mean, self.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) else \
            f", mean={self.mean}, std={self.std}"
        mode = "" if self.mode == "clipforge" else f", mode={self.mode!r}"
        return f"EvalTransform(size={self.size}{mode}{stats})"


@dataclass(frozen=True)
class PreprocessConfig:
    """The eval preprocessing a model expects; stored with every checkpoint and export so other tools can
    reproduce it (`to_openclip` gives OpenCLIP's `preprocess_cfg`)."""

    mode: str = "clipforge"
    size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self.size, self.mode, self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        # interpolation and resize_mode are fixed in clipforge; written so that readers need not assume them
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "interpolation": "bicubic",
                "resize_mode": "shortest"}

    def to_openclip(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "interpolation": "bicubic",
                "resize_mode": "shortest"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str, openclip: bool = False) -> "PreprocessConfig":
        """From `to_dict`'s keys, or (`openclip=True`) from OpenCLIP's `preprocess_cfg`, whose `mode` is the
        colour mode ('RGB') and whose pipeline is OpenAI's."""
        try:
            if openclip and data.get("mode", "RGB") != "RGB":
                raise ValueError(f"'mode' is {data['mode']!r}; clipforge supports only 'RGB'")
            mode = "openai" if openclip else str(data.get("mode", "clipforge"))
            for key, fixed in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
                if data.get(key, fixed) != fixed:
                    raise ValueError(f"'{key}' is {data[key]!r}; clipforge supports only {fixed!r}")
            size = data.get("size", 224)
            if isinstance(size, (list, tuple)):
                if len(size) != 2 or size[0] != size[1]:
                    raise ValueError(f"'size' is {size!r}; clipforge supports square inputs only")
                size = size[0]
            mean = tuple(float(v) for v in data.get("mean", OPENAI_CLIP_MEAN))
            std = tuple(float(v) for v in data.get("std", OPENAI_CLIP_STD))
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or int(size) <= 0:
                raise ValueError("expected 3 means, 3 positive stds and a positive size")
            return cls(mode, int(size), mean, std)._checked()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: bad preprocessing config ({exc})") from None

    def _checked(self) -> "PreprocessConfig":
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"'mode' is {self.mode!r}; expected one of {list(PREPROCESS_MODES)}")
        return self


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


def image_transform(size: int, train: bool = False, mode: str = "clipforge") -> Callable[[Image.Image], torch.Tensor]:
    """The train or eval preprocessing for a model with input resolution `size`; `mode` picks the eval
    pipeline (`clipforge` or `openai`, see the module docstring)."""
    return TrainTransform(size) if train else EvalTransform(size, mode)


def model_preprocess(model: Any) -> PreprocessConfig:
    """The preprocessing stored with a loaded model (`load_model` sets `preprocess_cfg`), else clipforge's at the
    model's input size."""
    stored = getattr(model, "preprocess_cfg", None)
    return stored if isinstance(stored, PreprocessConfig) else PreprocessConfig(size=int(model.image_size))
