"""Streaming image-text pairs from WebDataset tar shards, with seeded shuffling and exact resume.

Layout (what img2dataset writes, and `clipforge.data.writer` too): `00000.tar, 00001.tar, ...`, each holding
samples as consecutive members `KEY.jpg` (or png/webp), `KEY.txt` (captions, one per line) and optionally
`KEY.json`; next to each tar, `00000_stats.json` gives its sample count (`successes`), which tells how many
samples a truncated copy lost. Shards are read with `tarfile` from local (or mounted) files; no webdataset package is needed.

How the stream is made. Each rank has W "slots" (W = DataLoader workers, or 1 without workers); the
world has G = world_size * W slots, and every slot reads its own shards:
- epoch e, `resample=False`: the shards are permuted by (seed, e) and slot g takes every G-th shard from g,
  so over one epoch every sample is read by exactly one slot;
- `resample=True`: slot g draws n_shards // G shards with replacement from (seed, e, g), webdataset-style.
A slot streams the samples of its epoch's shards through a shuffle buffer seeded by (seed, e, g), drained at
the end of the epoch, then moves to epoch e + 1 (forever, or up to `epochs`). Decoding, the transform and the
collate (e.g. tokenising) run in the worker. Random augmentations are reseeded per sample (see `_reseed`),
so a resumed stream reproduces them too.

Resume contract. Use `ShardLoader` (a DataLoader wrapper). Every batch comes from one slot, and the loader
records, for the batches *handed to the caller* (not the ones prefetched by workers), each slot's position
(epoch, samples emitted in that epoch, samples skipped) and which slot delivers next. After the training step
that consumed batch s, `loader.state_dict()` is the exact position after batch s, on this rank. Save the
states of all ranks with the checkpoint; on resume build the same dataset (same shards, seed, ranks, worker
count, batch size), call `loader.load_state_dict(state_of_this_rank)` and iterate: the first batch is the one
the uninterrupted run would have used for step s + 1. A slot restores its shuffle buffer by replaying the
epoch's shard headers (no image decoding) up to its position, and reads the buffered samples by seeking.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..transforms import upright

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "clipforge.shards/1"


class ShardError(ValueError):
    """A shard, or a sample in one, that cannot be read; the message names the file and the sample key."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lies: its shard (index into the shard list), key, and members (ext, offset, size)."""

    shard: int
    key: str
    members: tuple[tuple[str, int, int], ...]


class SamplePosition(NamedTuple):
    """Stream position after a sample: its slot, epoch, samples emitted in the epoch, skipped so far, key."""

    slot: int
    epoch: int
    index: int
    skipped: int
    key: str


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


def stats_path(shard: str | Path) -> Path:
    """img2dataset's per-shard statistics file: `00000_stats.json` next to `00000.tar`."""
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}_stats.json")


