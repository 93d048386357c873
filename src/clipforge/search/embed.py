"""`clipforge embed`: a collection -> resumable, exactly-once embedding parts (see `parts.py` for the layout).

Part N is items [N * part_size, (N + 1) * part_size) of the sorted listing, embedded in fixed batches of
`batch_size` consecutive items (unusable ones dropped from their batch), so its bytes depend only on the
listing, the model, the batch size, the precision and the device type: not on which process embeds it, nor
on whether the run was interrupted. A process of rank r among W (torchrun's RANK / WORLD_SIZE, no process
group) embeds parts r, r + W, ...; finished parts (verified by sha256) are skipped; rank 0 waits for every
part's record on disk, then writes manifest.json.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..allocator import reuse_freed_memory
from ..checkpoint import atomic_write_text
from ..data.robust import BadSample
from .encoder import Encoder, load_encoder
from .errors import SearchError, require
from .parts import Part, finished_part, remove_temporaries, write_manifest, write_part
from .sources import Item, Listing, list_source, read_item

__all__ = ["EmbedOptions", "embed_collection", "rank_and_world", "run_embedding"]


@dataclass(frozen=True)
class EmbedOptions:
    part_size: int = 10_000
    batch_size: int = 64
    workers: int = 2  # loader processes decoding and preprocessing images
    progress: bool = True
    wait_timeout_s: float = 7 * 24 * 3600.0  # rank 0 waiting for the other ranks' parts


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise SearchError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise SearchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


class _Images(torch.utils.data.Dataset):
    """Item index -> (index, pixels or None, caption, skipped kind or None); runs in loader workers."""

    def __init__(self, items: list[Item], encoder: Encoder) -> None:
        self.items, self.preprocess = items, encoder.preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        try:
            image, caption = read_item(self.items[index])
        except BadSample as bad:
            return index, None, None, bad.kind
        return index, self.preprocess(image), caption, None


def _collate(batch: list) -> list:
    return batch


def _batches(parts: list[int], total: int, opts: EmbedOptions) -> list[list[int]]:
    """Fixed batches: each part's item range cut into consecutive runs of batch_size items."""
    out = []
    for number in parts:
        lo, hi = number * opts.part_size, min(total, (number + 1) * opts.part_size)
        out.extend(list(range(start, min(hi, start + opts.batch_size))) for start in range(lo, hi, opts.batch_size))
    return out


class _PartBuffer:
    """Rows of one part gathered batch by batch until its last batch has been embedded."""

    def __init__(self) -> None:
        self.img: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.rows: list[Item] = []
        self.captions: list[str | None] = []
        self.skipped: Counter[str] = Counter()


def _columns(rows: list[Item], captions: list[str | None], shards: bool) -> dict[str, list[str | None]]:
    columns: dict[str, list[str | None]] = {"key": [r.key for r in rows]}
    if shards:
        columns["shard"] = [r.shard for r in rows]
        columns["member"] = [r.member for r in rows]
    else:
        columns["path"] = [r.path for r in rows]
    if rows and all(r.stat is not None for r in rows):  # what `index sync` compares to see a file changed
        columns["file_bytes"] = [str(r.stat[0]) for r in rows]  # type: ignore[index]
        columns["file_mtime_ns"] = [str(r.stat[1]) for r in rows]  # type: ignore[index]
    columns["caption"] = captions
    for name in sorted({k for r in rows for k in r.extra}):
        columns[name] = [None if r.extra.get(name) is None else str(r.extra[name]) for r in rows]
    return columns


def _embed_batch(encoder: Encoder, batch: list, listing: Listing, buffer: _PartBuffer) -> int:
    good = [entry for entry in batch if entry[3] is None]
    buffer.skipped.update(entry[3] for entry in batch if entry[3] is not None)
    if not good:
        return len(batch)
    images = encoder.encode_image(torch.stack([entry[1] for entry in good]))  # [b, 3, H, W] -> [b, D]
    buffer.img.append(images)
    if listing.has_text:  # an image without a caption keeps a zero caption vector: caption search skips it
        text = np.zeros_like(images)
        captioned = [i for i, entry in enumerate(good) if entry[2] is not None]
        if captioned:
            text[captioned] = encoder.encode_text([good[i][2] for i in captioned])
        buffer.text.append(text)
    buffer.rows.extend(listing.items[entry[0]] for entry in good)
    buffer.captions.extend(entry[2] for entry in good)
    return len(batch)


def _publish(root: Path, number: int, buffer: _PartBuffer, listing: Listing, dim: int) -> Part:
    img = np.concatenate(buffer.img) if buffer.img else np.zeros((0, dim), np.float32)
    text = (np.concatenate(buffer.text) if buffer.text else np.zeros((0, dim), np.float32)) \
        if listing.has_text else None
    columns = _columns(buffer.rows, buffer.captions, listing.description["kind"] == "shards")
    return write_part(root, number, img, text, columns, dict(buffer.skipped))


def _stream(encoder: Encoder, listing: Listing, batches: list[list[int]], workers: int) -> Iterator[list]:
    dataset = _Images(listing.items, encoder)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=_collate, persistent_workers=False)
    yield from loader


