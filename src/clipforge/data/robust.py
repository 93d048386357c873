"""Training on imperfect files: bad samples are converted where possible, otherwise skipped and counted.

Real image-text collections contain missing and unreadable files, truncated downloads, decompression bombs,
grayscale/CMYK/palette/alpha images and empty or mis-encoded captions. `RobustPairs` wraps any list of
(image path, caption) pairs: images in other modes are converted to RGB (transparency composited on white) and
counted; a sample that cannot be used is replaced by another one chosen by a fixed rule (a pure function of the
seed, the index and the attempt), so a batch stays a pure function of the step and a resumed run sees the
same batches. Every item carries the problems met while producing it, so counts and offending paths reach the
trainer even from DataLoader worker processes; `BadDataTally` adds them up and says when the fraction of bad
samples passes the configured threshold.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..transforms import to_rgb, upright

# A skipped sample is one of these; a converted one one of CONVERTED_KINDS. The order is part of the per-step
# all-reduce between ranks, so only ever append.
SKIPPED_KINDS = ("missing", "unreadable", "truncated", "decompression_bomb", "empty_caption", "caption_not_utf8")
CONVERTED_KINDS = ("grayscale", "alpha", "palette", "cmyk", "high_bit_depth", "other_mode")

Problem = dict[str, str]  # {"kind", "path", "detail"}: plain data, cheap to send from worker processes


class BadSample(Exception):
    """A sample that cannot be used; `kind` is one of SKIPPED_KINDS."""

    def __init__(self, kind: str, path: str | Path, detail: str) -> None:
        super().__init__(f"{path}: {kind} ({detail})")
        self.kind, self.path, self.detail = kind, str(path), detail

    def record(self) -> Problem:
        return {"kind": self.kind, "path": self.path, "detail": self.detail}


class TooManyBadSamples(RuntimeError):
    """Every attempt to replace a bad sample failed too: the data set is mostly unusable."""


def _mode_kind(mode: str) -> str | None:
    if mode == "RGB":
        return None
    if mode in ("L", "1"):
        return "grayscale"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return "alpha"
    if mode in ("P", "PA"):
        return "palette"
    if mode == "CMYK":
        return "cmyk"
    if mode in ("I", "F") or mode.startswith("I;16"):
        return "high_bit_depth"
    return "other_mode"


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit grayscale by scaling (PIL's own conversion clips at 255)."""
    array = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def convert_to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, the conversion kind or None if it was RGB already)."""
    kind = _mode_kind(image.mode)
    if kind is None:
        return image, None
    if kind == "high_bit_depth":
        image = _high_bit_depth_to_l(image)
    return to_rgb(image), kind


def load_image(path: str | Path, max_pixels: int = 89_478_485) -> Image.Image:
    """Open and fully decode an image file; BadSample naming the path and the kind of failure otherwise.

    Images with more than `max_pixels` pixels are refused from their header, before any decoding.
    """
    if not Path(path).is_file():
        raise BadSample("missing", path, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit limit below decides
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadSample("decompression_bomb", path, f"{width}x{height} pixels > limit {max_pixels}")
                image.load()
                return upright(image)
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample("decompression_bomb", path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on malformed files; none may end a run
        text = str(exc) or type(exc).__name__
        kind = "truncated" if "truncat" in text.lower() else "unreadable"
        raise BadSample(kind, path, text) from None


def clean_caption(caption: Any, path: str | Path = "") -> str:
    """The caption as clean text: bytes decoded as UTF-8, surrounding whitespace removed; BadSample if empty
    or not valid UTF-8 (including strings carrying undecodable bytes as surrogates)."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSample("caption_not_utf8", path, str(exc)) from None
    if not isinstance(caption, str):
        raise BadSample("empty_caption", path, f"caption is {type(caption).__name__}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadSample("caption_not_utf8", path, str(exc)) from None
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption", path, "caption is empty")
    return caption


class RobustPairs(torch.utils.data.Dataset):
    """Map-style (image tensor, caption, problems) over (image path, caption) pairs.

    `transform` maps an RGB PIL image to a tensor. If it keeps a `random.Random` in `.rng` (as TrainTransform
    does), that generator is re-seeded from (seed, draw) before each image, so augmentations are a pure function
    of the sample's draw number and do not depend on worker processes or on where a run was resumed. Indexing
    with a tuple (index, draw) gives the draw number; a plain index is its own draw number.
    A bad sample is replaced by pair `rng(seed, index, attempt).integers(len)`, up to `max_attempts` times.
    """

    wants_draw_number = True

    def __init__(self, pairs: Sequence[tuple[str | Path, Any]], transform: Callable[[Image.Image], torch.Tensor],
                 max_image_pixels: int = 89_478_485, seed: int = 0, max_attempts: int = 16) -> None:
        if len(pairs) == 0:
            raise ValueError("RobustPairs: the list of (image, caption) pairs is empty")
        self.pairs = list(pairs)
        self.transform, self.max_image_pixels = transform, max_image_pixels
        self.seed, self.max_attempts = seed, max_attempts

    def __len__(self) -> int:
        return len(self.pairs)

    def replacement(self, index: int, attempt: int) -> int:
        """The pair tried at `attempt` (0: the index itself) for item `index`."""
        if attempt == 0:
            return index
        return int(np.random.default_rng([self.seed, index, attempt]).integers(len(self.pairs)))

    def load(self, index: int, draw: int) -> tuple[torch.Tensor, str, str | None]:
        """(image tensor, caption, conversion kind or None) of pair `index`; BadSample if unusable."""
        path, caption = self.pairs[index]
        text = clean_caption(caption, path)
        image, converted = convert_to_rgb(load_image(path, self.max_image_pixels))
        rng = getattr(self.transform, "rng", None)
        if isinstance(rng, random.Random):
            rng.seed(f"{self.seed}:{draw}")
        return self.transform(image), text, converted

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, list[Problem]]:
        index, draw = key if isinstance(key, tuple) else (key, key)
        problems: list[Problem] = []
        for attempt in range(self.max_attempts + 1):
            candidate = self.replacement(index, attempt)
            try:
                image, caption, converted = self.load(candidate, draw)
            except BadSample as bad:
                problems.append(bad.record())
                continue
            if converted is not None:
                problems.append({"kind": converted, "path": str(self.pairs[candidate][0]), "detail": "converted"})
            return image, caption, problems
        raise TooManyBadSamples(
            f"sample {index} and its {self.max_attempts} replacements are all unusable "
            f"(last: {problems[-1]['path']}: {problems[-1]['kind']}); is the data set mostly broken?"
        )


