"""Stopping on a plateau of the validation contrastive loss, as Chen et al. (ICLR 2024) train their MSCOCO
setting: every `every` steps the CLIP loss is measured on fixed held-out pairs of the training source, and the
run stops once `patience` measurements in a row failed to beat the best one by more than `min_delta`.

`PlateauStopper` is the rule alone (pure, no tensors); `ValidationWatch` feeds it from a model. The validation
pairs: for the synthetic world a stream of its own (never drawn in training), for a manifest or the offline
corpora the rows of split `early_stop.split`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import ConfigError
from ..losses import clip_loss

from .config import EarlyStopConfig, TrainConfig

if TYPE_CHECKING:
    from ..models.clip import CLIP

__all__ = ["EarlyStopConfig", "PlateauStopper", "ValidationWatch", "plateau_watch", "validation_batches",
           "validation_loss"]


class PlateauStopper:
    """Feed it (step, validation loss); it says when the loss has stopped falling.

    A value improves when it is below best - min_delta; after `patience` non-improving values in a row,
    `observe` returns True and `stopped_step` is set. NaN never improves.
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience must be >= 1 and min_delta >= 0, got {patience} and {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.best_step: int | None = None
        self.stale = 0
        self.stopped_step: int | None = None

    def observe(self, step: int, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        if self.stale >= self.patience and self.stopped_step is None:
            self.stopped_step = step
        return self.stopped_step is not None

    def state(self) -> dict[str, float | int | None]:
        return {"best_val_loss": self.best, "best_step": self.best_step, "stopped_step": self.stopped_step}

    def state_dict(self) -> dict[str, float | int | None]:
        """Everything `observe` depends on, JSON-safe (no observation yet: best None), for checkpoints."""
        best = None if math.isinf(self.best) else self.best
        return {"best": best, "best_step": self.best_step, "stale": self.stale, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.best_step, self.stale, self.stopped_step = state["best_step"], int(state["stale"]), state["stopped_step"]


def validation_batches(cfg: TrainConfig, image_size: int, tokenizer: Callable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation batches [(images [B, 3, S, S], tokens [B, L])] of the run's training source."""
    count = cfg.early_stop.batches * cfg.batch_size
    pairs: list[tuple[torch.Tensor, str]]
    if cfg.data.source == "synthetic":
        from ..data.synthetic import STREAM_VALIDATION, SyntheticPairs, SyntheticWorld  # noqa: PLC0415

        data = SyntheticPairs(SyntheticWorld(cfg.data.synthetic), STREAM_VALIDATION, length=count)
        pairs = [data[i] for i in range(count)]
    elif cfg.data.source in ("manifest", "offline"):
        pairs = _caption_split_pairs(cfg, image_size, count)
    else:
        raise ConfigError(f"config key 'early_stop.patience': plateau stopping needs data.source synthetic, manifest "
                          f"or offline (a validation split), not '{cfg.data.source}'")
    batches = []
    for start in range(0, len(pairs) - cfg.batch_size + 1, cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        batches.append((torch.stack([image for image, _ in chunk]), tokenizer([caption for _, caption in chunk])))
    return batches


def _caption_split_pairs(cfg: TrainConfig, image_size: int, count: int) -> list[tuple[torch.Tensor, str]]:
    """The first `count` pairs of split `early_stop.split` (in a fixed shuffled order), evaluation transform."""
    import numpy as np  # noqa: PLC0415

    from ..data.catalog import get_dataset  # noqa: PLC0415
    from ..data.manifest import ManifestDataset  # noqa: PLC0415
    from ..transforms import EvalTransform  # noqa: PLC0415
    from .data import CaptionPairs  # noqa: PLC0415

    split = cfg.early_stop.split
    if cfg.data.source == "manifest":
        assert cfg.data.path is not None
        datasets = [ManifestDataset(cfg.data.path, split=split)]
    else:
        datasets = [get_dataset(name, split, root=cfg.data.root) for name in cfg.data.datasets]
    pairs = CaptionPairs(datasets, EvalTransform(image_size))  # type: ignore[arg-type]
    if len(pairs) < cfg.batch_size:
        raise ConfigError(f"config key 'early_stop.split': split '{split}' holds {len(pairs)} pairs, fewer than "
                          f"one batch of {cfg.batch_size}")
    order = np.random.default_rng(0).permutation(len(pairs))[:count]
    return [pairs[int(i)][:2] for i in order]


@torch.no_grad()
def validation_loss(model: CLIP, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean CLIP loss over the validation batches at the model's current temperature (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for images, tokens in batches:
        image_features, text_features, scale = model(images.to(device), tokens.to(device))
        total += float(clip_loss(image_features.float(), text_features.float(), scale.float()))
    if was_training:
        from ..models.lock import set_locked_eval  # noqa: PLC0415

        model.train()
        set_locked_eval(model)  # locked towers stay in eval mode
    return total / len(batches)


class ValidationWatch:
    """Every `early_stop.every` steps: the validation loss, logged; True once the plateau rule says stop."""

    def __init__(self, cfg: TrainConfig, model: CLIP, tokenizer: Callable, device: torch.device,
                 saved: dict[str, Any] | None = None) -> None:
        """`saved`: the rule's state from the checkpoint a run resumes (`PlateauStopper.state_dict`)."""
        assert cfg.early_stop.patience is not None
        self.cfg, self.model, self.device = cfg, model, device
        self.batches = validation_batches(cfg, model.image_size, tokenizer)
        self.stopper = PlateauStopper(cfg.early_stop.patience, cfg.early_stop.min_delta)
        if saved is not None:
            self.stopper.load_state_dict(saved)

    def __call__(self, step: int, log: Callable[[dict], None], agree: Callable[[bool], bool] = bool) -> bool:
        """`agree` turns this rank's decision into the run's (under DDP: rank 0's, so all ranks stop together)."""
        if step % self.cfg.early_stop.every:
            return False
        value = validation_loss(self.model, self.batches, self.device)
        stop = agree(self.stopper.observe(step, value))
        if stop and self.stopper.stopped_step is None:
            self.stopper.stopped_step = step
        log({"step": step, "val_loss": value, **({"event": "early_stop", **self.stopper.state()} if stop else {})})
        return stop


def plateau_watch(run: Any, saved: dict[str, Any] | None = None) -> ValidationWatch | None:
    """The watch for a run (`train.setup.RunContext`) whose config sets early_stop.patience, else None.

    `saved`: the stopper's state from the checkpoint a run resumes (`PlateauStopper.state_dict`), so the
    resumed run stops where the uninterrupted one would; None starts afresh."""
    if run.cfg.early_stop.patience is None:
        return None
    return ValidationWatch(run.cfg, run.core, run.tokenizer, run.place.device, saved)
