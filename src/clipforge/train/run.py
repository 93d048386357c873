"""Setting up a training run: where this process sits, what it resumes from, model, optimizer and data.

Everything that can be checked is checked before any work (one-line ConfigError naming the key). Under torchrun
(WORLD_SIZE > 1) every rank joins the process group, trains on its rows of each global batch with the exact
distributed loss (`clipforge.dist`), and rank 0 alone writes the log and the checkpoints, which must live on a
file system every rank can read. Evaluation during training (`eval.every`) runs on rank 0 only, on the
unwrapped model, while the other ranks wait at their next collective.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch.utils.data import IterableDataset

from ..checkpoint import (MANIFEST_NAME, atomic_write_text, latest_valid_checkpoint, list_checkpoints,
                          remove_checkpoint, remove_stale_temporaries, save_model, verify_checkpoint_dir)
from ..config import ConfigError, to_dict
from ..data.robust import CONVERTED_KINDS, SKIPPED_KINDS, BadDataTally, TooManyBadSamples
from ..losses import compute_loss
from ..models.clip import CLIP
from ..models.config import ModelConfig
from ..registry import get_model_config
from .distill import Teacher
from ..tokenizer import BPETokenizer, get_tokenizer
from .config import RESUME_MODES, TrainConfig
from .data import build_train_dataset
from .feed import (StreamPosition, TrainBatch, build_loader, build_shard_loader, is_stateful_loader,
                   stream_resume_plan)
from .guard import NonFiniteGuard
from .loop import TrainResult, prepare_model, run_directory
from .optim import build_optimizer, match_parameter_layouts
from .queue import NegativeQueue, build_queue, check_queue
from .rundir import RunLock, check_resume_loses_nothing, check_run_name, lock_run_dir
from .runlog import RunLog
from .state import LoadedCheckpoint, code_version, config_differences, load_training_checkpoint, restore_rng_state

# Keys a resumed run may change: they do not alter what is computed (only how fast, how often it is logged or
# saved, and when it gives up). Any other difference from the checkpoint's config is refused.
MAY_CHANGE_ON_RESUME = frozenset({
    "resume", "output_dir", "run_name", "log_every", "save_every", "keep_checkpoints", "threads",
    "max_nonfinite_steps", "debug", "eval", "grad_checkpointing", "data.num_workers", "data.max_bad_fraction",
    "data.bad_min_samples",
})


@dataclass(frozen=True)
class Placement:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run initialised the process group (and so tears it down)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def place_process(device: str | None) -> Placement:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as tdist  # noqa: PLC0415

        from ..dist import init_distributed  # noqa: PLC0415

        owns = not tdist.is_initialized()
        info = init_distributed(device=device)
        return Placement(info.rank, info.world_size, info.device, owns)
    return Placement(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def check_run(cfg: TrainConfig, world_size: int, own_data: bool) -> ModelConfig:
    """What the config alone cannot know: the model exists, the global batch splits over the ranks, the data
    and the context length fit the model."""
    model_cfg = get_model_config(cfg.model)
    if cfg.batch_size % world_size:
        raise ConfigError(f"config key 'batch_size': the global batch {cfg.batch_size} is not divisible by the "
                          f"world size {world_size}")
    size = model_cfg.vision_cfg.image_size
    if own_data and cfg.data.source == "synthetic" and cfg.data.synthetic.image_size != size:
        raise ConfigError(f"config key 'data.synthetic.image_size': {cfg.data.synthetic.image_size} differs from "
                          f"model '{cfg.model}' input size {size}")
    limit = model_cfg.text_cfg.context_length
    if cfg.data.context_length is not None and cfg.data.context_length > limit:
        raise ConfigError(f"config key 'data.context_length': {cfg.data.context_length} is above model "
                          f"'{cfg.model}' context length {limit}")
    return model_cfg


def resolve_resume(cfg: TrainConfig, ckpt_root: Path, say: Callable[[str], None]) -> Path | None:
    """The checkpoint directory to resume from, as `cfg.resume` asks (verified), or None for a fresh start."""
    if cfg.resume is None:
        existing = list_checkpoints(ckpt_root)
        if existing:
            raise ConfigError(f"config key 'resume': {ckpt_root} already holds checkpoints (up to step "
                              f"{existing[-1][0]}): pass --resume=latest to continue that run, or choose another "
                              "run_name or output_dir")
        return None
    if cfg.resume in RESUME_MODES:
        found = latest_valid_checkpoint(ckpt_root, say)
        if found is None and cfg.resume == "latest":
            raise ConfigError(f"config key 'resume': no usable checkpoint in {ckpt_root}")
        return found
    path = Path(cfg.resume)
    if (path / MANIFEST_NAME).is_file():
        verify_checkpoint_dir(path)
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = latest_valid_checkpoint(root, say)
            if found is None:
                raise ConfigError(f"config key 'resume': no usable checkpoint in {root}")
            return found
    raise ConfigError(f"config key 'resume': {path} is neither a checkpoint nor a run directory with checkpoints "
                      f"(or use one of {list(RESUME_MODES)})")


def check_resumable(cfg: TrainConfig, loaded: LoadedCheckpoint, world_size: int) -> None:
    changed = config_differences(loaded.state.config, to_dict(cfg), set(MAY_CHANGE_ON_RESUME))
    if changed:
        key = changed[0]
        from .state import flatten_config  # noqa: PLC0415

        was, now = flatten_config(loaded.state.config).get(key), flatten_config(to_dict(cfg)).get(key)
        raise ConfigError(f"config key '{key}': {now!r} differs from {was!r} in checkpoint {loaded.path}; a resumed "
                          "run keeps its config")
    if loaded.state.world_size != world_size and loaded.state.data[0].get("kind") in ("stream", "loader"):
        raise ConfigError(f"streamed data was read by {loaded.state.world_size} ranks in checkpoint "
                          f"{loaded.path}; resume it with the same number of ranks, not {world_size}")


@dataclass
class Run:
    """One process's view of a run in progress (see `train.loop.run_steps`)."""

    cfg: TrainConfig
    place: Placement
    run_dir: Path
    core: CLIP
    model: torch.nn.Module  # `core`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    tokenizer: Callable
    loss_fn: Callable
    log: RunLog
    batches: Iterator[TrainBatch] | None = None
    stream: StreamPosition | None = None
    loader: Any = None  # a stateful loader given instead of a dataset (feed.is_stateful_loader)
    loader_skipped: int = 0  # samples the loader itself skipped (a shard loader's `skipped`), counted so far
    start_step: int = 0
    clock: float = 0.0  # perf_counter() at the (virtual) start of training, earlier runs included
    version: dict[str, Any] = field(default_factory=dict)
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(1))
    tally: BadDataTally = field(default_factory=BadDataTally)
    shown: dict[str, int] = field(default_factory=dict)
    teacher: Teacher | None = None  # loss.distill's teacher model
    lock: RunLock | None = None  # rank 0's lock on run_dir, held until close()
    queue: NegativeQueue | None = None  # loss.queue_size > 0: the negatives queue (its `loss` is loss_fn)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

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

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (a collective: every rank must call it)."""
        if not self.place.distributed:
            return [obj]
        from ..dist import all_gather_objects  # noqa: PLC0415

        return all_gather_objects(obj)

    def data_position(self, step: int) -> dict[str, Any]:
        if self.loader is not None:
            return {"kind": "loader", "step": step, "state": self.loader.state_dict()}
        return self.stream.state_dict(step) if self.stream is not None else {"kind": "map", "step": step}

    def result(self, steps: int, last: dict, interrupted: str | None = None, exit_code: int = 0) -> TrainResult:
        return TrainResult(self.run_dir, steps, time.perf_counter() - self.clock, last, self.core,
                           interrupted=interrupted, exit_code=exit_code, checkpoint=self.last_checkpoint,
                           resumed_from=self.resumed_from, bad_data=dict(self.tally.counts),
                           skipped_steps=self.guard.total, is_main=self.place.is_main)

    def finish(self) -> None:
        """After the last step: the final model file, the data summary, and every rank done."""
        if self.place.is_main:
            save_model(self.core, self.run_dir / "model.safetensors", {"step": str(self.cfg.steps)})
        if self.tally.counts:
            skipped = ", ".join(f"{k}={self.tally.counts[k]}" for k in SKIPPED_KINDS if k in self.tally.counts)
            converted = ", ".join(f"{k}={self.tally.counts[k]}" for k in CONVERTED_KINDS if k in self.tally.counts)
            self.log.notice(f"data: {self.tally.reads} samples read; skipped: {skipped or 'none'}; converted: "
                            f"{converted or 'none'}", step=self.cfg.steps, event="bad_data_summary",
                            reads=self.tally.reads, counts=self.tally.counts)
        self.barrier()

    def barrier(self) -> None:
        if self.place.distributed:
            from ..dist import barrier  # noqa: PLC0415

            barrier()

    def close(self) -> None:
        self.batches = None  # shuts DataLoader workers down now rather than at garbage collection
        self.log.close()
        if self.lock is not None:
            self.lock.release()
        # The DDP wrapper goes before the process group it uses: its reducer torn down after the group (at
        # garbage collection, once a peer has exited) can deadlock.
        self.model = self.core
        if self.place.owns_group:
            from ..dist import cleanup  # noqa: PLC0415

            cleanup()


def _broadcast(place: Placement, obj: Any) -> Any:
    if not place.distributed:
        return obj
    from ..dist import broadcast_object  # noqa: PLC0415

    return broadcast_object(obj)


def _tokenizer(cfg: TrainConfig) -> Callable:
    if cfg.data.context_length is None:
        return get_tokenizer(cfg.model)
    return BPETokenizer(context_length=cfg.data.context_length)


def _wrap(cfg: TrainConfig, core: CLIP, place: Placement) -> tuple[torch.nn.Module, Callable]:
    """(model to call, loss function): DDP and the exact distributed loss on several ranks."""
    if not place.distributed:
        return core, compute_loss
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    from ..dist import distributed_compute_loss  # noqa: PLC0415

    # DDP waits for a gradient of every trainable parameter: freeze the ones the objective does not read.
    for name in ("logit_scale", "logit_bias"):
        param = getattr(core, name, None)
        if param is not None and not getattr(cfg.loss, f"uses_{name}", True):
            param.requires_grad_(False)
    device_ids = [place.device.index] if place.device.type == "cuda" else None
    return DistributedDataParallel(core, device_ids=device_ids), distributed_compute_loss


def _restore(run: Run, loaded: LoadedCheckpoint) -> None:
    state = loaded.state
    run.core.load_state_dict(loaded.model_state)
    run.optimizer.load_state_dict(loaded.optimizer_state)
    match_parameter_layouts(run.optimizer)
    run.tally.load_state_dict(state.counters["bad_data"])
    run.guard.load_state_dict(state.counters["nonfinite"])
    run.start_step, run.resumed_from = state.step, loaded.path
    if run.queue is not None:
        if "queue" not in loaded.extra:
            raise ConfigError(f"config key 'loss.queue_size': checkpoint {loaded.path} holds no queue state")
        run.queue.load_state_dict(loaded.extra["queue"])
    if run.place.is_main:
        for step, path in list_checkpoints(run.ckpt_root):
            if step > state.step:  # from the timeline being abandoned (and possibly the corrupt one)
                remove_checkpoint(path)


def _start_data(run: Run, dataset: Any, shuffle: bool, saved: dict[str, Any] | None) -> None:
    cfg, place = run.cfg, run.place
    kind = "loader" if is_stateful_loader(dataset) else "stream" if isinstance(dataset, IterableDataset) else "map"
    if saved is not None and saved.get("kind") != kind:
        raise ConfigError(f"config key 'resume': the checkpoint holds a {saved.get('kind')} data position, but the "
                          f"data is now {kind}")
    if kind == "loader":
        if saved is not None:
            dataset.load_state_dict(saved["state"])
        run.loader, run.batches = dataset, iter(dataset)
        run.loader_skipped = getattr(dataset, "skipped", 0)
        return
    states, discard = {}, 0
    if isinstance(dataset, IterableDataset):
        if saved is not None:
            states, discard = stream_resume_plan(saved, cfg.data.num_workers)
        run.stream = StreamPosition(cfg.data.num_workers, states)
    loader = build_loader(dataset, cfg.batch_size, run.tokenizer, cfg.data.num_workers, cfg.seed, cfg.steps,
                          run.start_step, place.rank, place.world_size, shuffle, states)
    run.batches = iter(loader)
    for _ in range(discard):
        run.next_batch()


def setup_run(cfg: TrainConfig, device: str | None, dataset: Any = None) -> Run:
    """Check, place, resume and build everything a run needs, in an order that keeps resumption exact."""
    check_run_name(cfg.run_name)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    place = place_process(device)
    lock = None
    try:
        lock = lock_run_dir(run_directory(cfg)) if place.is_main else None
        run = _setup(cfg, place, dataset)
        run.lock = lock
        return run
    except BaseException:
        if lock is not None:
            lock.release()
        if place.owns_group:
            from ..dist import cleanup  # noqa: PLC0415

            cleanup()
        raise


def _setup(cfg: TrainConfig, place: Placement, dataset: Any) -> Run:
    model_cfg = check_run(cfg, place.world_size, dataset is None)
    check_queue(cfg.loss, model_cfg, cfg.batch_size, place.world_size, place.device)
    run_dir = run_directory(cfg)
    say = (lambda m: print(f"clipforge: {m}", file=sys.stderr)) if place.is_main else (lambda m: None)
    resume = None
    if place.is_main:
        remove_stale_temporaries(run_dir / "checkpoints")  # half-written checkpoints of a killed process
        resume = resolve_resume(cfg, run_dir / "checkpoints", say)
        check_resume_loses_nothing(cfg, run_dir, resume)
    resume = _broadcast(place, str(resume) if resume is not None else None)
    loaded = load_training_checkpoint(resume, verify=False) if resume is not None else None  # rank 0 verified it
    if loaded is not None:
        check_resumable(cfg, loaded, place.world_size)
    if place.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    core = prepare_model(cfg, place.device)
    optimizer = build_optimizer(core, cfg.optim)
    run = Run(cfg, place, run_dir, core, core, optimizer, _tokenizer(cfg), compute_loss,
              RunLog(run_dir / "log.jsonl", place.is_main, loaded.state.step if loaded else None),
              version=code_version() if place.is_main else {}, guard=NonFiniteGuard(cfg.max_nonfinite_steps))
    run.queue = build_queue(cfg.loss, core, place.device)
    if loaded is not None:
        _restore(run, loaded)
        run.log.notice(f"resuming from {loaded.path} at step {run.start_step}", step=run.start_step,
                       event="resumed", path=str(loaded.path))
    run.model, run.loss_fn = _wrap(cfg, core, place)
    if cfg.loss.distill is not None:
        run.teacher = Teacher(cfg.loss.distill, place.device, cfg.data.context_length or core.context_length)
    if run.queue is not None:
        run.loss_fn = run.queue.loss  # the gathered loss with the queue's negatives, under DDP too
    shuffle = True
    if dataset is None and cfg.data.source == "shards":
        dataset = build_shard_loader(cfg, place.rank, place.world_size, run.tokenizer, core.image_size)
    elif dataset is None:
        dataset, shuffle = build_train_dataset(cfg, core.image_size)
    saved = loaded.state.data[min(place.rank, len(loaded.state.data) - 1)] if loaded else None
    _start_data(run, dataset, shuffle, saved)
    if loaded is not None:  # last: building the model and the DataLoader iterator draw from the generators
        rng = loaded.state.rng
        restore_rng_state(rng[place.rank] if place.rank < len(rng) else rng[0])
    run.clock = time.perf_counter() - (loaded.state.counters.get("elapsed_s", 0.0) if loaded else 0.0)
    return run
