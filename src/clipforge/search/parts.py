"""The on-disk layout of an embedded collection (clip-retrieval's, plus a manifest) and its verified reader.

    EMB/manifest.json               written last: model fingerprint, dim, source, and per part its rows and
                                    the sha256 of each of its files
    EMB/img_emb/img_emb_N.npy       float16 [rows, dim], L2-normalised image embeddings of part N
    EMB/text_emb/text_emb_N.npy     float16 [rows, dim], caption embeddings (only when some item has a caption);
                                    a row of zeros for an image without one (its part record counts them)
    EMB/metadata/metadata_N.parquet key, path | shard + member, caption, extra columns; row i = vector row i
    EMB/done/part_N.json            a finished part's record (what the manifest collects); written after its
                                    files, so its presence with matching checksums means the part is complete

Global row ids count through the parts in order: part 0's rows, then part 1's, and so on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write, atomic_write_text, sha256_file
from .errors import SearchError, require

__all__ = ["EMBEDDINGS_FORMAT", "EmbeddingSet", "Part", "open_embeddings", "part_files", "read_vectors"]

EMBEDDINGS_FORMAT = "clipforge-embeddings"
# metadata columns kept for `index sync` (a folder file's size and mtime when embedded), not shown as metadata
BOOKKEEPING_COLUMNS = ("file_bytes", "file_mtime_ns")


def part_files(number: int, with_text: bool) -> dict[str, str]:
    """The relative paths of part `number`'s files, by role."""
    files = {"img": f"img_emb/img_emb_{number}.npy", "metadata": f"metadata/metadata_{number}.parquet"}
    if with_text:
        files["text"] = f"text_emb/text_emb_{number}.npy"
    return files


@dataclass(frozen=True)
class Part:
    number: int
    rows: int
    files: dict[str, str]  # role -> relative path
    sha256: dict[str, str]  # relative path -> sha256
    skipped: dict[str, int] = field(default_factory=dict)  # unusable images of this part's slice, by kind
    uncaptioned: int = 0  # rows whose caption vector is zeros (an image without a caption)

    def record(self) -> dict[str, Any]:
        record = {"part": self.number, "rows": self.rows, "files": self.files, "sha256": self.sha256,
                  "skipped": self.skipped}
        if self.uncaptioned:  # absent when every row has one: the records of earlier versions stay valid
            record["uncaptioned"] = self.uncaptioned
        return record


