"""An image folder with sidecar captions: `cat.png` next to `cat.txt` holding one caption per line.

Images are found recursively. Optionally the name of each image's parent folder is its category label (for
zero-shot), and a fixed split is chosen from a hash of the image's path relative to the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .base import CaptionDataset, CaptionRecord, DatasetError, Transform, hash_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class FolderImage:
    """An image file found under a root: its path (root joined with `parts`), whether it is itself a symlink,
    and the names of the files beside it (to find its sidecar without another system call)."""

    parts: tuple[str, ...]  # relative to the root
    path: str
    is_symlink: bool
    siblings: frozenset[str]


def walk_images(root: Path) -> list[FolderImage]:
    """Every file under `root` with an image suffix, sorted by relative path (component by component, as
    sorting `Path`s does), found as `root.rglob("*")` finds them: symlinked directories are listed but not
    entered, unreadable ones skipped. One `scandir` per directory instead of several `stat`s per file: the
    listing of a 10k-image folder took 2 s with `rglob` + `is_file` + `resolve`, most of `index sync`."""
    found: list[FolderImage] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(str(root), ())]
    while stack:
        directory, parts = stack.pop()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            continue
        dirs = {e.name for e in entries if _is_dir(e)}
        siblings = frozenset(e.name for e in entries if e.name not in dirs and _is_file(e))
        for entry in entries:
            if entry.name in dirs:
                if not entry.is_symlink():
                    stack.append((entry.path, parts + (entry.name,)))
            elif split_suffix(entry.name)[1].lower() in IMAGE_SUFFIXES and _is_file(entry):
                found.append(FolderImage(parts + (entry.name,), entry.path, entry.is_symlink(), siblings))
    found.sort(key=lambda image: image.parts)
    return found


def split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name as `Path.stem` / `Path.suffix` split it ("..png" -> (".", ".png"), unlike
    os.path.splitext, which skips leading dots)."""
    i = name.rfind(".")
    return (name[:i], name[i:]) if 0 < i < len(name) - 1 else (name, "")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows a symlink, as Path.is_file does: a dangling one is no file
    except OSError:
        return False


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
    for image in (Path(f.path) for f in walk_images(root)):
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
