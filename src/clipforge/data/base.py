"""Dataset interfaces shared by every source: classification sets and caption (image-text) sets.

A classification dataset yields `(image, label)` and carries `classnames` and prompt `templates` for zero-shot
evaluation. A caption dataset yields `(image, captions)` with one or more captions per image; it may also carry
category labels so that the same images serve zero-shot classification (`as_classification`).
The image is whatever the `transform` makes of a PIL image (a normalised tensor for the model's transforms), or
the PIL image itself when no transform is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..transforms import upright

Transform = Callable[[Image.Image], Any]

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset, manifest or data root that cannot be used as asked; the message names what is wrong."""


def open_image(path: str | Path) -> Image.Image:
    """Open an image file and decode it fully (so the file handle is closed), naming the file on failure."""
    try:
        with Image.open(path) as image:
            image.load()
            return upright(image)
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read image ({exc})") from exc


class ClassificationDataset(torch.utils.data.Dataset):
    """Map-style dataset of `(image, label)` with class names and prompt templates for zero-shot."""

    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def label(self, index: int) -> int:
        """The class index of item `index`, without decoding its image."""
        raise NotImplementedError

    def labels(self) -> list[int]:
        return [self.label(i) for i in range(len(self))]

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        transform = getattr(self, "transform", None)
        return (transform(image) if transform is not None else image), self.label(index)


@dataclass(frozen=True)
class CaptionRecord:
    """One image with its captions and, optionally, a category label (index into the dataset's classnames)."""

    image: Path
    captions: tuple[str, ...]
    label: int | None = None


class CaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset of `(image, captions)` over a list of records.

    `classnames` and `templates` are set when the records carry category labels; `as_classification()` then
    gives the labelled images as a `ClassificationDataset` for zero-shot evaluation.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        transform: Transform | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        name: str = "captions",
    ) -> None:
        if not records:
            raise DatasetError(f"{name}: no images")
        self.records = list(records)
        self.transform = transform
        self.classnames = list(classnames) if classnames is not None else None
        self.templates = list(templates) if templates is not None else ["{}"]
        self.name = name
        if self.classnames is not None:
            for record in self.records:
                if record.label is not None and not 0 <= record.label < len(self.classnames):
                    raise DatasetError(f"{name}: {record.image}: label {record.label} outside the class list")

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, index: int) -> list[str]:
        return list(self.records[index].captions)

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.records[index].image)

    def __getitem__(self, index: int) -> tuple[Any, list[str]]:
        image = self.load_image(index)
        return (self.transform(image) if self.transform is not None else image), self.captions(index)

    def texts(self) -> tuple[list[str], torch.Tensor]:
        """All captions flattened, and `text_to_image` [T] giving the image index of each caption."""
        texts: list[str] = []
        owner: list[int] = []
        for i, record in enumerate(self.records):
            texts.extend(record.captions)
            owner.extend([i] * len(record.captions))
        return texts, torch.tensor(owner, dtype=torch.long)

    def as_classification(self) -> "CaptionClassificationView":
        """The images that carry a category label, as a classification dataset."""
        if self.classnames is None:
            raise DatasetError(f"{self.name}: has no category labels, so it cannot be used for classification")
        return CaptionClassificationView(self)


class CaptionClassificationView(ClassificationDataset):
    """The labelled subset of a caption dataset, yielding `(image, label)`."""

    def __init__(self, base: CaptionDataset) -> None:
        assert base.classnames is not None
        self.base = base
        self.indices = [i for i, r in enumerate(base.records) if r.label is not None]
        if not self.indices:
            raise DatasetError(f"{base.name}: no image carries a category label")
        self.classnames = base.classnames
        self.templates = base.templates
        self.transform = base.transform
        self.name = base.name

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, index: int) -> int:
        label = self.base.records[self.indices[index]].label
        assert label is not None
        return label

    def load_image(self, index: int) -> Image.Image:
        return self.base.load_image(self.indices[index])


def collate_captions(batch: Sequence[tuple[torch.Tensor, Sequence[str]]]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Collate `(image, captions)` items: images stacked [B, 3, H, W], captions flattened to a list of T
    strings, and `text_to_image` [T] holding, for each caption, the index of its image in the batch."""
    images = torch.stack([image for image, _ in batch])  # [B, 3, H, W]
    texts: list[str] = []
    owner: list[int] = []
    for i, (_, captions) in enumerate(batch):
        if isinstance(captions, str):
            captions = [captions]
        texts.extend(captions)
        owner.extend([i] * len(captions))
    return images, texts, torch.tensor(owner, dtype=torch.long)


def hash_split(key: str, val: float = 0.1, test: float = 0.1) -> str:
    """A fixed split for `key` (an image path or group id): 'train', 'val' or 'test', from a hash of the key.

    The same key always lands in the same split, on any machine and whatever else the dataset holds, so
    adding or removing images never moves the others between splits.
    """
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64  # uniform in [0, 1)
    if bucket < test:
        return "test"
    if bucket < test + val:
        return "val"
    return "train"
