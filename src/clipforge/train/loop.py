"""The training loop: batches -> features -> loss -> backward -> clip -> AdamW -> lr_at(step) -> clamp.

Around the arithmetic, the loop keeps the run alive: a complete, verified checkpoint every `save_every` steps
(and when a signal or a fault stops it), exact resumption from one, skipped and counted bad samples, skipped
non-finite steps, and data-parallel training over the ranks started by torchrun. Setting up a run (placement,
resumption, data) lives in `train.run`; this module is the per-step work.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import checkpoint_dir_name, prune_checkpoints
from ..config import to_dict
from ..data.robust import SKIPPED_KINDS, BadDataTally
from ..factory import create_model
from ..transforms import PreprocessConfig
from ..losses import compute_loss
from ..models.clip import CLIP
from ..models.lock import set_locked_eval
from .config import TrainConfig
from .distill import Teacher
from .early_stop import plateau_watch
from .finetune import apply_locks
from .guard import StepConsensus, StopRequest, TrainingAborted, reach_consensus, step_is_finite
from .schedule import lr_at
from .state import TrainingState, capture_rng_state, save_training_checkpoint

if TYPE_CHECKING:
    from .feed import TrainBatch
    from .queue import NegativeQueue
    from .run import Run

SHOWN_PER_KIND = 5  # bad samples printed per kind; all of them go to log.jsonl


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # steps completed
    train_seconds: float
    last_log: dict[str, Any]
    model: CLIP | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: str | None = None  # the signal that stopped the run early (a checkpoint was saved)
    exit_code: int = 0  # 128 + signal number when interrupted
    checkpoint: Path | None = None  # the last checkpoint written (rank 0)
    resumed_from: Path | None = None
    bad_data: dict[str, int] = field(default_factory=dict)  # samples skipped or converted, by kind
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    is_main: bool = True  # rank 0 (the one that writes), or the only process
    # With early_stop.patience: best_val_loss, best_step, stopped_step (None: the loss still fell at `steps`)
    early_stop: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_directory(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{cfg.model}-seed{cfg.seed}"
    return Path(cfg.output_dir) / name


def autocast_context(precision: str, device: torch.device) -> Any:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_model(cfg: TrainConfig, device: torch.device) -> CLIP:
    seed_everything(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.finetune.init, device=device)
    # Trained on clipforge's image pipeline: its checkpoints record that, whatever the init file stored.
    model.preprocess_cfg = PreprocessConfig(size=model.image_size)
    apply_locks(model, cfg.finetune)
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
        model.logit_scale.requires_grad_(False)  # never read by the loss: frozen so DDP sees no unused parameter
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if model.config.vision_cfg.is_resnet:
        from ..models.resnet import use_channels_last  # noqa: PLC0415

        use_channels_last(model.visual)
    model.train()  # a loaded checkpoint comes back in eval mode
    set_locked_eval(model)  # locked towers stay in eval mode (BatchNorm statistics frozen)
    return model


def unwrap(model: torch.nn.Module) -> CLIP:
    """The CLIP inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def forward_backward(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig,
                     loss_fn: Callable = compute_loss, poison: bool = False,
                     teacher: Teacher | None = None,
                     queue: NegativeQueue | None = None) -> tuple[dict, torch.Tensor]:
    """Loss parts (tensors) of one batch, gradients in `.grad`, clipped; returns the norm before clipping.

    `poison` multiplies the loss by NaN (the `debug.nan_steps` fault injection), which makes every gradient NaN.
    `queue`: the negatives queue whose momentum encoder (if any) embeds this batch first.
    """
    core = unwrap(model)
    with autocast_context(cfg.precision, images.device):
        if queue is not None:
            queue.prepare(core, images, tokens)
        image_features, text_features, scale = model(images, tokens)
    parts = loss_fn(cfg.loss, image_features.float(), text_features.float(), scale.float(),
                    None if core.logit_bias is None else core.logit_bias.float())
    if teacher is not None:  # loss.distill: the teacher's similarity distributions, added to the objective
        parts = teacher.add_loss(parts, images, tokens, image_features.float(), text_features.float(), scale.float())
    if poison:
        parts["loss"] = parts["loss"] * float("nan")
    parts["loss"].backward()
    params = [p for p in core.parameters() if p.grad is not None]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return parts, grad_norm


