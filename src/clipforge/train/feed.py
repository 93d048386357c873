"""Feeding a run: each rank's share of each step's batch, and the data position a checkpoint must record.

Map-style data (the synthetic world, file lists): the global batch of step s is a pure function of (seed, s)
(`StepBatchSampler`); rank r of W takes rows [r*B/W, (r+1)*B/W) of it. The data position is the step. Any
randomness inside an item must be a pure function of the item (its index or draw number, as in SyntheticPairs
and data.robust.RobustPairs): the global generators of DataLoader worker processes are not saved, since a
restarted worker cannot replay them.

Streamed data (an IterableDataset such as tar shards) cannot be indexed by step, so it must be able to say
where it is. The contract for such a dataset:
  * `state_dict()` -> plain JSON-able data describing the stream after the last item it yielded, including
    everything that fixes what it yields next (its shard list and offset, even the worker split), and
    `load_state_dict(state)` makes a fresh copy continue exactly from there;
  * it splits its shards between ranks (and DataLoader workers) itself, and is deterministic for a seed.
A loader that keeps its own position (such as a tar-shard loader tracking every worker slot) can be given
instead of a dataset: any object, not a torch Dataset, with `__iter__` yielding TrainBatch (collate with
`BatchCollate`), `state_dict()` giving this rank's position after the last batch it handed out, and
`load_state_dict(state)` continuing from one (`is_stateful_loader`).

For a streamed dataset, the collate function runs in the worker that built the batch and attaches
`(worker id, state_dict())`;
`StreamPosition` keeps the state that came with the last batch consumed from each worker. DataLoader takes
batches from its workers in turn (0, 1, ..., W-1, 0, ...), so on resume new worker j takes the saved state of
the worker that was due (j + batches) % W: the interleaving, and so every batch, continues unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..config import ConfigError
from ..data.robust import TooManyBadSamples
from .config import TrainConfig
from .data import StepBatchSampler


def is_stateful_loader(obj: object) -> bool:
    """A batch source that saves and restores its own position (see the module docstring)."""
    return not isinstance(obj, Dataset) and all(callable(getattr(obj, name, None))
                                                for name in ("__iter__", "state_dict", "load_state_dict"))


class TrainBatch(NamedTuple):
    images: torch.Tensor  # [b, 3, H, W], this rank's rows
    tokens: torch.Tensor  # [b, L]
    problems: list[dict[str, str]]  # bad or converted samples met while building it (data.robust)
    stream: tuple[int, Any] | None  # (worker id, dataset state after this batch) for streamed data


class RankBatchSampler(Sampler):
    """This rank's rows of each step's global batch, for steps start_step .. total_steps - 1.

    With `draw_numbers`, yields (index, draw) pairs, draw being the sample's position in the global stream
    (step * B + row), which datasets use to seed per-sample augmentation (see data.robust.RobustPairs).
    """

    def __init__(self, steps: StepBatchSampler, rank: int, world_size: int, draw_numbers: bool = False) -> None:
        self.steps, self.rank, self.world_size, self.draw_numbers = steps, rank, world_size, draw_numbers
        self.local = steps.batch_size // world_size

    def __iter__(self) -> Iterator[list]:
        first = self.rank * self.local
        for step in range(self.steps.start_step, self.steps.total_steps):
            rows = self.steps.indices_for_step(step)[first : first + self.local]
            if self.draw_numbers:
                base = step * self.steps.batch_size + first
                yield [(index, base + j) for j, index in enumerate(rows)]
            else:
                yield rows

    def __len__(self) -> int:
        return len(self.steps)


class BatchCollate:
    """Items -> TrainBatch: stacks images, tokenises captions, gathers problems, attaches the stream state."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], stream: IterableDataset | None = None) -> None:
        self.tokenizer = tokenizer
        self.stream = stream  # the main-process dataset (used when there are no workers)

    def __call__(self, items: list[tuple]) -> TrainBatch:
        images = torch.stack([item[0] for item in items])  # [b, 3, H, W]
        tokens = self.tokenizer([item[1] for item in items])  # [b, L]
        problems = [p for item in items if len(item) > 2 for p in item[2]]
        state = None
        if self.stream is not None:
            info = get_worker_info()
            dataset = info.dataset if info is not None else self.stream
            state = (info.id if info is not None else 0, dataset.state_dict())
        return TrainBatch(images, tokens, problems, state)


