"""Datasets by name: the prepared offline corpora, or a manifest file or image folder given by path.

`get_dataset("emoji", "test", transform)` returns a caption dataset (use `.as_classification()` for zero-shot
over its category labels); `get_dataset("fashion-mnist", "test", transform)` a classification dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import CaptionDataset, ClassificationDataset, DatasetError, Transform
from .folder import FolderDataset
from .manifest import ManifestDataset
from .offline import data_root, list_offline_datasets, prepare_command, read_info


def _templates(name: str) -> list[str]:
    from ..eval.templates import load_templates  # noqa: PLC0415  (prompt data lives with evaluation)

    return load_templates(name)


def _manifest_name(name: str, info: dict[str, Any], language: str) -> str:
    if language == "en":
        return "manifest.tsv"
    languages = info.get("languages", {})
    if language not in languages:
        known = ", ".join(sorted(languages)) if languages else "English only"
        raise DatasetError(f"dataset '{name}' has no captions in language '{language}' (available: {known})")
    return f"manifest.{language}.tsv"


def get_dataset(
    name: str,
    split: str | None,
    transform: Transform | None = None,
    root: str | Path | None = None,
    language: str = "en",
) -> CaptionDataset | ClassificationDataset:
    """Dataset `name` (an offline dataset, a .csv/.tsv manifest or an image folder), restricted to `split`.

    An offline dataset must have been prepared (`clipforge data prepare NAME`); `language` picks the caption
    language of datasets that have several (tuxpaint).
    """
    path = Path(name)
    if name not in list_offline_datasets():
        if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
            return ManifestDataset(path, split=split, transform=transform)
        if path.is_dir():
            return FolderDataset(path, split=split, transform=transform)
        raise DatasetError(
            f"unknown dataset '{name}' (expected one of {', '.join(list_offline_datasets())}, "
            "a .csv/.tsv manifest or an image folder)"
        )
    info = read_info(name, root)
    dest = data_root(root) / name
    if name == "fashion-mnist":
        from .sources.fashion_mnist import FashionMNIST  # noqa: PLC0415

        if split is None:
            raise DatasetError("fashion-mnist: a split is required (train, val or test)")
        return FashionMNIST(dest, split, transform, templates=_templates(name))
    manifest = dest / _manifest_name(name, info, language)
    if not manifest.is_file():
        raise DatasetError(f"{manifest} is missing: prepare the dataset again (run: {prepare_command(name)})")
    return ManifestDataset(
        manifest, split=split, transform=transform, classnames=info["classnames"], templates=_templates(name)
    )
