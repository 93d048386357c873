"""Setting up a training run: where this process sits, what it resumes from, model, optimizer and data.

The order is setup -> step -> loop: this module builds, once, the frozen `RunContext` (config, placement, the
`step.Stepper`, tokenizer, log, data feed) and the small mutable `Progress` record that `loop` advances.
Everything that can be checked is checked before any work (one-line ConfigError naming the key). Under torchrun
(WORLD_SIZE > 1) every rank joins the process group, trains on its rows of each global batch with the exact
distributed loss (`clipforge.dist`), and rank 0 alone writes the log and the checkpoints, which must live on a
file system every rank can read. Evaluation during training (`eval.every`) runs on rank 0 only, on the
unwrapped model, while the other ranks wait at their next collective.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from ..allocator import reuse_freed_memory
from ..checkpoint import (MANIFEST_NAME, atomic_write_text, latest_valid_checkpoint, list_checkpoints,
                          remove_checkpoint, remove_stale_temporaries, save_model, verify_checkpoint_dir)
from ..config import ConfigError, to_dict
from ..data.robust import CONVERTED_KINDS, SKIPPED_KINDS, BadDataTally
from ..factory import create_model
from ..models.clip import CLIP
from ..models.config import ModelConfig
from ..models.lock import set_locked_eval
from ..registry import get_model_config
from ..tokenizer import tokenizer_for
from ..transforms import PreprocessConfig
from .config import RESUME_MODES, TrainConfig
from .data import build_train_dataset
from .distill import Teacher
from .feed import DataFeed, LoaderSpec, build_shard_loader, start_feed
from .finetune import apply_locks
from .guard import NonFiniteGuard
from .optim import match_parameter_layouts
from .queue import build_queue, check_queue
from .rundir import RunLock, check_resume_loses_nothing, check_run_name, lock_run_dir
from .runlog import RunLog, ScalarSinks
from .state import LoadedCheckpoint, code_version, config_differences, load_training_checkpoint, restore_rng_state
from .step import Stepper, build_stepper

# Keys a resumed run may change: they do not alter what is computed (only how fast, how often it is logged or
# saved, and when it gives up). Any other difference from the checkpoint's config is refused.
MAY_CHANGE_ON_RESUME = frozenset({
    "resume", "output_dir", "run_name", "log_every", "save_every", "keep_checkpoints", "threads",
    "max_nonfinite_steps", "debug", "eval", "log", "grad_checkpointing", "data.num_workers", "data.max_bad_fraction",
    "data.bad_min_samples", "data.render_cache", "accum_chunk", "compile", "channels_last", "loss.chunk_size",
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_directory(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{cfg.model}-seed{cfg.seed}"
    return Path(cfg.output_dir) / name


def _init_logits(model: CLIP, cfg: TrainConfig) -> None:
    """The temperature (and SigLIP's bias) as the objective needs them; unread ones frozen (DDP needs a
    gradient for every trainable parameter)."""
    if cfg.loss.uses_logit_bias and model.logit_bias is None:
        # SigLIP's initialisation (Zhai et al. 2023): scale 10 and bias -10, so the B^2 - B negatives start
        # with a small loss. Recorded in the model's config so a saved checkpoint reloads with its bias.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, device=model.logit_scale.device))
        model.config = replace(model.config, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    if cfg.fixed_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.fixed_temperature))
        model.logit_scale.requires_grad_(False)
    elif not cfg.loss.uses_logit_scale:
        model.logit_scale.requires_grad_(False)
    if model.logit_bias is not None and not cfg.loss.uses_logit_bias:
        model.logit_bias.requires_grad_(False)


def prepare_model(cfg: TrainConfig, device: torch.device) -> CLIP:
    """The fp32 model a run starts from: seeded init (or `finetune.init`), locks, logits, memory options."""
    seed_everything(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.finetune.init, device=device)
    # Trained on clipforge's image pipeline: its checkpoints record that, whatever the init file stored.
    model.preprocess_cfg = PreprocessConfig(size=model.image_size)
    apply_locks(model, cfg.finetune)
    _init_logits(model, cfg)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.channels_last and model.config.vision_cfg.is_resnet:
        from ..models.resnet import use_channels_last  # noqa: PLC0415

        use_channels_last(model.visual)
    model.train()  # a loaded checkpoint comes back in eval mode
    set_locked_eval(model)  # locked towers stay in eval mode (BatchNorm statistics frozen)
    return model


@dataclass(frozen=True)
class RunContext:
    """What a run is, fixed at setup: config, placement, directory, the step's pieces, tokenizer, log, data."""

    cfg: TrainConfig
    place: Placement
    run_dir: Path
    stepper: Stepper
    tokenizer: Callable
    log: RunLog
    feed: DataFeed
    version: dict[str, Any] = field(default_factory=dict)
    lock: RunLock | None = None  # rank 0's lock on run_dir, held until close()

    @property
    def core(self) -> CLIP:
        """The fp32 model the optimizer updates, checkpoints save and evaluators read."""
        return self.stepper.core

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (a collective: every rank must call it)."""
        if not self.place.distributed:
            return [obj]
        from ..dist import all_gather_objects  # noqa: PLC0415

        return all_gather_objects(obj)

    def barrier(self) -> None:
        if self.place.distributed:
            from ..dist import barrier  # noqa: PLC0415

            barrier()


@dataclass
class Progress:
    """What changes as the run advances (and a checkpoint restores): counters, times, the last log entry."""

    start_step: int = 0
    clock: float = 0.0  # perf_counter() at the (virtual) start of training, earlier runs included
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(1))
    tally: BadDataTally = field(default_factory=BadDataTally)
    shown: dict[str, int] = field(default_factory=dict)  # bad samples printed, per kind
    last_log: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)  # {evaluator name: metrics} (rank 0)
    # early_stop: the plateau rule's state in the checkpoint resumed (None: fresh, or a checkpoint without it),
    # and the live rule (`early_stop.PlateauStopper`) whose state every checkpoint saves
    plateau_saved: dict[str, Any] | None = None
    plateau: Any = None


def finish(ctx: RunContext, progress: Progress, steps: int, restored_step: int | None = None) -> None:
    """After the last step (`steps`): the final model file, the data summary, and every rank done.
    `restored_step`: the step whose weights the model holds (early_stop.restore_best), recorded in the file."""
    tally = progress.tally
    if ctx.place.is_main:
        restored = {"restored_step": str(restored_step)} if restored_step is not None else {}
        save_model(ctx.core, ctx.run_dir / "model.safetensors", {"step": str(steps), **restored})
    if tally.counts:
        skipped = ", ".join(f"{k}={tally.counts[k]}" for k in SKIPPED_KINDS if k in tally.counts)
        converted = ", ".join(f"{k}={tally.counts[k]}" for k in CONVERTED_KINDS if k in tally.counts)
        ctx.log.notice(f"data: {tally.reads} samples read; skipped: {skipped or 'none'}; converted: "
                       f"{converted or 'none'}", step=steps, event="bad_data_summary",
                       reads=tally.reads, counts=tally.counts)
    ctx.barrier()


def close(ctx: RunContext) -> None:
    ctx.feed.close()
    ctx.log.close()
    if ctx.lock is not None:
        ctx.lock.release()
    # The DDP wrapper goes before the process group it uses (see dist.cleanup).
    ctx.stepper.release()
    if ctx.place.owns_group:
        from ..dist import cleanup  # noqa: PLC0415

        cleanup()


def _broadcast(place: Placement, obj: Any) -> Any:
    if not place.distributed:
        return obj
    from ..dist import broadcast_object  # noqa: PLC0415

    return broadcast_object(obj)


def _restore_progress(ctx: RunContext, loaded: LoadedCheckpoint) -> Progress:
    state = loaded.state
    progress = Progress(start_step=state.step, resumed_from=loaded.path,
                        guard=NonFiniteGuard(ctx.cfg.max_nonfinite_steps))
    progress.tally.load_state_dict(state.counters["bad_data"])
    progress.guard.load_state_dict(state.counters["nonfinite"])
    progress.plateau_saved = loaded.extra.get("plateau")
    if ctx.place.is_main:
        for step, path in list_checkpoints(ctx.ckpt_root):
            if step > state.step:  # from the timeline being abandoned (and possibly the corrupt one)
                remove_checkpoint(path)
    ctx.log.notice(f"resuming from {loaded.path} at step {state.step}", step=state.step, event="resumed",
                   path=str(loaded.path))
    return progress


def _open_feed(cfg: TrainConfig, place: Placement, tokenizer: Callable, image_size: int, dataset: Any,
               start_step: int, saved: dict[str, Any] | None) -> DataFeed:
    shuffle = True
    if dataset is None and cfg.data.source == "shards":
        dataset = build_shard_loader(cfg, place.rank, place.world_size, tokenizer, image_size)
    elif dataset is None:
        dataset, shuffle = build_train_dataset(cfg, image_size)
    spec = LoaderSpec(cfg.batch_size, cfg.steps, cfg.seed, cfg.data.num_workers, start_step, place.rank,
                      place.world_size, shuffle)
    return start_feed(dataset, tokenizer, spec, saved)


def setup_run(cfg: TrainConfig, device: str | None, dataset: Any = None) -> tuple[RunContext, Progress]:
    """Check, place, resume and build everything a run needs, in an order that keeps resumption exact."""
    check_run_name(cfg.run_name)
    reuse_freed_memory()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    place = place_process(device)
    lock = None
    try:
        lock = lock_run_dir(run_directory(cfg)) if place.is_main else None
        return _setup(cfg, place, dataset, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        if place.owns_group:
            from ..dist import cleanup  # noqa: PLC0415

            cleanup()
        raise


def _find_resume(cfg: TrainConfig, place: Placement, run_dir: Path) -> LoadedCheckpoint | None:
    """The checkpoint to continue (rank 0 resolves and verifies it, every rank reads it), or None."""
    resume = None
    if place.is_main:
        say = lambda m: print(f"clipforge: {m}", file=sys.stderr)  # noqa: E731
        remove_stale_temporaries(run_dir / "checkpoints")  # half-written checkpoints of a killed process
        resume = resolve_resume(cfg, run_dir / "checkpoints", say)
        check_resume_loses_nothing(cfg, run_dir, resume)
    resume = _broadcast(place, str(resume) if resume is not None else None)
    loaded = load_training_checkpoint(resume, verify=False) if resume is not None else None
    if loaded is not None:
        check_resumable(cfg, loaded, place.world_size)
    return loaded


def _setup(cfg: TrainConfig, place: Placement, dataset: Any, lock: RunLock | None) -> tuple[RunContext, Progress]:
    model_cfg = check_run(cfg, place.world_size, dataset is None)
    check_queue(cfg.loss, model_cfg, cfg.batch_size, place.world_size, place.device)
    run_dir = run_directory(cfg)
    loaded = _find_resume(cfg, place, run_dir)
    if place.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    core = prepare_model(cfg, place.device)
    if loaded is not None:
        core.load_state_dict(loaded.model_state)
    queue = build_queue(cfg.loss, core, place.device)
    if queue is not None and loaded is not None:
        if "queue" not in loaded.extra:
            raise ConfigError(f"config key 'loss.queue_size': checkpoint {loaded.path} holds no queue state")
        queue.load_state_dict(loaded.extra["queue"])
    teacher = None
    if cfg.loss.distill is not None:
        teacher = Teacher(cfg.loss.distill, place.device, cfg.data.context_length or core.context_length)
    # after the weights: bf16 copies, DDP broadcast
    stepper = build_stepper(cfg, core, place.distributed, queue, teacher)
    if loaded is not None:
        stepper.optimizer.load_state_dict(loaded.optimizer_state)
        match_parameter_layouts(stepper.optimizer)
    tokenizer = tokenizer_for(model_cfg, cfg.data.context_length)
    resume_step = loaded.state.step if loaded else None
    log = RunLog(run_dir / "log.jsonl", place.is_main, resume_step,
                 sinks=lambda: ScalarSinks(cfg.log, run_dir, to_dict(cfg), resume_step))
    saved = loaded.state.data[min(place.rank, len(loaded.state.data) - 1)] if loaded else None
    feed = _open_feed(cfg, place, tokenizer, core.image_size, dataset, resume_step or 0, saved)
    ctx = RunContext(cfg, place, run_dir, stepper, tokenizer, log, feed,
                     version=code_version() if place.is_main else {}, lock=lock)
    if stepper.precision != cfg.precision:
        log.notice(f"precision {cfg.precision}: {place.device} has no fast bf16 (a CPU needs AVX-512 BF16 or AMX); "
                   "training in fp32", event="precision", requested=cfg.precision, used=stepper.precision)
    progress = _restore_progress(ctx, loaded) if loaded else Progress(guard=NonFiniteGuard(cfg.max_nonfinite_steps))
    if loaded is not None:  # last: building the model and the DataLoader iterator draw from the generators
        rng = loaded.state.rng
        restore_rng_state(rng[place.rank] if place.rank < len(rng) else rng[0])
    progress.clock = time.perf_counter() - (loaded.state.counters.get("elapsed_s", 0.0) if loaded else 0.0)
    return ctx, progress