def _run_header(listing: Listing, encoder: Encoder, opts: EmbedOptions) -> dict[str, Any]:
    """What fixes the bytes of every part; a restart into the same folder must present the same header."""
    return {"model": encoder.spec, "backend": encoder.backend, "fingerprint": encoder.fingerprint,
            "dim": int(encoder.fingerprint["dim"]),
            "has_text": listing.has_text, "source": listing.description, "items": len(listing.items),
            "listing_sha256": listing.digest(), "part_size": opts.part_size, "batch_size": opts.batch_size,
            "precision": getattr(encoder, "precision", "fp32"), "device_type": str(getattr(encoder, "device", "cpu")
                                                                                 ).split(":")[0]}


def _claim(root: Path, header: dict[str, Any]) -> None:
    """Write run.json, or check that the folder's run.json is this run (same listing, model, sizes)."""
    path = root / "run.json"
    text = json.dumps(header, indent=1, sort_keys=True)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old != json.loads(text):
            differs = [k for k in header if not isinstance(old, dict) or old.get(k) != header[k]]
            raise SearchError(f"{root} holds another embedding run (differs in: {', '.join(differs) or 'run.json'})"
                              "; use a new --output folder")
        return
    atomic_write_text(path, text)  # every rank writes the same bytes, so concurrent renames are harmless


def _wait_for_parts(root: Path, count: int, timeout_s: float) -> list[Part]:
    """Rank 0: poll until every part has a record whose files match their checksums (other ranks write
    theirs; a stale record of a part being redone fails until its rank has rewritten it)."""
    deadline = time.monotonic() + timeout_s
    parts: dict[int, Part] = {}
    while True:
        for n in range(count):
            if n not in parts and (root / "done" / f"part_{n}.json").is_file():
                part = finished_part(root, n)
                if part is not None:
                    parts[n] = part
        if len(parts) == count:
            return [parts[n] for n in range(count)]
        if time.monotonic() > deadline:
            missing = [n for n in range(count) if n not in parts]
            raise SearchError(f"{root}: parts {missing[:10]} still missing or damaged after {timeout_s:.0f} s; "
                              "run the same command again to finish them")
        time.sleep(1.0)


def run_embedding(root: Path, listing: Listing, encoder: Encoder, opts: EmbedOptions) -> dict[str, Any]:
    """Embed this rank's unfinished parts of `listing` into `root`; rank 0 then writes manifest.json."""
    rank, world, _ = rank_and_world()
    if opts.part_size < 1 or opts.batch_size < 1:
        raise SearchError("--part-size and --batch-size must be positive")
    require("pyarrow")
    root.mkdir(parents=True, exist_ok=True)
    header = _run_header(listing, encoder, opts)
    _claim(root, header)
    count = -(-len(listing.items) // opts.part_size)
    todo = [n for n in range(rank, count, world) if finished_part(root, n) is None]
    remove_temporaries(root, todo)
    for number in todo:  # a damaged part's stale record must not satisfy rank 0 while the part is redone
        (root / "done" / f"part_{number}.json").unlink(missing_ok=True)
    batches = _batches(todo, len(listing.items), opts)
    started, done = time.perf_counter(), 0
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not opts.progress, position=rank,
               desc=f"embed rank {rank}/{world}" if world > 1 else "embed", dynamic_ncols=True)
    buffer, current = _PartBuffer(), todo[0] if todo else -1
    for batch in _stream(encoder, listing, batches, opts.workers):
        number = batch[0][0] // opts.part_size
        if number != current:  # the previous part's last batch has been embedded
            _publish(root, current, buffer, listing, header["dim"])
            buffer, current = _PartBuffer(), number
        done += _embed_batch(encoder, batch, listing, buffer)
        bar.update(len(batch))
    if todo:
        _publish(root, current, buffer, listing, header["dim"])
    bar.close()
    seconds = time.perf_counter() - started
    summary = {"rank": rank, "world_size": world, "parts": count, "embedded_parts": len(todo), "images": done,
               "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 2) if seconds > 0 else None}
    if rank == 0:
        parts = _wait_for_parts(root, count, opts.wait_timeout_s)
        for stale in root.glob(".manifest.json.*.tmp"):  # a run killed while writing the manifest
            stale.unlink(missing_ok=True)
        manifest = write_manifest(root, parts, header)
        summary.update(rows=manifest["rows"], skipped=manifest["skipped"], output=str(root))
    return summary


def embed_collection(source: str, model: str, output: str | Path, opts: EmbedOptions | None = None, *,
                     split: str | None = None, data_root: str | None = None, backend: str = "torch",
                     device: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """List `source`, load the encoder for `model`, and embed into `output` (resuming what is there)."""
    _, _, local_rank = rank_and_world()
    reuse_freed_memory()
    listing = list_source(source, split, data_root)
    encoder = load_encoder(model, backend, device, precision, local_rank)
    return run_embedding(Path(output), listing, encoder, opts or EmbedOptions())