def part_from_record(record: dict[str, Any], where: str) -> Part:
    try:
        return Part(int(record["part"]), int(record["rows"]), dict(record["files"]), dict(record["sha256"]),
                    {str(k): int(v) for k, v in record.get("skipped", {}).items()}, int(record.get("uncaptioned", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SearchError(f"{where}: malformed part record ({exc!r})") from None


def read_vectors(path: Path, dim: int | None = None, rows: int | None = None) -> np.ndarray:
    """A float16/float32 `.npy` of shape [rows, dim], memory-mapped; SearchError in one line if unreadable."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SearchError(f"{path}: embedding part is missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise SearchError(f"{path}: corrupt or truncated embedding part ({exc})") from None
    if array.ndim != 2 or array.dtype not in (np.float16, np.float32):
        raise SearchError(f"{path}: expected a float16 [rows, dim] array, got {array.dtype} {list(array.shape)}")
    if (dim is not None and array.shape[1] != dim) or (rows is not None and array.shape[0] != rows):
        raise SearchError(f"{path}: shape {list(array.shape)} does not match the manifest ({rows} x {dim})")
    return array


class EmbeddingSet:
    """A finished embedding directory: its manifest, parts, and row-level access to vectors and metadata."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        where = str(root / "manifest.json")
        self.parts = [part_from_record(r, where) for r in manifest.get("parts", [])]
        self.dim = int(manifest["dim"])
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        self.has_text = bool(manifest.get("has_text"))
        self.offsets = np.cumsum([0] + [p.rows for p in self.parts]).astype(np.int64)  # [parts + 1]
        self._lock = threading.Lock()
        self._tables: dict[int, Any] = {}
        self._narrow: dict[tuple[int, tuple[str, ...]], Any] = {}  # some columns of parts not read whole
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._uncaptioned: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def verify(self, part: Part) -> None:
        """Check every file of `part` against its recorded sha256."""
        for rel, digest in part.sha256.items():
            path = self.root / rel
            if not path.is_file():
                raise SearchError(f"{path}: embedding part file is missing")
            if sha256_file(path) != digest:
                raise SearchError(f"{path}: sha256 does not match manifest.json (corrupt or truncated part)")

    def vectors(self, part: Part, role: str = "img") -> np.ndarray:
        """Part `part`'s [rows, dim] vectors, memory-mapped (opened once, thread-safe)."""
        if role not in part.files:
            raise SearchError(f"{self.root}: part {part.number} has no {role} embeddings")
        with self._lock:
            cached = self._maps.get((part.number, role))
        if cached is None:
            cached = read_vectors(self.root / part.files[role], self.dim, part.rows)
            with self._lock:
                self._maps[(part.number, role)] = cached
        return cached

    def rows(self, rows: np.ndarray, role: str = "img") -> np.ndarray:
        """float32 vectors [m, dim] of rows `rows` [m] (any order, each in range)."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1  # [m] part index of each row
        for index in np.unique(which):
            mask = which == index
            out[mask] = self.vectors(self.parts[index], role)[rows[mask] - self.offsets[index]]
        return out

    def uncaptioned_rows(self) -> np.ndarray:
        """Ascending rows (of this set) whose image has no caption: zero caption vectors, found in the parts whose
        record counts some (read once); empty when the set has no caption vectors at all."""
        if self._uncaptioned is None:
            found = [np.flatnonzero(~np.asarray(self.vectors(part, "text")).any(axis=1)) + self.offsets[index]
                     for index, part in enumerate(self.parts) if part.uncaptioned and self.has_text]
            rows = np.concatenate(found).astype(np.int64) if found else np.empty(0, dtype=np.int64)
            with self._lock:
                self._uncaptioned = rows
        return self._uncaptioned

    def locate(self, row: int) -> tuple[Part, int]:
        """The part holding global row `row` and the row's index inside it."""
        if not 0 <= row < len(self):
            raise SearchError(f"row {row} is out of range for {self.root} ({len(self)} rows)")
        index = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.parts[index], row - int(self.offsets[index])

    def table(self, part: Part) -> Any:
        """The metadata of `part` as a pyarrow Table, read once and cached (thread-safe)."""
        with self._lock:
            cached = self._tables.get(part.number)
        if cached is not None:
            return cached
        table = self._read_metadata(part)
        with self._lock:
            self._tables[part.number] = table
        return table

    def columns(self, part: Part, names: tuple[str, ...]) -> Any:
        """The columns `names` of `part`'s metadata that it has, as a pyarrow Table: from the whole table when
        `table` has read it, else only those columns, read once and cached apart (scopes read the key and path
        columns of every part; the captions, often most of the bytes, stay on disk until a result needs them)."""
        with self._lock:
            cached = self._tables.get(part.number)
            narrow = self._narrow.get((part.number, names))
        if cached is not None:
            return cached.select([n for n in names if n in cached.column_names])
        if narrow is None:
            narrow = self._read_metadata(part, names)
            with self._lock:
                self._narrow[(part.number, names)] = narrow
        return narrow

    def _read_metadata(self, part: Part, names: Sequence[str] | None = None) -> Any:
        pq = require("pyarrow.parquet")
        path = self.root / part.files["metadata"]
        try:
            if names is not None:
                present = set(pq.read_schema(path).names)  # type: ignore[attr-defined]
                names = [n for n in names if n in present]
            table = pq.read_table(path, columns=names)  # type: ignore[attr-defined]
        except FileNotFoundError:
            raise SearchError(f"{path}: metadata part is missing") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
            raise SearchError(f"{path}: corrupt or truncated metadata part ({type(exc).__name__})") from None
        if table.num_rows != part.rows:
            raise SearchError(f"{path}: {table.num_rows} rows, manifest.json says {part.rows}")
        return table

    def row_metadata(self, row: int) -> dict[str, Any]:
        part, inside = self.locate(row)
        table = self.table(part)
        return {name: table.column(name)[inside].as_py() for name in table.column_names
                if name not in BOOKKEEPING_COLUMNS}


def load_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not root.is_dir():
        raise SearchError(f"{root}: no such embedding directory")
    if not path.is_file():
        raise SearchError(f"{path}: missing (is {root} an unfinished or not a `clipforge embed` output?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SearchError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EMBEDDINGS_FORMAT:
        raise SearchError(f"{path}: not a clipforge embeddings manifest (format != {EMBEDDINGS_FORMAT!r})")
    for key in ("dim", "fingerprint", "parts"):
        if key not in manifest:
            raise SearchError(f"{path}: missing key {key!r}")
    return manifest


def open_embeddings(root: str | Path, verify: bool = False) -> EmbeddingSet:
    """Read an embedding directory's manifest (and, with `verify`, every part's checksums)."""
    root = Path(root)
    embeddings = EmbeddingSet(root, load_manifest(root))
    if verify:
        for part in embeddings.parts:
            embeddings.verify(part)
    return embeddings


# --- Writing -------------------------------------------------------------------------------------------------


def _save_npy(array: np.ndarray) -> Any:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append ".npy" to the temporary name
            np.save(handle, array, allow_pickle=False)

    return write


def write_part(root: Path, number: int, img: np.ndarray, text: np.ndarray | None,
               columns: dict[str, list[str | None]], skipped: dict[str, int] | None = None) -> Part:
    """Publish part `number`: each file atomically, then its record `done/part_N.json` (the commit mark).

    `img`/`text` are [rows, dim] float arrays (stored as float16; a text row of zeros: no caption); `columns` the
    metadata columns (strings or None), each of length rows. Identical inputs give byte-identical files (no
    timestamps are written).
    """
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    files = part_files(number, text is not None)
    atomic_write(root / files["img"], _save_npy(np.ascontiguousarray(img, dtype=np.float16)))
    if text is not None:
        atomic_write(root / files["text"], _save_npy(np.ascontiguousarray(text, dtype=np.float16)))
    # explicit string type: a column that is all None in one part must not become a null-typed column there
    table = pa.table({name: pa.array(values, type=pa.string())  # type: ignore[attr-defined]
                      for name, values in columns.items()})
    atomic_write(root / files["metadata"], lambda tmp: pq.write_table(table, tmp))  # type: ignore
    digests = {rel: sha256_file(root / rel) for rel in files.values()}
    uncaptioned = int((~np.asarray(text).any(axis=1)).sum()) if text is not None else 0
    part = Part(number, int(img.shape[0]), files, digests, dict(sorted((skipped or {}).items())), uncaptioned)
    atomic_write_text(root / "done" / f"part_{number}.json", json.dumps(part.record(), indent=1, sort_keys=True))
    return part


def finished_part(root: Path, number: int) -> Part | None:
    """Part `number`'s record if it exists and every file matches its sha256; None means: (re)do the part."""
    path = root / "done" / f"part_{number}.json"
    try:
        part = part_from_record(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SearchError):
        return None
    embeddings_ok = all((root / rel).is_file() and sha256_file(root / rel) == digest
                        for rel, digest in part.sha256.items())
    return part if embeddings_ok and part.number == number else None


def remove_temporaries(root: Path, numbers: list[int]) -> None:
    """Delete the temporary files a killed run left for parts `numbers` (only those: other ranks may be
    writing theirs right now)."""
    for number in numbers:
        for rel in [*part_files(number, True).values(), f"done/part_{number}.json"]:
            path = root / rel
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)


def write_manifest(root: Path, parts: list[Part], header: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json (last): `header` (fingerprint, dim, model, source, ...) plus the parts and totals."""
    skipped: dict[str, int] = {}
    for part in parts:
        for kind, count in part.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + count
    manifest = {"format": EMBEDDINGS_FORMAT, "version": 1, **header, "rows": sum(p.rows for p in parts),
                "skipped": skipped, "parts": [p.record() for p in parts]}
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