class _WorkerStart:
    """worker_init_fn: one intra-op thread per worker; load the stream state assigned to this worker."""

    def __init__(self, states: dict[int, Any] | None = None) -> None:
        self.states = states or {}

    def __call__(self, worker_id: int) -> None:
        torch.set_num_threads(1)  # decoding is single-threaded; leave the cores to the model
        if worker_id in self.states:
            get_worker_info().dataset.load_state_dict(self.states[worker_id])


class StreamPosition:
    """The state of a streamed dataset after the batches consumed so far, per DataLoader worker."""

    def __init__(self, num_workers: int, initial: dict[int, Any] | None = None) -> None:
        self.num_workers = num_workers
        self.states: dict[int, Any] = dict(initial or {})
        self.batches = 0  # consumed from the current DataLoader (fixes which worker is due next)

    def observe(self, stream: tuple[int, Any] | None) -> None:
        if stream is not None:
            worker, state = stream
            self.states[worker] = state
            self.batches += 1

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"kind": "stream", "step": step, "num_workers": self.num_workers, "batches": self.batches,
                "workers": {str(k): v for k, v in sorted(self.states.items())}}


def stream_resume_plan(saved: dict[str, Any], num_workers: int) -> tuple[dict[int, Any], int]:
    """(state per new worker id, batches to discard) to continue a stream saved by `StreamPosition`.

    If some worker had not delivered a batch yet, its position is unknown: restart the stream and discard the
    `step` batches already consumed (fewer than the number of workers, so cheap).
    """
    if saved.get("kind") != "stream":
        raise ConfigError("config key 'resume': the checkpoint holds a map-style data position, the data is streamed")
    if saved["num_workers"] != num_workers:
        raise ConfigError(
            f"config key 'data.num_workers': {num_workers}, but the checkpoint's stream was read by "
            f"{saved['num_workers']} workers; a streamed run resumes with the same number"
        )
    workers = {int(k): v for k, v in saved["workers"].items()}
    slots = max(1, num_workers)
    if any(w not in workers for w in range(slots)):
        return {}, int(saved["step"])
    return {j: workers[(j + saved["batches"]) % slots] for j in range(slots)}, 0


@dataclass(frozen=True)
class LoaderSpec:
    """How this rank reads a map-style or streamed dataset."""

    batch_size: int  # the global batch; each rank reads batch_size // world_size rows of it
    total_steps: int
    seed: int = 0
    num_workers: int = 0
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True


def build_loader(dataset: Dataset, tokenizer: Callable, spec: LoaderSpec,
                 stream_states: dict[int, Any] | None = None) -> DataLoader:
    """This rank's DataLoader from `spec.start_step`: a step sampler over map-style data, or the stream itself."""
    local = spec.batch_size // spec.world_size
    workers = dict(num_workers=spec.num_workers, prefetch_factor=4 if spec.num_workers > 0 else None,
                   persistent_workers=False)
    if isinstance(dataset, IterableDataset):
        states = stream_states or {}
        if spec.num_workers == 0 and 0 in states:
            dataset.load_state_dict(states[0])
        return DataLoader(dataset, batch_size=local, drop_last=True, collate_fn=BatchCollate(tokenizer, dataset),
                          worker_init_fn=_WorkerStart(states) if spec.num_workers > 0 else None, **workers)
    steps = StepBatchSampler(len(dataset), spec.batch_size, spec.seed, spec.total_steps, spec.start_step,
                             spec.shuffle)
    sampler = RankBatchSampler(steps, spec.rank, spec.world_size, getattr(dataset, "wants_draw_number", False))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=BatchCollate(tokenizer),
                      worker_init_fn=_WorkerStart() if spec.num_workers > 0 else None, **workers)


