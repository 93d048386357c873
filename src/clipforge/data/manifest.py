"""Image-caption manifests: a CSV or TSV file with one row per (image, caption).

Columns (names configurable): `image` — a path relative to the manifest's folder, or absolute; `caption`.
Optional: `split` (train/val/test or any name) and `label` (a category name for zero-shot). An image with
several captions takes several rows, or one row whose caption holds them joined by `caption_sep`. Columns not
named here are ignored. Every problem is reported on one line naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .base import CaptionDataset, CaptionRecord, DatasetError, Transform


@dataclass(frozen=True)
class ManifestColumns:
    """Which columns of the manifest hold what; `split` and `label` may be absent from the file."""

    image: str = "image"
    caption: str = "caption"
    split: str = "split"
    label: str = "label"


@dataclass
class ManifestEntry:
    """All rows of one image, gathered: its captions in file order, its split and label (or None)."""

    image: Path
    captions: list[str] = field(default_factory=list)
    split: str | None = None
    label: str | None = None
    line: int = 0  # first line of the file that names this image


def _delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        return delimiter
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    raise DatasetError(f"{path}: cannot tell the delimiter from the extension '{suffix}' (expected .csv or .tsv)")


def _same(entry: ManifestEntry, attr: str, value: str | None, path: Path, line: int) -> None:
    """Several rows of one image must agree on its split and label."""
    old = getattr(entry, attr)
    if old is None and len(entry.captions) == 0:
        setattr(entry, attr, value)
    elif old != value:
        raise DatasetError(
            f"{path}:{line}: image '{entry.image.name}' has {attr} '{value}' here but '{old}' on line {entry.line}"
        )


def _captions(field: str | None, sep: str | None, keep_bad: bool, where: str, column: str, image: str) -> list[str]:
    """The captions of one row's caption field; bad ones kept (see `read_manifest`) or refused."""
    captions = [c.strip() for c in field.split(sep)] if field and sep else [(field or "").strip()]
    if keep_bad:
        return [c for c in captions if c] or [""]
    if any(not _is_utf8(c) for c in captions):
        raise DatasetError(f"{where}: '{column}' is not UTF-8 text; save the manifest as UTF-8")
    captions = [c for c in captions if c]
    if not captions:
        raise DatasetError(f"{where}: empty '{column}' for image '{image}'")
    return captions


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that did not decode were kept as lone surrogates
        return False
    return True


def read_manifest(
    path: str | Path,
    columns: ManifestColumns = ManifestColumns(),
    caption_sep: str | None = None,
    delimiter: str | None = None,
    check_files: bool = True,
    keep_bad_captions: bool = False,
) -> list[ManifestEntry]:
    """Parse and validate a manifest; returns one entry per image, in order of first appearance.

    An empty or non-UTF-8 caption is an error naming its line, unless `keep_bad_captions`: training keeps it
    as it is ("" or text carrying the undecodable bytes as surrogates) for `data.robust` to skip and count.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    base = path.parent
    entries: dict[Path, ManifestEntry] = {}
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle, delimiter=_delimiter(path, delimiter))
        header = reader.fieldnames or []
        for required in (columns.image, columns.caption):
            if required not in header:
                found = ", ".join(header) if header else "nothing"
                raise DatasetError(f"{path}: missing column '{required}' (header has: {found})")
        has_split, has_label = columns.split in header, columns.label in header
        for row in reader:
            line = reader.line_num
            image_field = (row.get(columns.image) or "").strip()
            caption_field = row.get(columns.caption)
            if not image_field:
                raise DatasetError(f"{path}:{line}: empty '{columns.image}'")
            image = Path(image_field) if Path(image_field).is_absolute() else base / image_field
            captions = _captions(caption_field, caption_sep, keep_bad_captions, f"{path}:{line}", columns.caption,
                                 image_field)
            entry = entries.get(image)
            if entry is None:
                if check_files and not image.is_file():
                    raise DatasetError(f"{path}:{line}: image file '{image_field}' not found (looked at {image})")
                entry = entries[image] = ManifestEntry(image=image, line=line)
            split = (row.get(columns.split) or "").strip() or None if has_split else None
            label = (row.get(columns.label) or "").strip() or None if has_label else None
            _same(entry, "split", split, path, line)
            _same(entry, "label", label, path, line)
            entry.captions.extend(captions)
    if not entries:
        raise DatasetError(f"{path}: no rows")
    return list(entries.values())


def write_manifest(path: str | Path, rows: Iterable[Sequence[str]], with_label: bool = True) -> int:
    """Write a TSV manifest with columns image, caption, split[, label]; returns the number of rows.

    Image paths under the manifest's folder are written relative to it, others absolute.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(path.parent) + os.sep
    header = ["image", "caption", "split"] + (["label"] if with_label else [])
    count = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            image = str(row[0])
            if os.path.isabs(image) and os.path.abspath(image).startswith(base):  # string test: no disk access
                image = os.path.abspath(image)[len(base) :]
            writer.writerow([image, *row[1 : len(header)]])
            count += 1
    tmp.replace(path)  # atomic: a half-written manifest never looks prepared
    return count


def class_list(entries: Sequence[ManifestEntry], classnames: Sequence[str] | None, path: Path) -> list[str] | None:
    """The class names: the given list (every label must be in it), else the sorted distinct labels."""
    labels = {e.label for e in entries if e.label is not None}
    if classnames is None:
        return sorted(labels) if labels else None
    known = set(classnames)
    for entry in entries:
        if entry.label is not None and entry.label not in known:
            raise DatasetError(f"{path}:{entry.line}: label '{entry.label}' is not one of the {len(known)} classes")
    return list(classnames)


class ManifestDataset(CaptionDataset):
    """The images of a manifest (optionally one split) with their captions and category labels."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        transform: Transform | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        columns: ManifestColumns = ManifestColumns(),
        caption_sep: str | None = None,
        check_files: bool = True,
    ) -> None:
        path = Path(path)
        entries = read_manifest(path, columns, caption_sep=caption_sep, check_files=check_files)
        names = class_list(entries, classnames, path)
        if split is not None:
            present = sorted({e.split for e in entries if e.split is not None})
            if not present:
                raise DatasetError(f"{path}: no '{columns.split}' column, so split '{split}' cannot be selected")
            entries = [e for e in entries if e.split == split]
            if not entries:
                raise DatasetError(f"{path}: no image in split '{split}' (splits present: {', '.join(present)})")
        index = {name: i for i, name in enumerate(names or [])}
        records = [
            CaptionRecord(e.image, tuple(e.captions), index[e.label] if e.label is not None else None)
            for e in entries
        ]
        name = f"{path.name}:{split}" if split else path.name
        super().__init__(records, transform, classnames=names, templates=templates, name=name)
        self.path = path
        self.split = split
