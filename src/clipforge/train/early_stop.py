"""Stopping on a plateau of a validation signal, as Chen et al. (ICLR 2024) train their MSCOCO setting: every
`every` steps the model is measured on fixed held-out pairs of the training source, and the run stops once
`patience` measurements in a row failed to beat the best one by more than `min_delta`.

Three signals are measured at every check and logged; `early_stop.monitor` picks the one the rule follows:
- `loss` (the paper's): the CLIP loss at the model's learned temperature. Its logits scale with 1/T, so as T
  falls every remaining mistake costs more and this loss can climb while retrieval still improves;
- `fixed_t_loss`: the CLIP loss at the fixed temperature `early_stop.fixed_temperature`, blind to that effect;
- `recall`: validation R@1, the mean of image-to-text and text-to-image over all validation pairs (maximised).
With `restore_best` the weights at the best check are kept (`best-model.safetensors` in the run directory) and
become the run's final model, as Hugging Face's load_best_model_at_end does.

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

from .config import MONITOR_KEYS, EarlyStopConfig, TrainConfig

if TYPE_CHECKING:
    from ..models.clip import CLIP

__all__ = ["MONITOR_KEYS", "EarlyStopConfig", "PlateauStopper", "ValidationWatch", "plateau_watch",
           "validation_batches", "validation_loss", "validation_metrics"]


class PlateauStopper:
    """Feed it (step, validation value); it says when the value has stopped improving.

    A value improves when it is below best - min_delta (with `maximize`: above best + min_delta); after
    `patience` non-improving values in a row, `observe` returns True and `stopped_step` is set. NaN never
    improves. `key` names the value in `state()` (`best_<key>`).
    """

    def __init__(self, patience: int, min_delta: float = 0.0, maximize: bool = False, key: str = "val_loss") -> None:
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience must be >= 1 and min_delta >= 0, got {patience} and {min_delta}")
        self.patience, self.min_delta, self.maximize, self.key = patience, min_delta, maximize, key
        self.best = self._worst
        self.best_step: int | None = None
        self.stale = 0
        self.stopped_step: int | None = None

    @property
    def _worst(self) -> float:
        return -math.inf if self.maximize else math.inf

    def improves(self, value: float) -> bool:
        if self.maximize:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def observe(self, step: int, value: float) -> bool:
        if self.improves(value):
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        if self.stale >= self.patience and self.stopped_step is None:
            self.stopped_step = step
        return self.stopped_step is not None

    def state(self) -> dict[str, float | int | None]:
        return {f"best_{self.key}": self.best, "best_step": self.best_step, "stopped_step": self.stopped_step}

    def state_dict(self) -> dict[str, float | int | None]:
        """Everything `observe` depends on, JSON-safe (no observation yet: best None), for checkpoints."""
        best = None if math.isinf(self.best) else self.best
        return {"best": best, "best_step": self.best_step, "stale": self.stale, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = self._worst if state["best"] is None else float(state["best"])
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
def validation_metrics(model: CLIP, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                       fixed_temperature: float = 0.07) -> dict[str, float]:
    """The validation signals of `MONITOR_KEYS` (eval mode, fp32), from one forward pass per batch.

    val_loss / val_loss_fixed_t: the CLIP loss per batch, at the model's scale / at 1/fixed_temperature,
    averaged over batches (as in training). val_r1: over all validation pairs pooled, the mean of image-to-text
    and text-to-image R@1, where a retrieved caption (image) counts as right when its tokens equal the pair's
    caption: identical captions of different images are not mistakes.
    """
    was_training = model.training
    model.eval()
    learned = fixed = 0.0
    images_out, texts_out, tokens_all = [], [], []
    for images, tokens in batches:
        image_features, text_features, scale = model(images.to(device), tokens.to(device))
        image_features, text_features = image_features.float(), text_features.float()
        learned += float(clip_loss(image_features, text_features, scale.float()))
        fixed += float(clip_loss(image_features, text_features, 1.0 / fixed_temperature))
        images_out.append(image_features.cpu())
        texts_out.append(text_features.cpu())
        tokens_all.append(tokens.cpu())
    if was_training:
        from ..models.lock import set_locked_eval  # noqa: PLC0415

        model.train()
        set_locked_eval(model)  # locked towers stay in eval mode
    similarity = torch.cat(images_out) @ torch.cat(texts_out).T  # [N images, N captions]
    _, caption_id = torch.unique(torch.cat(tokens_all), dim=0, return_inverse=True)  # [N]: same id = same caption
    image_to_text = (caption_id[similarity.argmax(dim=1)] == caption_id).float().mean()
    text_to_image = (caption_id[similarity.argmax(dim=0)] == caption_id).float().mean()
    return {"val_loss": learned / len(batches), "val_loss_fixed_t": fixed / len(batches),
            "val_r1": float(image_to_text + text_to_image) / 2}


def validation_loss(model: CLIP, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean CLIP loss over the validation batches at the model's current temperature (eval mode, fp32)."""
    return validation_metrics(model, batches, device)["val_loss"]


class ValidationWatch:
    """Every `early_stop.every` steps: the validation signals, logged; True once the plateau rule says stop."""

    def __init__(self, cfg: TrainConfig, model: CLIP, tokenizer: Callable, device: torch.device,
                 saved: dict[str, Any] | None = None, on_best: Callable[[int], None] | None = None) -> None:
        """`saved`: the rule's state from the checkpoint a run resumes (`PlateauStopper.state_dict`).
        `on_best(step)`: called after a check that improved the monitored signal (restore_best keeps weights)."""
        assert cfg.early_stop.patience is not None
        es = cfg.early_stop
        self.cfg, self.model, self.device, self.on_best = cfg, model, device, on_best
        self.key = MONITOR_KEYS[es.monitor]
        self.batches = validation_batches(cfg, model.image_size, tokenizer)
        self.stopper = PlateauStopper(es.patience, es.min_delta, maximize=es.monitor == "recall", key=self.key)
        if saved is not None:
            self.stopper.load_state_dict(saved)

    def __call__(self, step: int, log: Callable[[dict], None], agree: Callable[[bool], bool] = bool) -> bool:
        """`agree` turns this rank's decision into the run's (under DDP: rank 0's, so all ranks stop together)."""
        if step % self.cfg.early_stop.every:
            return False
        values = validation_metrics(self.model, self.batches, self.device, self.cfg.early_stop.fixed_temperature)
        stop = agree(self.stopper.observe(step, values[self.key]))
        if stop and self.stopper.stopped_step is None:
            self.stopper.stopped_step = step
        log({"step": step, **values, **({"event": "early_stop", **self.stopper.state()} if stop else {})})
        if self.stopper.best_step == step and self.on_best is not None:
            self.on_best(step)
        return stop


def plateau_watch(run: Any, saved: dict[str, Any] | None = None,
                  on_best: Callable[[int], None] | None = None) -> ValidationWatch | None:
    """The watch for a run (`train.setup.RunContext`) whose config sets early_stop.patience, else None.

    `saved`: the stopper's state from the checkpoint a run resumes (`PlateauStopper.state_dict`), so the
    resumed run stops where the uninterrupted one would; None starts afresh."""
    if run.cfg.early_stop.patience is None:
        return None
    return ValidationWatch(run.cfg, run.core, run.tokenizer, run.place.device, saved, on_best)
