"""Fashion-MNIST (Debian `dataset-fashion-mnist`): 70,000 grey 28x28 photos of Zalando products, 10 classes.

The idx files are read directly (gzip, big-endian header, then raw bytes); no image files are written. The
official 10,000-image test set is the test split; the validation split is a fixed twelfth of the official
training set (5,000 images), chosen by a hash of each image's index.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..base import ClassificationDataset, DatasetError, Transform, hash_split
from ..offline import INFO_FILE, ensure_debian_package

PACKAGE = "dataset-fashion-mnist"
SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSNAMES = [
    "t-shirt or top", "trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
VAL_FRACTION = 1 / 12
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # magic numbers: unsigned bytes, 3 or 1 dimensions


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array: [N, 28, 28] for images, [N] for labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IDX_IMAGES, IDX_LABELS):
        raise DatasetError(f"{path}: not an unsigned-byte idx file (magic 0x{magic:08x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def split_indices(official: str, count: int, split: str) -> np.ndarray:
    """Indices into the official train or test arrays that make up our split."""
    if official == "test":
        return np.arange(count) if split == "test" else np.arange(0)
    chosen = [i for i in range(count) if hash_split(f"train/{i}", VAL_FRACTION, 0.0) == split]
    return np.asarray(chosen, dtype=np.int64)


def prepare(dest: Path, install: bool = True) -> dict[str, Any]:
    """Check the package's idx files (installing it if needed) and count the splits."""
    ensure_debian_package(PACKAGE, SOURCE_DIR / FILES["test"][0], install)
    counts = {"train": 0, "val": 0, "test": 0}
    source_bytes = 0
    for official, (images_file, labels_file) in FILES.items():
        images, labels = read_idx(SOURCE_DIR / images_file), read_idx(SOURCE_DIR / labels_file)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28) or labels.max() >= len(CLASSNAMES):
            raise DatasetError(f"{SOURCE_DIR / images_file}: unexpected shape {images.shape} or labels")
        source_bytes += (SOURCE_DIR / images_file).stat().st_size + (SOURCE_DIR / labels_file).stat().st_size
        for split in counts:
            counts[split] += len(split_indices(official, len(labels), split))
    return {
        "kind": "classification",
        "source": f"Debian package {PACKAGE} ({SOURCE_DIR})",
        "source_dir": str(SOURCE_DIR),
        "images": sum(counts.values()),
        "captions": 0,
        "splits": counts,
        "classnames": CLASSNAMES,
        "source_bytes": source_bytes,
    }


class FashionMNIST(ClassificationDataset):
    """One split of Fashion-MNIST, read from the idx files recorded by `prepare`."""

    def __init__(
        self, root: Path, split: str, transform: Transform | None = None, templates: list[str] | None = None
    ) -> None:
        if split not in ("train", "val", "test"):
            raise DatasetError(f"fashion-mnist: unknown split '{split}' (expected train, val or test)")
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
        source = Path(info["source_dir"])
        official = "test" if split == "test" else "train"
        images_file, labels_file = FILES[official]
        images, labels = read_idx(source / images_file), read_idx(source / labels_file)
        keep = split_indices(official, len(labels), split)
        self.images = images[keep]  # [N, 28, 28] uint8
        self.targets = labels[keep].astype(np.int64)  # [N]
        self.classnames = list(info["classnames"])
        self.templates = list(templates) if templates is not None else ["a photo of a {}."]
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def label(self, index: int) -> int:
        return int(self.targets[index])

    def labels(self) -> list[int]:
        return self.targets.tolist()

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])  # uint8 [28, 28] -> mode "L"
