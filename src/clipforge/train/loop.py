"""The training loop: batches -> features -> loss -> backward -> clip -> AdamW -> lr_at(step) -> clamp."""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ..checkpoint import atomic_write_text, save_model
from ..config import to_dict
from ..factory import create_model
from ..losses import compute_loss
from ..models.clip import CLIP
from ..registry import get_model_config
from ..tokenizer import get_tokenizer
from .config import TrainConfig
from .data import build_train_dataset, build_train_loader
from .optim import build_optimizer
from .schedule import lr_at


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_seconds: float
    last_log: dict[str, Any]
    model: CLIP | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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
    model_cfg = get_model_config(cfg.model)
    if cfg.loss.uses_logit_bias and model_cfg.init_logit_bias is None:
        # SigLIP's initialisation (Zhai et al. 2023): scale 10 and bias -10, so the B^2 - B negatives start
        # with a small loss. Recorded in the model's config so the saved checkpoint reloads with its bias.
        model_cfg = replace(model_cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    model = create_model(model_cfg, device=device)
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
    return model


def train_step(model: CLIP, images: torch.Tensor, tokens: torch.Tensor, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig, lr: float) -> dict[str, float]:
    """One optimizer step; returns the loss parts as floats and the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(cfg.precision, images.device):
        image_features, text_features, scale = model(images, tokens)
    parts = compute_loss(cfg.loss, image_features.float(), text_features.float(), scale.float(),
                         None if model.logit_bias is None else model.logit_bias.float())
    parts["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    model.clamp_logit_scale()
    out = {k: float(v.detach()) for k, v in parts.items()}
    out["grad_norm"] = float(grad_norm)
    return out


def evaluate_during_training(model: CLIP, cfg: TrainConfig, tokenizer: Any) -> dict[str, float]:
    """Synthetic-world metrics for a model mid-run (the model is put back in train mode)."""
    from ..data.synthetic import SyntheticWorld  # noqa: PLC0415
    from ..eval.synthetic import evaluate_synthetic  # noqa: PLC0415

    if cfg.data.source != "synthetic":
        return {}
    world = SyntheticWorld(cfg.data.synthetic)
    return evaluate_synthetic(model, tokenizer, world, cfg.eval.zeroshot_per_class, cfg.eval.retrieval_pairs,
                              cfg.eval.templates)


def train(cfg: TrainConfig, progress: bool = True, device: str | None = None) -> TrainResult:
    """Train a CLIP as `cfg` says; writes the run directory (config, log.jsonl, model.safetensors)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    model = prepare_model(cfg, dev)
    tokenizer = get_tokenizer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    dataset, shuffle = build_train_dataset(cfg, model.image_size)
    loader = build_train_loader(cfg, dataset, shuffle, tokenizer)
    log_path = run_dir / "log.jsonl"
    log_path.write_text("")
    model.train()
    start = time.perf_counter()
    window_start, window_samples = start, 0
    last: dict[str, Any] = {}
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train", dynamic_ncols=True)
    with open(log_path, "a") as log:
        for step, (images, tokens) in enumerate(loader):
            lr = lr_at(step, cfg.optim.lr, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
                       cfg.optim.schedule)
            parts = train_step(model, images.to(dev), tokens.to(dev), optimizer, cfg, lr)
            window_samples += images.shape[0]
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.perf_counter()
                last = {"step": step + 1, **parts, "lr": lr,
                        "temperature": float(1.0 / model.logit_scale.detach().exp()),
                        "samples_per_s": window_samples / max(now - window_start, 1e-9),
                        "elapsed_s": now - start}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}", T=f"{last['temperature']:.3f}",
                                sps=f"{last['samples_per_s']:.0f}")
                window_start, window_samples = now, 0
            bar.update(1)
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                metrics = evaluate_during_training(model, cfg, tokenizer)
                log.write(json.dumps({"step": step + 1, "eval": metrics}) + "\n")
                log.flush()
                bar.write(f"step {step + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                           if k.endswith("top1") or k.endswith("r1")))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_model(model, run_dir / "model.safetensors", {"step": str(step + 1)})
    bar.close()
    train_seconds = time.perf_counter() - start
    save_model(model, run_dir / "model.safetensors", {"step": str(cfg.steps)})
    return TrainResult(run_dir, cfg.steps, train_seconds, last, model)
