"""Shared by the tests that build a small manifest of real image files on disk."""

from __future__ import annotations

import csv
from pathlib import Path


def write_pairs_csv(folder: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """Write `folder/pairs.csv` with clipforge's manifest columns (image, caption, split, label)."""
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "split", "label"])
        writer.writerows(rows)
    return path
