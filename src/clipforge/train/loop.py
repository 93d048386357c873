"""The training loop: for each step, a batch, `step.train_step` at `lr_at(step)`, the log, the hooks
(evaluation), checkpoints.

Around the arithmetic, the loop keeps the run alive: a complete, verified checkpoint every `save_every` steps
(and when a signal, a fault or a hook stops it), exact resumption from one, skipped and counted bad samples,
skipped non-finite steps, and data-parallel training over the ranks started by torchrun. Setting up a run
(placement, resumption, model, step, data) is `train.setup`; the step's arithmetic is `train.step`.

Hooks run after every step on every rank: `hook(ctx, progress, step) -> None | str`; a string ends the run
there with that reason (a checkpoint and the final model are written), and must be the same on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from ..checkpoint import checkpoint_dir_name, prune_checkpoints, save_model
from ..config import to_dict
from ..data.robust import SKIPPED_KINDS, BadDataTally
from ..models.clip import CLIP
from .config import TrainConfig
from .early_stop import MONITOR_KEYS, PlateauStopper, ValidationWatch, plateau_watch
from .evaluation import eval_hook
from .feed import TrainBatch
from .guard import StepConsensus, StopRequest, TrainingAborted, reach_consensus, step_is_finite
from .schedule import lr_at
from .setup import Progress, RunContext, close, finish, setup_run
from .state import TrainingState, capture_rng_state, save_training_checkpoint
from .step import train_step

SHOWN_PER_KIND = 5  # bad samples printed per kind; all of them go to log.jsonl

Hook = Callable[[RunContext, Progress, int], "str | None"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # steps completed
    train_seconds: float
    last_log: dict[str, Any]
    model: CLIP | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation during training (rank 0)
    interrupted: str | None = None  # the signal that stopped the run early (a checkpoint was saved)
    exit_code: int = 0  # 128 + signal number when interrupted
    checkpoint: Path | None = None  # the last checkpoint written (rank 0)
    resumed_from: Path | None = None
    bad_data: dict[str, int] = field(default_factory=dict)  # samples skipped or converted, by kind
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    is_main: bool = True  # rank 0 (the one that writes), or the only process
    stopped_early: str | None = None  # a hook's reason for ending before cfg.steps
    # With early_stop.patience: best_<signal> (best_val_loss by default), best_step, stopped_step (None: the
    # signal still improved at `steps`), and with restore_best restored_step (the step of the final model)
    early_stop: dict[str, Any] | None = None


def result_of(ctx: RunContext, progress: Progress, steps: int, **extra: Any) -> TrainResult:
    return TrainResult(ctx.run_dir, steps, time.perf_counter() - progress.clock, progress.last_log, ctx.core,
                       metrics=progress.last_eval, checkpoint=progress.last_checkpoint,
                       resumed_from=progress.resumed_from, bad_data=dict(progress.tally.counts),
                       skipped_steps=progress.guard.total, is_main=ctx.place.is_main, **extra)


def guarded_step(ctx: RunContext, batch: TrainBatch, step: int, lr: float,
                 stop_requested: bool) -> tuple[dict, StepConsensus]:
    """`step.train_step`, with its update skipped on every rank when any rank's loss or gradient is not finite;
    the ranks also agree here on stopping and on the data counters (one all-reduce)."""
    images, tokens = batch.images.to(ctx.place.device), batch.tokens.to(ctx.place.device)
    counts = BadDataTally.local_vector(images.shape[0], batch.problems)
    agreed: list[StepConsensus] = []

    def skip(loss: Any, grad_norm: Any) -> bool:
        agreed.append(reach_consensus(not step_is_finite(loss, grad_norm), stop_requested, counts,
                                      ctx.place.distributed))
        return agreed[0].nonfinite

    out = train_step(ctx.stepper, images, tokens, lr, skip, poison=step + 1 in ctx.cfg.debug.nan_steps)
    floats = {k: float(v) for k, v in out.parts.items()}
    floats["grad_norm"] = float(out.grad_norm)
    if out.skipped:
        floats["skipped"] = True
    return floats, agreed[0]


def save_checkpoint(ctx: RunContext, progress: Progress, step: int) -> Path | None:
    """Every rank contributes its RNG and data state; rank 0 writes the checkpoint and prunes old ones."""
    rng = ctx.gather(capture_rng_state())
    data = ctx.gather(ctx.feed.position(step))
    if not ctx.place.is_main:
        return None
    counters = {"bad_data": progress.tally.state_dict(), "nonfinite": progress.guard.state_dict(),
                "elapsed_s": time.perf_counter() - progress.clock}
    state = TrainingState(step=step, rng=rng, data=data, config=to_dict(ctx.cfg), counters=counters,
                          world_size=ctx.place.world_size, version=ctx.version)
    path = save_training_checkpoint(ctx.ckpt_root / checkpoint_dir_name(step), ctx.core, ctx.stepper.optimizer,
                                    state, extra_state(ctx, progress) or None)
    prune_checkpoints(ctx.ckpt_root, ctx.cfg.keep_checkpoints)
    ctx.log.write({"step": step, "event": "checkpoint", "path": str(path)})
    progress.last_checkpoint = path
    return path


def extra_state(ctx: RunContext, progress: Progress) -> dict[str, Any]:
    """The checkpoint's state of other stateful parts: the negative queue, the plateau rule."""
    extra: dict[str, Any] = {}
    if ctx.stepper.queue is not None:
        extra["queue"] = ctx.stepper.queue.state_dict()
    if progress.plateau is not None:
        extra["plateau"] = progress.plateau.state_dict()
    return extra