def _floats(parts: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> dict[str, float]:
    out = {k: float(v.detach()) for k, v in parts.items()}
    out["grad_norm"] = float(grad_norm)
    return out


def train_step(model: CLIP, images: torch.Tensor, tokens: torch.Tensor, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig, lr: float) -> dict[str, float]:
    """One optimizer step; returns the loss parts as floats and the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    parts, grad_norm = forward_backward(model, images, tokens, cfg)
    optimizer.step()
    unwrap(model).clamp_logit_scale()
    return _floats(parts, grad_norm)


def evaluate_during_training(model: CLIP, cfg: TrainConfig, tokenizer: Any) -> dict[str, float]:
    """Synthetic-world metrics for a model mid-run (the model is put back in train mode)."""
    from ..data.synthetic import SyntheticWorld  # noqa: PLC0415
    from ..eval.synthetic import evaluate_synthetic  # noqa: PLC0415

    if cfg.data.source != "synthetic":
        return {}
    world = SyntheticWorld(cfg.data.synthetic)
    metrics = evaluate_synthetic(model, tokenizer, world, cfg.eval.zeroshot_per_class, cfg.eval.retrieval_pairs,
                                 cfg.eval.templates, synonyms=cfg.eval.synonyms)
    set_locked_eval(model)  # evaluation switched the whole model back to training mode
    return metrics


def guarded_step(run: Run, batch: TrainBatch, step: int, lr: float, stop_requested: bool) -> tuple[dict, StepConsensus]:
    """`train_step`, except that the update is skipped on every rank when any rank's loss or gradient is not
    finite; the ranks also agree here on stopping and on the data counters (one all-reduce)."""
    cfg, optimizer = run.cfg, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    images, tokens = batch.images.to(run.place.device), batch.tokens.to(run.place.device)
    parts, grad_norm = forward_backward(run.model, images, tokens, cfg, run.loss_fn,
                                        poison=step + 1 in cfg.debug.nan_steps, teacher=run.teacher,
                                        queue=run.queue)
    counts = BadDataTally.local_vector(images.shape[0], batch.problems)
    consensus = reach_consensus(not step_is_finite(parts["loss"], grad_norm), stop_requested, counts,
                                run.place.distributed)
    if consensus.nonfinite:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        run.core.clamp_logit_scale()
    out = _floats(parts, grad_norm)
    if consensus.nonfinite:
        out["skipped"] = True
    return out, consensus


def save_checkpoint(run: Run, step: int) -> Path | None:
    """Every rank contributes its RNG and data state; rank 0 writes the checkpoint and prunes old ones."""
    rng = run.gather(capture_rng_state())
    data = run.gather(run.data_position(step))
    if not run.place.is_main:
        return None
    counters = {"bad_data": run.tally.state_dict(), "nonfinite": run.guard.state_dict(),
                "elapsed_s": time.perf_counter() - run.clock}
    state = TrainingState(step=step, rng=rng, data=data, config=to_dict(run.cfg), counters=counters,
                          world_size=run.place.world_size, version=run.version)
    extra = {"queue": run.queue.state_dict()} if run.queue is not None else None
    path = save_training_checkpoint(run.ckpt_root / checkpoint_dir_name(step), run.core, run.optimizer, state,
                                    extra)
    prune_checkpoints(run.ckpt_root, run.cfg.keep_checkpoints)
    run.log.write({"step": step, "event": "checkpoint", "path": str(path)})
    run.last_checkpoint = path
    return path


def report_samples(run: Run, batch: TrainBatch, consensus: StepConsensus, step: int) -> None:
    """Add the step's data counters; log every skipped sample (and the first converted one of each kind)."""
    run.tally.add_vector(consensus.counts)
    if not any(consensus.counts[1:]):
        return
    for problem in (p for problems in run.gather(batch.problems) for p in problems):
        kind, skipped = problem["kind"], problem["kind"] in SKIPPED_KINDS
        shown = run.shown.get(kind, 0)
        run.shown[kind] = shown + 1
        if skipped or shown == 0:
            run.log.write({"step": step, "event": "bad_sample" if skipped else "converted_sample", **problem})
        if shown < SHOWN_PER_KIND:
            what = "skipped unusable" if skipped else "converted"
            more = "; further ones of this kind only in log.jsonl" if shown == SHOWN_PER_KIND - 1 else ""
            run.log.notice(f"{what} sample ({kind}): {problem['path']} ({problem['detail']}){more}")


def abort_reason(run: Run, consensus: StepConsensus, step: int) -> str | None:
    if run.guard.record(consensus.nonfinite):
        return (f"stopped at step {step}: {run.guard.consecutive} non-finite (NaN/inf) steps in a row, each "
                "skipped; lower optim.lr, check the data, or raise max_nonfinite_steps")
    bad = run.tally.exceeded(run.cfg.data.max_bad_fraction, run.cfg.data.bad_min_samples)
    if bad:
        return f"stopped at step {step}: {bad}; the bad samples are listed in {run.log.path}"
    return None


def _log_entry(run: Run, step: int, parts: dict, lr: float, samples: int, window: float, start: float) -> dict:
    now = time.perf_counter()
    return {"step": step, **parts, "lr": lr, "temperature": float(1.0 / run.core.logit_scale.detach().exp()),
            "samples_per_s": samples / max(now - window, 1e-9), "elapsed_s": now - start}


def run_steps(run: Run, stop: StopRequest, bar: tqdm) -> TrainResult:
    """Steps run.start_step .. cfg.steps - 1; returns early (after saving) when a signal asks to stop."""
    cfg = run.cfg
    window_start, window_samples, last = time.perf_counter(), 0, {}
    watch = plateau_watch(run)
    for step in range(run.start_step, cfg.steps):
        batch = run.next_batch()
        lr = lr_at(step, cfg.optim.lr, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
                   cfg.optim.schedule)
        parts, consensus = guarded_step(run, batch, step, lr, stop.requested)
        done = step + 1
        report_samples(run, batch, consensus, done)
        window_samples += batch.images.shape[0] * run.place.world_size
        if consensus.nonfinite:
            run.log.notice(f"step {done}: non-finite loss or gradient (loss {parts['loss']}, grad norm "
                           f"{parts['grad_norm']}); update skipped", step=done, event="nonfinite_skip",
                           loss=parts["loss"], grad_norm=parts["grad_norm"])
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = _log_entry(run, done, parts, lr, window_samples, window_start, run.clock)
            run.log.write(last)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}", T=f"{last['temperature']:.3f}",
                            sps=f"{last['samples_per_s']:.0f}")
            window_start, window_samples = time.perf_counter(), 0
        bar.update(1)
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps and run.place.is_main:
            metrics = evaluate_during_training(run.core, cfg, run.tokenizer)
            run.log.write({"step": done, "eval": metrics})
            bar.write(f"step {done}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                   if k.endswith("top1") or k.endswith("r1")))
        reason = abort_reason(run, consensus, done)
        if reason:
            path = save_checkpoint(run, done)
            run.barrier()  # every rank leaves together, after the checkpoint exists
            raise TrainingAborted(reason + (f"; checkpoint saved to {path}" if path else ""))
        # Every decision below is the same on all ranks (step numbers and the consensus), as the collectives
        # inside save_checkpoint require.
        saved = bool(cfg.save_every) and (done % cfg.save_every == 0 or done == cfg.steps)
        if saved:
            save_checkpoint(run, done)
        if consensus.stop:
            path = run.last_checkpoint if saved else save_checkpoint(run, done)
            run.barrier()
            run.log.notice(f"stopped by {stop.received or 'a signal on another rank'} after step {done}; "
                           f"checkpoint {path}; continue with --resume=latest", step=done, event="stopped")
            return run.result(done, last, interrupted=stop.received or "SIGTERM", exit_code=stop.exit_code or 143)
        if watch is not None and watch(done, run.log.write, lambda decision: run.gather(decision)[0]):
            run.log.notice(f"validation loss plateaued: stopped at step {done} (best {watch.stopper.best:.4f} at "
                           f"step {watch.stopper.best_step})")
            break
    stopped = watch.stopper.stopped_step if watch is not None else None
    result = run.result(stopped or cfg.steps, last)
    result.early_stop = watch.stopper.state() if watch is not None else None
    return result


def train(cfg: TrainConfig, progress: bool = True, device: str | None = None, dataset: Any = None) -> TrainResult:
    """Train a CLIP as `cfg` says; writes the run directory (config, log.jsonl, checkpoints/, model.safetensors).

    `dataset` replaces the data named by `cfg.data`: a map-style dataset of (image tensor, caption[, problems]),
    a streamed one, or a loader that keeps its own position, following `train.feed`'s contracts. Under torchrun (WORLD_SIZE > 1) every rank trains on
    its share of each global batch. SIGTERM/SIGINT save a checkpoint and return early with `interrupted` set.
    """
    from .run import setup_run  # noqa: PLC0415 - run imports this module

    run = setup_run(cfg, device, dataset)
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not (progress and run.place.is_main),
               desc="train", dynamic_ncols=True)
    try:
        with StopRequest() as stop:
            result = run_steps(run, stop, bar)
        if result.interrupted is None:
            run.finish()
        return result
    finally:
        bar.close()
        run.close()