class DataFeed:
    """This rank's batches and the position a checkpoint records: map-style (the step), a stream (per-worker
    states) or a stateful loader (its own state)."""

    def __init__(self, batches: Iterator[TrainBatch], stream: StreamPosition | None = None,
                 loader: Any = None) -> None:
        self.batches: Iterator[TrainBatch] | None = batches
        self.stream, self.loader = stream, loader
        self.loader_skipped = getattr(loader, "skipped", 0)  # samples the loader itself skipped, counted so far

    def next_batch(self) -> TrainBatch:
        assert self.batches is not None
        try:
            batch = next(self.batches)
        except TooManyBadSamples as exc:
            # From a worker process the message carries the worker's whole traceback: keep its last line.
            last = str(exc).strip().splitlines()[-1]
            prefix = f"{TooManyBadSamples.__module__}.{TooManyBadSamples.__name__}: "
            raise TooManyBadSamples(last.removeprefix(prefix)) from None
        if self.stream is not None:
            self.stream.observe(batch.stream)
        skipped = getattr(self.loader, "skipped", 0)
        if skipped > self.loader_skipped:  # the shard reader names them in its warnings; here they are counted
            problem = {"kind": "unreadable", "path": "a tar-shard sample", "detail": "skipped by the shard reader"}
            batch = batch._replace(problems=batch.problems + [problem] * (skipped - self.loader_skipped))
            self.loader_skipped = skipped
        return batch

    def position(self, step: int) -> dict[str, Any]:
        if self.loader is not None:
            return {"kind": "loader", "step": step, "state": self.loader.state_dict()}
        return self.stream.state_dict(step) if self.stream is not None else {"kind": "map", "step": step}

    def close(self) -> None:
        self.batches = None  # shuts DataLoader workers down now rather than at garbage collection


def start_feed(dataset: Any, tokenizer: Callable, spec: LoaderSpec, saved: dict[str, Any] | None) -> DataFeed:
    """The feed of `dataset` from `spec.start_step`, continuing the checkpoint's data position `saved`."""
    kind = "loader" if is_stateful_loader(dataset) else "stream" if isinstance(dataset, IterableDataset) else "map"
    if saved is not None and saved.get("kind") != kind:
        raise ConfigError(f"config key 'resume': the checkpoint holds a {saved.get('kind')} data position, but the "
                          f"data is now {kind}")
    if kind == "loader":
        if saved is not None:
            dataset.load_state_dict(saved["state"])
        return DataFeed(iter(dataset), loader=dataset)
    states, discard, stream = {}, 0, None
    if isinstance(dataset, IterableDataset):
        if saved is not None:
            states, discard = stream_resume_plan(saved, spec.num_workers)
        stream = StreamPosition(spec.num_workers, states)
    feed = DataFeed(iter(build_loader(dataset, tokenizer, spec, states)), stream)
    for _ in range(discard):
        feed.next_batch()
    return feed


def build_shard_loader(cfg: TrainConfig, rank: int, world_size: int, tokenizer: Callable,
                       image_size: int) -> Any:
    """This rank's loader over the tar shards at `cfg.data.path` (`clipforge.data.shards`), which records
    its own exact position; unreadable samples are skipped (and counted by the trainer)."""
    from ..data.shards import ShardDataset, ShardError, ShardLoader  # noqa: PLC0415
    from ..transforms import TrainTransform  # noqa: PLC0415

    workers = cfg.data.num_workers
    try:
        dataset = ShardDataset(cfg.data.path, TrainTransform(image_size), rank=rank, world_size=world_size,
                               seed=cfg.seed, on_error="skip")
        return ShardLoader(dataset, cfg.batch_size // world_size, workers, collate_fn=BatchCollate(tokenizer),
                           drop_last=True, prefetch_factor=4 if workers > 0 else None, worker_init_fn=_WorkerStart())
    except ShardError as exc:
        raise ConfigError(f"config key 'data.path': {exc}") from None