def report_samples(ctx: RunContext, progress: Progress, batch: TrainBatch, consensus: StepConsensus,
                   step: int) -> None:
    """Add the step's data counters; log every skipped sample (and the first converted one of each kind)."""
    progress.tally.add_vector(consensus.counts)
    if not any(consensus.counts[1:]):
        return
    for problem in (p for problems in ctx.gather(batch.problems) for p in problems):
        kind, skipped = problem["kind"], problem["kind"] in SKIPPED_KINDS
        shown = progress.shown.get(kind, 0)
        progress.shown[kind] = shown + 1
        if skipped or shown == 0:
            ctx.log.write({"step": step, "event": "bad_sample" if skipped else "converted_sample", **problem})
        if shown < SHOWN_PER_KIND:
            what = "skipped unusable" if skipped else "converted"
            more = "; further ones of this kind only in log.jsonl" if shown == SHOWN_PER_KIND - 1 else ""
            ctx.log.notice(f"{what} sample ({kind}): {problem['path']} ({problem['detail']}){more}")


def abort_reason(ctx: RunContext, progress: Progress, consensus: StepConsensus, step: int) -> str | None:
    if progress.guard.record(consensus.nonfinite):
        return (f"stopped at step {step}: {progress.guard.consecutive} non-finite (NaN/inf) steps in a row, each "
                "skipped; lower optim.lr, check the data, or raise max_nonfinite_steps")
    bad = progress.tally.exceeded(ctx.cfg.data.max_bad_fraction, ctx.cfg.data.bad_min_samples)
    if bad:
        return f"stopped at step {step}: {bad}; the bad samples are listed in {ctx.log.path}"
    return None


class Meter:
    """Samples per second over the steps since the last log line."""

    def __init__(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def entry(self, ctx: RunContext, progress: Progress, step: int, parts: dict, lr: float) -> dict:
        now = time.perf_counter()
        entry = {"step": step, **parts, "lr": lr,
                 "temperature": float(1.0 / ctx.core.logit_scale.detach().exp()),
                 "samples_per_s": self.samples / max(now - self.start, 1e-9), "elapsed_s": now - progress.clock}
        self.start, self.samples = now, 0
        return entry


def log_step(ctx: RunContext, progress: Progress, meter: Meter, bar: tqdm, step: int, parts: dict,
             lr: float) -> None:
    if parts.get("skipped"):
        ctx.log.notice(f"step {step}: non-finite loss or gradient (loss {parts['loss']}, grad norm "
                       f"{parts['grad_norm']}); update skipped", step=step, event="nonfinite_skip",
                       loss=parts["loss"], grad_norm=parts["grad_norm"])
    if step % ctx.cfg.log_every == 0 or step == ctx.cfg.steps:
        progress.last_log = entry = meter.entry(ctx, progress, step, parts, lr)
        ctx.log.write(entry)
        ctx.log.scalars({k: v for k, v in entry.items() if k != "step"}, step, prefix="train")
        bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}", T=f"{entry['temperature']:.3f}",
                        sps=f"{entry['samples_per_s']:.0f}")


