"""An image folder with sidecar captions: `cat.png` next to `cat.txt` holding one caption per line.

Images are found recursively. Optionally the name of each image's parent folder is its category label (for
zero-shot), and a fixed split is chosen from a hash of the image's path relative to the root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import CaptionDataset, CaptionRecord, DatasetError, Transform, hash_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def read_sidecar(path: Path) -> list[str]:
    """The captions of a sidecar text file: its non-blank lines, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: captions are not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def scan_folder(root: Path, require_captions: bool = True) -> list[tuple[Path, list[str]]]:
    """(image, captions) for every image under `root`, sorted by path.

    An image without a sidecar, or with an empty one, is an error when `require_captions`, else it is left out.
    """
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        sidecar = image.with_suffix(".txt")
        captions = read_sidecar(sidecar) if sidecar.is_file() else []
        if not captions:
            if require_captions:
                why = "is empty" if sidecar.is_file() else "is missing"
                raise DatasetError(f"{image}: caption file {sidecar.name} {why} (one caption per line expected)")
            continue
        found.append((image, captions))
    if not found:
        raise DatasetError(f"{root}: no image with captions (looked for {', '.join(IMAGE_SUFFIXES)} + .txt)")
    return found


class FolderDataset(CaptionDataset):
    """Images of a folder tree with their sidecar captions; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Transform | None = None,
        label_from_folder: bool = False,
        templates: Sequence[str] | None = None,
        require_captions: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
    ) -> None:
        root = Path(root)
        items = scan_folder(root, require_captions)
        classnames = None
        labels: list[int | None] = [None] * len(items)
        if label_from_folder:  # classes from the whole tree, so every split numbers them the same way
            folders = [image.parent.relative_to(root).as_posix() for image, _ in items]
            if "." in folders:
                top = items[folders.index(".")][0]
                raise DatasetError(f"{top}: lies directly in the root, so it has no folder to take a label from")
            classnames = sorted(set(folders))
            index = {name: i for i, name in enumerate(classnames)}
            labels = [index[f] for f in folders]
        pairs = list(zip(items, labels))
        if split is not None:
            pairs = [
                ((image, caps), lab)
                for (image, caps), lab in pairs
                if hash_split(image.relative_to(root).as_posix(), val_fraction, test_fraction) == split
            ]
            if not pairs:
                raise DatasetError(f"{root}: no image falls in split '{split}'")
        records = [CaptionRecord(image, tuple(caps), lab) for (image, caps), lab in pairs]
        super().__init__(records, transform, classnames=classnames, templates=templates, name=root.name)
        self.root = root
        self.split = split
