"""Writing image-caption pairs as WebDataset tar shards in img2dataset's layout.

`00000.tar, 00001.tar, ...` in `out_dir`, each holding up to `samples_per_shard` samples as `KEY.jpg`,
`KEY.txt` (the captions, one per line) and `KEY.json` (key, captions, source, width, height), plus
`00000_stats.json` with the shard's sample count. Keys are the
shard number followed by the sample number in the shard (`000000000`, `000000001`, ...), as img2dataset does.
Each tar is written to a temporary name and renamed when complete, with fixed member metadata, so the same
pairs always give byte-identical shards. `clipforge.data.shards.ShardDataset` reads them back.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from ..transforms import to_rgb
from .shards import ShardError, stats_path

logger = logging.getLogger(__name__)

ImageSource = str | Path | Image.Image | bytes
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ShardWriteSummary:
    """What `write_shards` wrote: the shard paths, how many samples, and the sources it skipped."""

    shards: list[Path] = field(default_factory=list)
    samples: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"shards": [str(p) for p in self.shards], "samples": self.samples, "skipped": self.skipped}


def encode_image(source: ImageSource, image_format: str = "jpg", quality: int = 95) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height) of an image; with 'keep', JPEG/PNG/WebP files are stored as they are.

    With 'jpg' (img2dataset's default) JPEG files are copied and anything else is re-encoded as JPEG, alpha
    composited on white. The image is always decoded once, so a broken file fails here and not in training.
    """
    data = source if isinstance(source, bytes) else None
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    if isinstance(source, Image.Image):
        image = source
    else:
        assert data is not None
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = opened
    ext = _FORMATS.get(image.format or "")
    if data is not None and ext is not None and (image_format == "keep" or ext == "jpg"):
        return data, ext, image.width, image.height
    out = io.BytesIO()
    to_rgb(image).save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg", image.width, image.height


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Opens, fills and atomically publishes one tar at a time."""

    def __init__(self, out_dir: Path, per_shard: int, start_shard: int) -> None:
        self.out_dir, self.per_shard, self.shard = out_dir, per_shard, start_shard - 1
        self.width = max(4, len(str(per_shard - 1)))
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.written: list[Path] = []

    def next_key(self) -> str:
        if self.tar is None or self.count == self.per_shard:
            self.close()
            self.shard += 1
            self.count = 0
            self.tar = tarfile.open(self._path().with_suffix(".tar.tmp"), "w", format=tarfile.USTAR_FORMAT)
        key = f"{self.shard:05d}{self.count:0{self.width}d}"
        self.count += 1
        return key

    def _path(self) -> Path:
        return self.out_dir / f"{self.shard:05d}.tar"

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            # img2dataset's stats file: readers learn how many samples a truncated copy of this shard lost
            stats, tmp = stats_path(self._path()), self._path().with_suffix(".stats.tmp")
            tmp.write_text(json.dumps({"count": self.count, "successes": self.count}) + "\n")
            os.replace(tmp, stats)
            os.replace(self._path().with_suffix(".tar.tmp"), self._path())
            self.written.append(self._path())
            self.tar = None

    def abort(self) -> None:
        """Drop the shard being written (after an error): only complete shards are ever published."""
        if self.tar is not None:
            self.tar.close()
            self._path().with_suffix(".tar.tmp").unlink(missing_ok=True)
            self.tar = None


def write_shards(
    pairs: Iterable[tuple[ImageSource, str | Sequence[str]]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    on_error: str = "raise",
    start_shard: int = 0,
) -> ShardWriteSummary:
    """Write (image, caption or captions) pairs as tar shards; returns what was written.

    An image is a file path, encoded bytes or a PIL image. `on_error='skip'` leaves out (and lists in the
    summary) images that cannot be read instead of stopping.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard: expected a positive integer, got {samples_per_shard}")
    if image_format not in ("jpg", "keep"):
        raise ValueError(f"image_format: expected 'jpg' or 'keep', got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sink, summary = _ShardSink(out, samples_per_shard, start_shard), ShardWriteSummary()
    try:
        for number, (source, captions) in enumerate(pairs):
            name = str(source) if isinstance(source, (str, Path)) else f"pair {number}"
            captions = [captions] if isinstance(captions, str) else list(captions)
            captions = [c.strip() for c in captions if c.strip()]
            try:
                if not captions or any("\n" in c for c in captions):
                    raise ShardError(f"{name}: expected one or more non-empty single-line captions")
                data, ext, width, height = encode_image(source, image_format, quality)
            except (OSError, ShardError, Image.DecompressionBombError) as exc:
                if on_error == "raise":
                    raise ShardError(f"{name}: cannot be written to a shard ({exc})") from exc
                summary.skipped.append(name)
                logger.warning("skipping %s: %s", name, exc)
                continue
            key = sink.next_key()
            meta = {"key": key, "caption": captions[0], "captions": captions, "source": name,
                    "width": width, "height": height}
            assert sink.tar is not None
            _add_member(sink.tar, f"{key}.{ext}", data)
            _add_member(sink.tar, f"{key}.txt", "\n".join(captions).encode("utf-8"))
            _add_member(sink.tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            summary.samples += 1
    except BaseException:
        sink.abort()
        raise
    sink.close()
    summary.shards = sink.written
    return summary


def pairs_from_source(source: str | Path, split: str | None = None) -> list[tuple[Path, list[str]]]:
    """(image path, captions) of a CSV/TSV manifest (only the images of `split`, if given) or of an image
    folder with sidecar .txt captions."""
    path = Path(source)
    if path.is_dir():
        if split is not None:
            raise ShardError(f"--split {split}: {source} is a folder, and only a manifest has splits")
        from .folder import scan_folder  # noqa: PLC0415 - only this command needs the folder reader

        return [(image, list(captions)) for image, captions in scan_folder(path)]
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        from .manifest import read_manifest  # noqa: PLC0415

        entries = read_manifest(path)
        if split is not None:
            splits = sorted({e.split for e in entries if e.split is not None})
            entries = [e for e in entries if e.split == split]
            if not entries:
                raise ShardError(f"--split {split}: no image of {source} is in that split "
                                 f"(its splits: {', '.join(splits) if splits else 'none, no split column'})")
        return [(entry.image, list(entry.captions)) for entry in entries]
    raise ShardError(f"{source}: expected a folder of images with .txt captions, or a .csv/.tsv manifest")


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `clipforge data shards`."""
    parser.add_argument("--from", dest="source", required=True, metavar="MANIFEST_OR_FOLDER",
                        help="a CSV/TSV manifest (image, caption columns) or a folder of images with .txt captions")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for 00000.tar, 00001.tar, ...")
    parser.add_argument("--split", metavar="NAME", help="only the images of this split of the manifest (e.g. train)")
    parser.add_argument("--per-shard", type=int, default=1000, metavar="N", help="samples per shard (1000)")
    parser.add_argument("--image-format", choices=("jpg", "keep"), default="jpg",
                        help="jpg: re-encode non-JPEG images as JPEG (default); keep: store PNG/WebP as they are")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards already in --out (without it, a folder holding shards is refused)")
    parser.add_argument("--output", metavar="FILE.json", help="write the summary as JSON")


def existing_shards(out_dir: Path, overwrite: bool) -> list[Path]:
    """The shards already in `out_dir` (to replace when `overwrite`); ShardError if `out_dir` cannot take new
    shards: not a folder, or holding shards that would be mixed into the new set."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"--out {out_dir}: is a file; expected a folder for 00000.tar, 00001.tar, ...")
    old = sorted(p for p in out_dir.glob("*.tar") if p.stem.isdigit()) if out_dir.is_dir() else []
    if old and not overwrite:
        raise ShardError(f"--out {out_dir}: already holds {len(old)} shards ({old[0].name} ...); a new set written "
                         "there would mix with them: choose an empty folder, or pass --overwrite to replace them")
    return old


def run_shards_command(args: argparse.Namespace) -> dict[str, Any]:
    """`clipforge data shards --from MANIFEST_OR_FOLDER --out DIR [--per-shard N]`; returns the summary."""
    if args.per_shard < 1:
        raise ShardError(f"--per-shard: expected a positive number of samples, got {args.per_shard}")
    out = Path(args.out)
    old = existing_shards(out, getattr(args, "overwrite", False))
    pairs = pairs_from_source(args.source, getattr(args, "split", None))
    summary = write_shards(pairs, out, args.per_shard, image_format=getattr(args, "image_format", "jpg"),
                           on_error="skip" if getattr(args, "skip_bad", False) else "raise")
    for stale in set(old) - set(summary.shards):  # old shards beyond the new set's last number
        stale.unlink()
        stats_path(stale).unlink(missing_ok=True)
    result = summary.as_dict()
    print(f"wrote {summary.samples} samples in {len(summary.shards)} shards to {args.out}"
          + (f"; replaced {len(old)} old shards" if old else "")
          + (f"; skipped {len(summary.skipped)} unreadable images" if summary.skipped else ""))
    if getattr(args, "output", None):
        from ..checkpoint import atomic_write_text  # noqa: PLC0415

        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    return result