def saves_at(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.save_every) and (step % cfg.save_every == 0 or step == cfg.steps)


def _checkpoint_and_stop(ctx: RunContext, progress: Progress, consensus: StepConsensus, stop: StopRequest,
                         step: int) -> TrainResult | None:
    """The end-of-step decisions, the same on all ranks (step numbers and the consensus), as the collectives
    inside save_checkpoint require."""
    reason = abort_reason(ctx, progress, consensus, step)
    if reason:
        path = save_checkpoint(ctx, progress, step)
        ctx.barrier()  # every rank leaves together, after the checkpoint exists
        raise TrainingAborted(reason + (f"; checkpoint saved to {path}" if path else ""))
    saved = saves_at(ctx.cfg, step)
    if saved:
        save_checkpoint(ctx, progress, step)
    if consensus.stop:
        path = progress.last_checkpoint if saved else save_checkpoint(ctx, progress, step)
        ctx.barrier()
        ctx.log.notice(f"stopped by {stop.received or 'a signal on another rank'} after step {step}; "
                       f"checkpoint {path}; continue with --resume=latest", step=step, event="stopped")
        return result_of(ctx, progress, step, interrupted=stop.received or "SIGTERM",
                         exit_code=stop.exit_code or 143)
    return None


def run_steps(ctx: RunContext, progress: Progress, stop: StopRequest, bar: tqdm,
              hooks: Sequence[Hook] = ()) -> TrainResult:
    """Steps progress.start_step .. cfg.steps - 1; returns early (after saving) when a signal or a hook asks."""
    cfg, meter = ctx.cfg, Meter()
    for step in range(progress.start_step, cfg.steps):
        batch = ctx.feed.next_batch()
        lr = lr_at(step, cfg.optim.lr, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
                   cfg.optim.schedule)
        parts, consensus = guarded_step(ctx, batch, step, lr, stop.requested)
        done = step + 1
        report_samples(ctx, progress, batch, consensus, done)
        meter.samples += batch.images.shape[0] * ctx.place.world_size
        log_step(ctx, progress, meter, bar, done, parts, lr)
        bar.update(1)
        reasons = [r for r in (hook(ctx, progress, done) for hook in hooks) if r]
        stopped = _checkpoint_and_stop(ctx, progress, consensus, stop, done)
        if stopped is not None:
            return stopped
        if reasons and done < cfg.steps:
            path = progress.last_checkpoint if saves_at(cfg, done) else save_checkpoint(ctx, progress, done)
            ctx.log.notice(f"stopped after step {done}: {reasons[0]}; checkpoint {path}", step=done,
                           event="stopped_early", reason=reasons[0])
            return result_of(ctx, progress, done, stopped_early=reasons[0])
    return result_of(ctx, progress, cfg.steps)


def resume_plateau_watch(ctx: RunContext, progress: Progress) -> ValidationWatch | None:
    """The run's plateau watch, continuing the rule's state from the checkpoint resumed, so a resumed run stops
    where the uninterrupted one would. A checkpoint saved without that state (older code) restarts the rule."""
    if progress.resumed_from is not None and progress.plateau_saved is None and ctx.cfg.early_stop.patience:
        ctx.log.notice(f"checkpoint {progress.resumed_from} holds no plateau-stopping state: the validation "
                       "plateau is judged afresh from here", step=progress.start_step, event="plateau_restarted")
    keep = (lambda step: keep_best(ctx, step)) if ctx.cfg.early_stop.restore_best else None
    watch = plateau_watch(ctx, progress.plateau_saved, keep)
    progress.plateau = watch.stopper if watch is not None else None
    return watch


BEST_MODEL = "best-model.safetensors"  # restore_best: the weights at the best validation check


def keep_best(ctx: RunContext, step: int) -> None:
    """Rank 0 keeps the weights of the check at `step`, the best so far (atomically: a crash leaves the previous
    best)."""
    if ctx.place.is_main:
        save_model(ctx.core, ctx.run_dir / BEST_MODEL, {"step": str(step)})