def expected_samples(shard: str | Path) -> int | None:
    """How many samples the shard was written with (its stats file's `successes`), or None when unknown."""
    try:
        count = json.loads(stats_path(shard).read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def count_samples(shards: str | Path | Sequence[str | Path]) -> int:
    """Number of samples in the shards (headers only)."""
    return sum(1 for i, path in enumerate(expand_shards(shards)) for _ in scan_shard(path, i))


def decode_sample(raw: dict[str, bytes], where: str) -> tuple[Image.Image, list[str]]:
    """Member bytes -> (decoded PIL image, captions). `where` names the shard and key in errors."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise ShardError(f"{where}: no image member (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if "txt" not in raw:
        raise ShardError(f"{where}: no .txt caption member")
    try:
        captions = [line.strip() for line in raw["txt"].decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ShardError(f"{where}: caption is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not captions:
        raise ShardError(f"{where}: empty caption")
    try:
        with Image.open(io.BytesIO(raw[ext])) as image:
            image.load()
            return upright(image), captions
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ShardError(f"{where}: cannot decode .{ext} image ({exc})") from None


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
                raise ShardError(f"{self.paths[ref.shard]}: sample '{ref.key}': member .{ext} is truncated")
            raw[ext] = data
        return raw

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


class ShardDataset(IterableDataset):
    """(image, caption, SamplePosition) samples streamed from tar shards; see the module docstring.

    `transform` maps the decoded PIL image (e.g. `clipforge.transforms.TrainTransform`); `caption` is 'random'
    (one of the sample's captions, seeded) or 'first'; `on_error` is 'raise' or 'skip' (the sample, or the
    rest of an unreadable tar, is left out, logged, and counted in `SamplePosition.skipped`).
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resample: bool = False,
        epochs: int | None = None,
        caption: str = "random",
        on_error: str = "raise",
    ) -> None:
        self.paths = expand_shards(shards)
        if not 0 <= rank < world_size:
            raise ValueError(f"shards: rank {rank} is outside world size {world_size}")
        if caption not in ("random", "first"):
            raise ValueError(f"shards: caption must be 'random' or 'first', got {caption!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"shards: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.transform, self.rank, self.world_size, self.seed = transform, rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards, self.resample = max(1, shuffle_buffer), shuffle_shards, resample
        self.epochs, self.caption, self.on_error = epochs, caption, on_error
        self.resume: dict[int, tuple[int, int, int]] = {}  # local slot -> (epoch, index, skipped)
        self.rotation = 0  # worker w serves local slot (w + rotation) % W

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

    def __iter__(self) -> Iterator[tuple[Any, str, SamplePosition]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        self.check_slots(workers)
        local = (worker + self.rotation) % workers
        slot = self.rank * workers + local
        epoch, index, skipped = self.resume.get(local, (0, 0, 0))
        counter = [skipped]  # samples (or shard tails) skipped by this slot since the stream began
        files = _OpenShards(self.paths)
        try:
            while self.epochs is None or epoch < self.epochs:
                yield from self._epoch_stream(files, slot, workers * self.world_size, epoch, index, counter)
                epoch, index = epoch + 1, 0
        finally:
            files.close()

    def _refs(self, slot: int, num_slots: int, epoch: int, counter: list[int], live: list[bool]) -> Iterator[SampleRef]:
        for shard in self.epoch_shards(epoch, slot, num_slots):
            found, error = 0, None
            try:
                for ref in scan_shard(self.paths[shard], shard):
                    found += 1
                    yield ref
            except ShardError as exc:
                if self.on_error == "raise":
                    raise
                error = exc
            lost = self._lost(shard, found, error)
            if lost and live[0]:  # counted once: a replay before the resume point already had it in the state
                counter[0] += lost
                logger.warning("%d samples lost from a shard: %s", lost,
                               error or f"{self.paths[shard]}: ends after {found} samples")

    def _lost(self, shard: int, found: int, error: ShardError | None) -> int:
        """Samples of a shard never reached: from its stats file when there is one (a truncated tar loses its
        whole tail), else 1 for an unreadable tail of unknown length."""
        expected = expected_samples(self.paths[shard])
        if expected is not None:
            if found > expected and error is None:
                return 0
            if found > expected and self.on_error == "raise":
                raise ShardError(f"{self.paths[shard]}: holds more samples than its stats file's {expected}")
            return max(expected - found, 1 if error is not None else 0)
        return 1 if error is not None else 0

    def _epoch_stream(self, files: _OpenShards, slot: int, num_slots: int, epoch: int, start: int,
                      counter: list[int]) -> Iterator[tuple[Any, str, SamplePosition]]:
        """One epoch of one slot: buffer-shuffled samples after position `start` (earlier ones replayed unread)."""
        rng = random.Random(_seed(self.seed, epoch, slot, 2))
        live = [start == 0]  # False while replaying up to the resume point
        buffer: list[list[Any]] = []  # [ref, raw bytes or None]
        emitted = 0

        def emit(entry: list[Any]) -> Iterator[tuple[Any, str, SamplePosition]]:
            nonlocal emitted
            emitted += 1
            if emitted <= start:
                live[0] = emitted == start
                return
            ref, raw = entry
            sample = self._load(files, ref, raw, slot, epoch, emitted, counter)
            if sample is not None:
                yield sample

        for ref in self._refs(slot, num_slots, epoch, counter, live):
            entry = [ref, files.read(ref) if live[0] and self._readable(ref) else None]
            if len(buffer) < self.shuffle_buffer:
                buffer.append(entry)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], entry = entry, buffer[j]
            yield from emit(entry)
        rng.shuffle(buffer)
        for entry in buffer:
            yield from emit(entry)

    @staticmethod
    def _readable(ref: SampleRef) -> bool:
        return all(size >= 0 for _, _, size in ref.members)

    def _load(self, files: _OpenShards, ref: SampleRef, raw: dict[str, bytes] | None, slot: int, epoch: int,
              index: int, counter: list[int]) -> tuple[Any, str, SamplePosition] | None:
        """Decode and transform one sample; None when it is corrupt and errors are skipped."""
        where = f"{self.paths[ref.shard]}: sample '{ref.key}'"
        try:
            image, captions = decode_sample(raw if raw is not None else files.read(ref), where)
        except ShardError as exc:
            if self.on_error == "raise":
                raise
            counter[0] += 1
            logger.warning("skipping a sample: %s", exc)
            return None
        sample_rng = random.Random(_seed(self.seed, epoch, slot, index, 3))
        caption = captions[sample_rng.randrange(len(captions))] if self.caption == "random" else captions[0]
        if self.transform is not None:
            _reseed(self.transform, sample_rng.getrandbits(63))
            image = self.transform(image)
        return image, caption, SamplePosition(slot, epoch, index, counter[0], ref.key)


class _PositionCollate:
    """Collates (image, caption) with the inner collate and keeps the position of the batch's last sample."""

    def __init__(self, inner: Callable[[list[tuple[Any, str]]], Any] | None) -> None:
        self.inner = inner if inner is not None else torch.utils.data.default_collate

    def __call__(self, items: list[tuple[Any, str, SamplePosition]]) -> tuple[Any, SamplePosition]:
        return self.inner([(image, caption) for image, caption, _ in items]), items[-1][2]


class ShardLoader:
    """A DataLoader over a ShardDataset that knows the exact stream position of the batches it handed out.

    Iterating again continues the stream where the last batch left it. `state_dict()` / `load_state_dict()`
    follow the resume contract in the module docstring; `skipped` counts corrupt samples skipped so far.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        num_workers: int = 0,
        collate_fn: Callable[[list[tuple[Any, str]]], Any] | None = None,
        drop_last: bool = False,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        persistent_workers: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"shards: batch_size must be positive, got {batch_size}")
        dataset.check_slots(num_workers)
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.loader_args = dict(collate_fn=_PositionCollate(collate_fn), drop_last=drop_last,
                                worker_init_fn=worker_init_fn if num_workers > 0 else None,
                                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                                persistent_workers=persistent_workers and num_workers > 0)
        self.slots = max(1, num_workers)
        self.positions: dict[int, tuple[int, int, int]] = {}  # local slot -> (epoch, index, skipped)
        self.next_slot = 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.resume = dict(self.positions)
        self.dataset.rotation = self.next_slot
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            **self.loader_args)
        first_slot = self.dataset.rank * self.slots
        for batch, pos in loader:
            local = pos.slot - first_slot
            self.positions[local] = (pos.epoch, pos.index, pos.skipped)
            self.next_slot = (local + 1) % self.slots
            yield batch

    @property
    def skipped(self) -> int:
        return sum(skipped for _, _, skipped in self.positions.values())

    def state_dict(self) -> dict[str, Any]:
        """This rank's stream position after the last batch handed out (plain ints, JSON-serialisable)."""
        ds = self.dataset
        return {
            "format": STATE_FORMAT, "rank": ds.rank, "world_size": ds.world_size, "num_workers": self.num_workers,
            "num_shards": len(ds.paths), "seed": ds.seed, "batch_size": self.batch_size,
            "next_slot": self.next_slot,
            "slots": {str(k): list(v) for k, v in sorted(self.positions.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (made by `state_dict()` on this rank of an identical setup)."""
        if state.get("format") != STATE_FORMAT:
            raise ShardError(f"shard loader state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        ds = self.dataset
        expected = {"rank": ds.rank, "world_size": ds.world_size, "num_workers": self.num_workers,
                    "num_shards": len(ds.paths), "seed": ds.seed, "batch_size": self.batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ShardError(
                    f"shard loader state: '{key}' is {state.get(key)!r} in the checkpoint but {value!r} now; "
                    "an exact resume needs the same shards, seed, ranks, workers and batch size"
                )
        slots = {int(k): tuple(int(x) for x in v) for k, v in state["slots"].items()}
        if any(not 0 <= k < self.slots or len(v) != 3 for k, v in slots.items()):
            raise ShardError(f"shard loader state: 'slots' must map 0..{self.slots - 1} to [epoch, index, skipped]")
        self.positions = slots  # type: ignore[assignment]
        self.next_slot = int(state["next_slot"]) % self.slots
