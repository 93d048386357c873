"""What `clipforge embed` reads: a deterministic listing of a collection's images (and captions).

The listing is the contract of exactly-once embedding: it is sorted (folders by relative path, manifests in
file order, shards in shard order then member order), so part N is the same slice of the same items on every
run and every rank. Each item knows how to read its image bytes and its caption, so decoding runs in loader
workers and nothing is read twice.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.folder import IMAGE_SUFFIXES, read_sidecar, split_suffix, walk_images
from ..data.robust import BadSample, clean_caption, convert_to_rgb, load_image
from ..transforms import upright
from .errors import SearchError

__all__ = ["Item", "Listing", "list_source", "read_item"]

MAX_PIXELS = 89_478_485  # PIL's default bomb limit, as in training


@dataclass(frozen=True)
class Item:
    """One image: its key, where it lies (a file, or a tar member at offset/size) and its caption."""

    key: str
    path: str | None = None
    shard: str | None = None
    member: str | None = None
    offset: int = 0
    size: int = 0
    caption: str | None = None
    caption_member: tuple[int, int] | None = None  # (offset, size) of the KEY.txt member in the shard
    extra: dict[str, Any] = field(default_factory=dict)
    stat: tuple[int, int] | None = None  # a folder file's (size in bytes, mtime in ns) when listed: index sync


@dataclass(frozen=True)
class Listing:
    items: list[Item]
    description: dict[str, Any]  # kind, path, split: what the manifest records as the source
    has_text: bool  # some item has a caption: caption vectors are written for every row (zeros where none is)

    def digest(self) -> str:
        """sha256 over every item's key and location: a restart must see the same listing."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.key}\0{item.path}\0{item.shard}\0{item.member}\0{item.caption}\n".encode())
        return h.hexdigest()


def _folder(root: Path) -> Listing:
    if not root.is_dir():
        raise SearchError(f"{root}: not a folder")
    items = []
    resolved: dict[str, str] = {}  # a directory -> its real path (a file's own symlink is resolved on its own)
    for image in walk_images(root):
        folder, name = os.path.split(image.path)
        stem = split_suffix(name)[0]
        sidecar = Path(folder, stem + ".txt")
        captions = read_sidecar(sidecar) if stem + ".txt" in image.siblings else []
        if image.is_symlink:
            real = os.path.realpath(image.path)
        else:
            if folder not in resolved:
                resolved[folder] = os.path.realpath(folder)
            real = os.path.join(resolved[folder], name)
        key = "/".join(image.parts[:-1] + (stem,))
        info = os.stat(image.path)
        items.append(Item(key=key, path=real, caption=captions[0] if captions else None,
                          stat=(info.st_size, info.st_mtime_ns)))
    has_text = any(item.caption is not None for item in items)
    return Listing(items, {"kind": "folder", "path": str(root.resolve())}, has_text)


def _manifest(path: Path, split: str | None, classnames: list[str] | None = None) -> Listing:
    from ..data.manifest import read_manifest  # noqa: PLC0415

    entries = read_manifest(path, check_files=False)  # a missing image is skipped and counted, not fatal
    items = []
    base = path.parent.resolve()
    for entry in entries:
        if split is not None and entry.split != split:
            continue
        image = entry.image.resolve()
        key = image.relative_to(base).with_suffix("").as_posix() if image.is_relative_to(base) else str(image)
        extra = {"split": entry.split, "label": entry.label}
        items.append(Item(key=key, path=str(image), caption=entry.captions[0], extra=extra))
    description = {"kind": "manifest", "path": str(path.resolve()), "split": split}
    return Listing(items, description, has_text=True)


def _shards(spec: str) -> Listing:
    from ..data.shards import IMAGE_EXTENSIONS, ShardError, expand_shards, scan_shard  # noqa: PLC0415

    try:
        paths = [str(Path(p).resolve()) for p in expand_shards(spec)]
        items = []
        for number, shard in enumerate(paths):
            for ref in scan_shard(shard, number):
                members = {ext: (offset, size) for ext, offset, size in ref.members}
                ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                offset, size = members[ext] if ext else (0, 0)
                items.append(Item(key=ref.key, shard=shard, member=f"{ref.key}.{ext}" if ext else None,
                                  offset=offset, size=size, caption_member=members.get("txt")))
    except ShardError as exc:
        raise SearchError(str(exc)) from None
    has_text = any(item.caption_member is not None for item in items)
    return Listing(items, {"kind": "shards", "path": spec, "shards": len(paths)}, has_text)


