"""Streaming image-text pairs from WebDataset tar shards, with seeded shuffling and exact resume.

Layout (what img2dataset writes, and `clipforge.data.writer` too): `00000.tar, 00001.tar, ...`, each holding
samples as consecutive members `KEY.jpg` (or png/webp), `KEY.txt` (captions, one per line) and optionally
`KEY.json`. Shards are read with `tarfile` from local (or mounted) files; no webdataset package is needed.

How the stream is made. Each rank has W "slots" (W = DataLoader workers, or 1 without workers); the
world has G = world_size * W slots, and every slot reads its own shards:
- epoch e, `resample=False`: the shards are permuted by (seed, e) and slot g takes every G-th shard from g,
  so over one epoch every sample is read by exactly one slot;
- `resample=True`: slot g draws n_shards // G shards with replacement from (seed, e, g), webdataset-style.
A slot streams the samples of its epoch's shards through a shuffle buffer seeded by (seed, e, g), drained at
the end of the epoch, then moves to epoch e + 1 (forever, or up to `epochs`). Decoding and the transform run
in the worker. Random augmentations are reseeded per sample (see `_reseed`), so a resumed stream reproduces
them too. Items are `(image, caption, problems)`: problems lists the samples skipped before this one and any
colour-mode conversion, as `data.robust` reports them, so that the trainer counts bad data.

Resume contract (the one `train.feed` states for streamed data). `state_dict()` of the dataset copy in a
worker describes its stream after the last item it yielded: which slot it reads (the worker split), the epoch,
the number of samples its shuffle buffer emitted in that epoch, the samples skipped. `load_state_dict(state)`
makes a fresh copy (in any worker of an identical setup: same shards, seed, ranks and worker count) continue
exactly there. `train.feed.BatchCollate` attaches the state to every batch from the worker that built it,
`StreamPosition` keeps the last state per worker, and `stream_resume_plan` gives each new worker the state of
the worker due next, so after resuming at a step boundary every batch is the one the uninterrupted run would
have seen. A slot restores its shuffle buffer by replaying the epoch's shard headers (no image decoding) up
to its position, and reads the buffered samples by seeking.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .base import DatasetError
from .robust import BadSample, Problem, clean_caption, convert_to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "clipforge.shards/2"
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit


class ShardError(DatasetError):
    """A shard, or a sample in one, that cannot be read; the message names the file and the sample key."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lies: its shard (index into the shard list), key, and members (ext, offset, size)."""

    shard: int
    key: str
    members: tuple[tuple[str, int, int], ...]


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a list, a folder (its *.tar, sorted), a glob, or a brace range 'd/{00000..00009}.tar'."""
    if isinstance(spec, (list, tuple)):
        paths = [str(p) for p in spec]
    else:
        text = str(spec)
        match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
        if os.path.isdir(text):
            paths = sorted(glob.glob(os.path.join(text, "*.tar")))
        elif match:
            lo, hi = match.group(1), match.group(2)
            paths = [text[: match.start()] + str(i).zfill(len(lo)) + text[match.end() :]
                     for i in range(int(lo), int(hi) + 1)]
        elif any(c in text for c in "*?["):
            paths = sorted(glob.glob(text))
        else:
            paths = [text]
    if not paths:
        raise ShardError(f"{spec}: no .tar shards found")
    for path in paths:
        if not os.path.isfile(path):
            raise ShardError(f"{path}: shard not found")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str, shard: int) -> Iterator[SampleRef]:
    """The samples of one tar file from its headers only (data is skipped), in file order.

    A tar whose headers cannot be read raises ShardError naming the file and the last member read.
    """
    size = os.path.getsize(path)
    key, members, last = None, [], "(none)"
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                if not info.isfile():
                    continue
                name_key, ext = _split_name(info.name)
                if name_key != key and members:
                    yield SampleRef(shard, key, tuple(members))  # type: ignore[arg-type]
                    members = []
                key, last = name_key, info.name
                # A member cut short by truncation is kept with its claimed size and fails when read.
                members.append((ext, info.offset_data, info.size if info.offset_data + info.size <= size else -1))
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"{path}: unreadable tar after member '{last}' ({exc})") from exc
    if members:
        yield SampleRef(shard, key, tuple(members))  # type: ignore[arg-type]


def count_samples(shards: str | Path | Sequence[str | Path]) -> int:
    """Number of samples in the shards (headers only)."""
    return sum(1 for i, path in enumerate(expand_shards(shards)) for _ in scan_shard(path, i))


def decode_sample(raw: dict[str, bytes], where: str,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, list[str], str | None]:
    """Member bytes -> (RGB image, captions, colour conversion or None); BadSample naming `where` (shard:key)."""
    if "txt" not in raw:
        raise BadSample("empty_caption", where, "no .txt member")
    captions = [clean_caption(line, where) for line in clean_caption(raw["txt"], where).splitlines() if line.strip()]
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise BadSample("missing", where, f"no image member (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit limit below decides
            with Image.open(io.BytesIO(raw[ext])) as image:
                if image.width * image.height > max_pixels:
                    raise BadSample("decompression_bomb", where, f"{image.width}x{image.height} > {max_pixels}")
                image.load()
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on malformed data; none may end a run
        text = str(exc) or type(exc).__name__
        raise BadSample("truncated" if "truncat" in text.lower() else "unreadable", where, f".{ext}: {text}") from None
    rgb, converted = convert_to_rgb(image)
    return rgb, captions, converted


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _reseed(transform: Any, seed: int) -> None:
    """Random transforms that draw from a `random.Random` named `rng` (TrainTransform) restart per sample."""
    rng = getattr(transform, "rng", None)
    if isinstance(rng, random.Random):
        rng.seed(seed)


class _OpenShards:
    """A few open shard files for reading member data by offset (sequentially while streaming)."""

    def __init__(self, paths: list[str], keep: int = 4) -> None:
        self.paths, self.keep, self.files = paths, keep, {}

    def read(self, ref: SampleRef) -> dict[str, bytes]:
        handle = self.files.pop(ref.shard, None) or open(self.paths[ref.shard], "rb")  # noqa: SIM115
        self.files[ref.shard] = handle  # most recently used last
        while len(self.files) > self.keep:
            self.files.pop(next(iter(self.files))).close()
        raw = {}
        for ext, offset, size in ref.members:
            handle.seek(offset)
            data = handle.read(size) if size >= 0 else b""
            if size < 0 or len(data) != size:
                raise BadSample("truncated", f"{self.paths[ref.shard]}:{ref.key}", f"member .{ext} is cut short")
            raw[ext] = data
        return raw

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


@dataclass
class _SkipLog:
    """Samples skipped since the last item (handed to the next one) and in all since the stream began."""

    pending: list[Problem]
    skipped: int

    def skip(self, problem: Problem) -> None:
        logger.warning("skipping %s: %s (%s)", problem["path"], problem["kind"], problem["detail"])
        self.pending.append(problem)
        self.skipped += 1

    def take(self) -> list[Problem]:
        taken, self.pending = self.pending, []
        return taken


def _worker_slots() -> tuple[int, int]:
    """(slots of this rank = DataLoader workers or 1, this worker's id or 0)."""
    info = get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


class ShardDataset(IterableDataset):
    """(image, caption, problems) samples streamed from tar shards; see the module docstring.

    `transform` maps the decoded RGB PIL image (e.g. `clipforge.transforms.TrainTransform`); `caption` is
    'random' (one of the sample's captions, seeded) or 'first'. `rank` and `world_size` default to those of
    the initialised torch.distributed group, if any. `on_error='skip'` leaves out unusable samples (and the
    rest of a tar whose headers break), logging them and reporting them in the next item's problems;
    'raise' stops with ShardError naming the shard and key.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resample: bool = False,
        epochs: int | None = None,
        caption: str = "random",
        on_error: str = "skip",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = expand_shards(shards)
        if rank is None or world_size is None:
            joined = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if joined else 0
            world_size = torch.distributed.get_world_size() if joined else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"shards: rank {rank} is outside world size {world_size}")
        if caption not in ("random", "first"):
            raise ValueError(f"shards: caption must be 'random' or 'first', got {caption!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"shards: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.transform, self.rank, self.world_size, self.seed = transform, rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards, self.resample = max(1, shuffle_buffer), shuffle_shards, resample
        self.epochs, self.caption, self.on_error = epochs, caption, on_error
        self.max_image_pixels = max_image_pixels
        self.resume: tuple[int, int, int, int] | None = None  # (slot, epoch, index, skipped) to start from
        self.position: tuple[int, int, int, int] | None = None  # the same, after the last item yielded

    def check_slots(self, num_workers: int) -> None:
        """Fail early when an epoch cannot give every slot of the world at least one shard."""
        total = self.world_size * max(1, num_workers)
        if not self.resample and len(self.paths) < total:
            raise ShardError(
                f"{len(self.paths)} shards cannot feed {self.world_size} rank(s) x {max(1, num_workers)} "
                f"worker slot(s) = {total}; write more shards (smaller --per-shard) or use resample=True"
            )

    def epoch_shards(self, epoch: int, slot: int, num_slots: int) -> list[int]:
        """Indices of the shards that `slot` (of `num_slots` in the world) reads in `epoch`, in order."""
        n = len(self.paths)
        if self.resample:
            rng = random.Random(_seed(self.seed, epoch, slot, 1))
            return [rng.randrange(n) for _ in range(max(1, n // num_slots))]
        order = list(range(n))
        if self.shuffle_shards:
            random.Random(_seed(self.seed, epoch, 0)).shuffle(order)
        return order[slot::num_slots]

    def _setup(self) -> dict[str, int]:
        workers, _ = _worker_slots()
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": workers,
                "num_shards": len(self.paths), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """This copy's stream position after the last item it yielded (plain ints, JSON-serialisable)."""
        workers, worker = _worker_slots()
        slot, epoch, index, skipped = self.position or self.resume or (self.rank * workers + worker, 0, 0, 0)
        return {"format": STATE_FORMAT, **self._setup(), "slot": slot, "epoch": epoch, "index": index,
                "skipped": skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make this copy continue from `state` (from `state_dict()` of a worker of an identical setup)."""
        if state.get("format") != STATE_FORMAT:
            raise ShardError(f"shard stream state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, value in self._setup().items():
            if state.get(key) != value:
                raise ShardError(
                    f"shard stream state: '{key}' is {state.get(key)!r} in the checkpoint but {value!r} now; an "
                    "exact resume needs the same shards, seed, ranks and DataLoader workers"
                )
        workers = max(1, state["num_workers"])
        if not self.rank * workers <= state["slot"] < (self.rank + 1) * workers:
            raise ShardError(f"shard stream state: slot {state['slot']} does not belong to rank {self.rank}")
        self.resume = (int(state["slot"]), int(state["epoch"]), int(state["index"]), int(state["skipped"]))
        self.position = None

    def __iter__(self) -> Iterator[tuple[Any, str, list[Problem]]]:
        workers, worker = _worker_slots()
        self.check_slots(workers)
        slot, epoch, index, skipped = self.resume or (self.rank * workers + worker, 0, 0, 0)
        self.position = (slot, epoch, index, skipped)
        log = _SkipLog([], skipped)
        files = _OpenShards(self.paths)
        try:
            while self.epochs is None or epoch < self.epochs:
                for item, emitted in self._epoch_stream(files, slot, workers, epoch, index, log):
                    self.position = (slot, epoch, emitted, log.skipped)
                    yield item
                epoch, index = epoch + 1, 0
        finally:
            files.close()

    def _refs(self, slot: int, num_slots: int, epoch: int, log: _SkipLog, live: list[bool]) -> Iterator[SampleRef]:
        for shard in self.epoch_shards(epoch, slot, num_slots):
            try:
                yield from scan_shard(self.paths[shard], shard)
            except ShardError as exc:
                if self.on_error == "raise":
                    raise
                if live[0]:  # a replay before the resume point met it already, and the state counted it
                    log.skip({"kind": "truncated", "path": self.paths[shard], "detail": str(exc)})

    def _epoch_stream(self, files: _OpenShards, slot: int, workers: int, epoch: int, start: int,
                      log: _SkipLog) -> Iterator[tuple[tuple[Any, str, list[Problem]], int]]:
        """(item, index) of one slot's epoch after position `start` (earlier samples are replayed unread);
        `index` counts the samples the shuffle buffer emitted in the epoch, skipped ones included."""
        rng = random.Random(_seed(self.seed, epoch, slot, 2))
        live = [start == 0]  # False while replaying up to the resume point
        buffer: list[list[Any]] = []  # [ref, raw bytes or None]
        emitted = 0

        def emit(entry: list[Any]) -> Iterator[tuple[tuple[Any, str, list[Problem]], int]]:
            nonlocal emitted
            emitted += 1
            if emitted <= start:
                live[0] = emitted == start
                return
            item = self._load(files, entry[0], entry[1], slot, epoch, emitted, log)
            if item is not None:
                yield item, emitted

        for ref in self._refs(slot, workers * self.world_size, epoch, log, live):
            readable = live[0] and all(size >= 0 for _, _, size in ref.members)
            entry = [ref, files.read(ref) if readable else None]
            if len(buffer) < self.shuffle_buffer:
                buffer.append(entry)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], entry = entry, buffer[j]
            yield from emit(entry)
        rng.shuffle(buffer)
        for entry in buffer:
            yield from emit(entry)

    def _load(self, files: _OpenShards, ref: SampleRef, raw: dict[str, bytes] | None, slot: int, epoch: int,
              index: int, log: _SkipLog) -> tuple[Any, str, list[Problem]] | None:
        """Decode and transform one sample; None (the problem logged) when it is unusable and skipped."""
        where = f"{self.paths[ref.shard]}:{ref.key}"
        try:
            image, captions, converted = decode_sample(raw if raw is not None else files.read(ref), where,
                                                       self.max_image_pixels)
        except BadSample as bad:
            if self.on_error == "raise":
                raise ShardError(str(bad)) from None
            log.skip(bad.record())
            return None
        sample_rng = random.Random(_seed(self.seed, epoch, slot, index, 3))
        caption = captions[sample_rng.randrange(len(captions))] if self.caption == "random" else captions[0]
        if self.transform is not None:
            _reseed(self.transform, sample_rng.getrandbits(63))
            image = self.transform(image)
        problems = log.take()
        if converted is not None:
            problems.append({"kind": converted, "path": where, "detail": "converted"})
        return image, caption, problems
