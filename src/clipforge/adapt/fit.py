"""`clipforge finetune-head`: k labelled images per class -> a zero-shot-initialised linear head, trained.

Features and zero-shot weights come from the evaluation code (`eval.evaluators.Session`: cached image features,
the dataset's prompt templates), so the head's starting point is exactly `clipforge eval zeroshot`'s classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..eval.features import model_checksum
from ..eval.linear_probe import sample_k_shot
from ..eval.metrics import classification_metrics
from ..eval.evaluators import EvalOptions, Session
from ..eval.resolve import eval_device, model_tokenizer, resolve_model
from .head import LinearHead, train_head, zeroshot_head


@dataclass(frozen=True)
class HeadOptions:
    shots: int = 16  # labelled training images per class (0: every training image)
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    seed: int = 0


def fit_head(model_spec: str, dataset: str, opts: HeadOptions, eval_opts: EvalOptions) -> tuple[LinearHead, dict]:
    """(trained head, results: test metrics of the zero-shot initialisation and of the trained head)."""
    if opts.shots < 0 or opts.epochs < 0 or not opts.lr > 0:
        raise ConfigError(f"finetune-head: expected --shots >= 0, --epochs >= 0, --lr > 0; got {opts.shots}, "
                          f"{opts.epochs}, {opts.lr}")
    model, run_dir = resolve_model(model_spec, eval_device(eval_opts.device), eval_opts.load)
    ev = Session(model, model_tokenizer(model, model_spec), run_dir, dataset, eval_opts)
    data, features, labels = ev.labelled_features("train")
    if opts.shots:
        features, labels = _kshot(features, labels, opts.shots, opts.seed)
    scale = float(model.logit_scale.detach().exp())
    start = zeroshot_head(ev.classifier(data), scale, data.classnames)
    start.info.update({"dataset": dataset, "model_checksum": model_checksum(model), "shots": str(opts.shots),
                       "epochs": str(opts.epochs), "lr": str(opts.lr), "seed": str(opts.seed)})
    head = train_head(start, features, labels, opts.epochs, opts.lr, opts.batch_size, opts.weight_decay, opts.seed)
    _, test_x, test_y = ev.labelled_features(eval_opts.split)
    results = {"dataset": dataset, "model": model_spec, "train_images": len(labels), "classes": len(data.classnames),
               "zeroshot_init": classification_metrics(start(test_x), test_y),
               "head": classification_metrics(head(test_x), test_y)}
    return head, results


def _kshot(features: torch.Tensor, labels: torch.Tensor, shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sample_k_shot(labels, shots, torch.Generator().manual_seed(seed))
    return features[idx], labels[idx]