def _offline(name: str, split: str | None, root: str | None) -> Listing:
    from ..data.base import CaptionDataset  # noqa: PLC0415
    from ..data.catalog import get_dataset  # noqa: PLC0415

    dataset = get_dataset(name, split, root=root)
    if not isinstance(dataset, CaptionDataset):
        raise SearchError(f"dataset '{name}' has no image files to embed (only captioned image datasets can be)")
    items = []
    for record in dataset.records:
        label = dataset.classnames[record.label] if dataset.classnames and record.label is not None else None
        image = record.image.resolve()
        items.append(Item(key=image.stem, path=str(image), caption=record.captions[0], extra={"label": label}))
    return Listing(items, {"kind": "dataset", "name": name, "split": split}, has_text=True)


def list_source(source: str, split: str | None = None, data_root: str | None = None) -> Listing:
    """The listing of `source`: an offline dataset name, a .csv/.tsv manifest, a folder of images, or tar
    shards (a .tar file, a glob, a brace range, or a folder holding only .tar files)."""
    from ..data.offline import list_offline_datasets  # noqa: PLC0415

    path = Path(source)
    if source in list_offline_datasets():
        listing = _offline(source, split, data_root)
    elif path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        listing = _manifest(path, split)
    elif source.endswith(".tar") or any(c in source for c in "*?{") or \
            (path.is_dir() and any(path.glob("*.tar")) and not any(
                p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())):
        listing = _shards(source)
    elif path.is_dir():
        listing = _folder(path)
    else:
        raise SearchError(f"{source}: not an offline dataset name, a .csv/.tsv manifest, an image folder or tar shards")
    if split is not None and listing.description["kind"] in ("folder", "shards"):
        raise SearchError(f"--split {split}: {source} has no splits (a manifest or a dataset has)")
    if not listing.items:
        raise SearchError(f"{source}: empty collection (no images found)")
    return listing


def _read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise BadSample("truncated", shard, f"member at {offset} cut short ({len(data)} of {size} bytes)")
    return data


def _decode(data: bytes, where: str) -> Image.Image:
    """Decode image bytes fully, refusing decompression bombs from the header; BadSample by kind otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise BadSample("decompression_bomb", where, f"{image.size[0]}x{image.size[1]} pixels")
            image.load()
            return upright(image)
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on malformed bytes
        text = str(exc) or type(exc).__name__
        raise BadSample("truncated" if "truncat" in text.lower() else "unreadable", where, text) from None


def read_item(item: Item) -> tuple[Image.Image, str | None]:
    """(RGB image, caption or None) of `item`; BadSample (kind, where) if it cannot be used. A missing or empty
    caption is None (the image is still embedded, without a caption vector); undecodable caption bytes are a
    BadSample."""
    if item.path is not None:
        image = load_image(item.path, MAX_PIXELS)
        where = item.path
    else:
        where = f"{item.shard}:{item.member or item.key}"
        if item.member is None:
            raise BadSample("missing", where, "the sample has no image member")
        if item.size < 0:  # scan_shard marks a member that runs past the end of the file
            raise BadSample("truncated", where, "image member cut short")
        image = _decode(_read_member(str(item.shard), item.offset, item.size), where)
    raw: str | bytes | None = item.caption
    if item.caption_member is not None:  # KEY.txt: captions one per line, the first one is kept
        raw = _read_member(str(item.shard), *item.caption_member)
    caption = None
    if raw is not None:
        try:
            caption = clean_caption(raw, where).splitlines()[0].strip()
        except BadSample as bad:
            if bad.kind != "empty_caption":
                raise
    rgb, _ = convert_to_rgb(image)
    return rgb, caption