@dataclass
class BadDataTally:
    """Samples read and problems met, by kind; counts over all ranks when fed from the step consensus."""

    reads: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def local_vector(items_read: int, problems: Sequence[Problem]) -> list[int]:
        """[reads, count per SKIPPED_KINDS, count per CONVERTED_KINDS] of one batch; every skipped sample is
        one more read."""
        kinds = SKIPPED_KINDS + CONVERTED_KINDS
        counts = [0] * len(kinds)
        for problem in problems:
            counts[kinds.index(problem["kind"])] += 1
        skipped = sum(counts[: len(SKIPPED_KINDS)])
        return [items_read + skipped, *counts]

    def add_vector(self, vector: Sequence[int]) -> None:
        self.reads += int(vector[0])
        for kind, count in zip(SKIPPED_KINDS + CONVERTED_KINDS, vector[1:]):
            if count:
                self.counts[kind] = self.counts.get(kind, 0) + int(count)

    @property
    def skipped(self) -> int:
        return sum(self.counts.get(k, 0) for k in SKIPPED_KINDS)

    def exceeded(self, max_fraction: float, min_samples: int) -> str | None:
        """A one-line reason to stop when, after `min_samples` reads, the skipped fraction is above the limit."""
        if self.reads < min_samples or self.skipped <= max_fraction * self.reads:
            return None
        kinds = ", ".join(f"{k}={self.counts[k]}" for k in SKIPPED_KINDS if self.counts.get(k))
        return (f"{self.skipped} of {self.reads} samples read ({self.skipped / self.reads:.1%}) were unusable "
                f"({kinds}), above data.max_bad_fraction={max_fraction:g}")

    def state_dict(self) -> dict[str, Any]:
        return {"reads": self.reads, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reads, self.counts = int(state["reads"]), {k: int(v) for k, v in state["counts"].items()}


def manifest_pairs(path: str | Path, split: str = "train") -> list[tuple[Path, str]]:
    """(image, caption) pairs of a CSV/TSV manifest (`data.manifest`), one per caption, for RobustPairs.

    Image files are not checked here: a missing one is counted and skipped when it is read, like any other bad
    sample. When the manifest has a split column, only the rows of `split` are used.
    """
    from .base import DatasetError  # noqa: PLC0415
    from .manifest import read_manifest  # noqa: PLC0415

    entries = read_manifest(path, check_files=False, keep_bad_captions=True)  # skipped and counted when read
    if any(e.split is not None for e in entries):
        present = sorted({e.split for e in entries if e.split is not None})
        entries = [e for e in entries if e.split == split]
        if not entries:
            raise DatasetError(f"{path}: no rows in split '{split}' (splits present: {', '.join(present)})")
    return [(entry.image, caption) for entry in entries for caption in entry.captions]