def restore_best(ctx: RunContext, stopper: PlateauStopper, steps: int) -> int | None:
    """restore_best at the end of the run: rank 0 loads the best check's weights into the model, and under
    torchrun sends them to every rank, so the final model file and every rank's `TrainResult.model` are those
    (a collective: every rank calls it). Returns the step restored, or None (no check yet, the best is the last
    step, or the file kept is not that check's: the final weights stay, and the log says why)."""
    restored = _load_best(ctx, stopper, steps) if ctx.place.is_main else None
    restored = ctx.gather(restored)[0]  # rank 0's outcome, on every rank
    if restored is not None and ctx.place.distributed:
        from ..dist import broadcast_module  # noqa: PLC0415

        broadcast_module(ctx.core)
    return restored


def _load_best(ctx: RunContext, stopper: PlateauStopper, steps: int) -> int | None:
    """Rank 0's half of restore_best: check that the kept file is the best check's, and load it."""
    best = stopper.best_step
    if best is None or best == steps:
        return None
    path = ctx.run_dir / BEST_MODEL
    kept = None
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            kept = (handle.metadata() or {}).get("step")
    if kept != str(best):
        ctx.log.notice(f"early_stop.restore_best: {path} holds step {kept}, not the best check (step {best}); "
                       f"the final model is the last step's", step=steps, event="restore_best_failed")
        return None
    ctx.core.load_state_dict(load_file(str(path), device=str(ctx.place.device)), strict=True)
    ctx.log.write({"step": steps, "event": "restored_best", "restored_step": best})
    return best


class PlateauHook:
    """`early_stop.patience`: end the run once the validation loss stops falling (rank 0 decides for all)."""

    def __init__(self, watch: ValidationWatch) -> None:
        self.watch = watch

    def __call__(self, ctx: RunContext, progress: Progress, step: int) -> str | None:
        def log(entry: dict[str, Any]) -> None:
            ctx.log.write(entry)
            ctx.log.scalars({k: entry[k] for k in MONITOR_KEYS.values()}, step, prefix="val")  # TensorBoard, W&B

        if not self.watch(step, log, lambda decision: ctx.gather(decision)[0]):
            return None
        return self.reason()

    def reason(self) -> str:
        best = self.watch.stopper
        return f"{best.key} plateaued (best {best.best:.4f} at step {best.best_step})"


def train(cfg: TrainConfig, progress: bool = True, device: str | None = None, dataset: Any = None,
          hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train a CLIP as `cfg` says; writes the run directory (config, log.jsonl, tensorboard/, checkpoints/,
    model.safetensors).

    `dataset` replaces the data named by `cfg.data`: a map-style dataset of (image tensor, caption[, problems]),
    a streamed one, or a loader that keeps its own position, following `train.feed`'s contracts. Under torchrun
    (WORLD_SIZE > 1) every rank trains on its share of each global batch. SIGTERM/SIGINT save a checkpoint and
    return early with `interrupted` set. `hooks` run after each step, after the evaluators of `cfg.eval`.
    """
    ctx, state = setup_run(cfg, device, dataset)
    bar = tqdm(total=cfg.steps, initial=state.start_step, disable=not (progress and ctx.place.is_main),
               desc="train", dynamic_ncols=True)
    watch = resume_plateau_watch(ctx, state)
    plateaus = [PlateauHook(watch)] if watch is not None else []
    try:
        with StopRequest() as stop:
            if plateaus and watch.stopper.stopped_step is not None:
                # stopped by a signal right after the plateau rule fired: the uninterrupted run ended there
                result = result_of(ctx, state, state.start_step, stopped_early=plateaus[0].reason())
            else:
                result = run_steps(ctx, state, stop, bar, (*eval_hook(ctx, bar), *plateaus, *hooks))
        result.early_stop = watch.stopper.state() if watch is not None else None
        if result.interrupted is None:  # finished, or stopped early by a hook: the final model is written
            if watch is not None and ctx.cfg.early_stop.restore_best:
                assert result.early_stop is not None
                restored = restore_best(ctx, watch.stopper, result.steps)
                result.early_stop["restored_step"] = restored if restored is not None else result.steps
            finish(ctx, state, result.steps, restored_step=(result.early_stop or {}).get("restored_step"))
        return result
    finally:
        bar.close()
        close(ctx)
