"""`clipforge eval TASK`: resolve the model and dataset, run the task, return CLIP_benchmark-style metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, from_dict
from ..data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticPairs, SyntheticWorld, SyntheticZeroShot
from ..registry import list_models
from ..tokenizer import BPETokenizer
from .metrics import retrieval_metrics
from .synthetic import encode_pairs, with_article
from .templates import load_templates
from .zeroshot import build_classifier, encode_images, zeroshot_scores


def resolve_model(spec: str) -> tuple[torch.nn.Module, Path | None]:
    """(model in eval mode, run directory if any) from a run directory, a checkpoint file or an architecture."""
    path = Path(spec)
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / "config.json").is_file():
        from ..convert import load_model  # noqa: PLC0415

        return load_model(path / "model.safetensors").eval(), path
    if path.exists():
        from ..convert import load_model  # noqa: PLC0415

        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return load_model(path).eval(), run_dir
    if spec in list_models():
        from ..factory import create_model  # noqa: PLC0415

        return create_model(spec).eval(), None  # random weights: the floor any training must beat
    raise FileNotFoundError(spec)


def synthetic_config(run_dir: Path | None, config_path: str | None, image_size: int) -> SyntheticConfig:
    """The synthetic world the model was trained on (held-out combinations included)."""
    source = Path(config_path) if config_path else (run_dir / "config.yaml" if run_dir else None)
    data: dict[str, Any] = {}
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(str(source))
        loaded = yaml.safe_load(source.read_text()) or {}
        data = dict(((loaded.get("data") or {}).get("synthetic")) or {})
    data["image_size"] = image_size
    return from_dict(SyntheticConfig, data, prefix="data.synthetic")


@torch.no_grad()
def run_synthetic(task: str, model: torch.nn.Module, world: SyntheticWorld, args: argparse.Namespace) -> dict:
    tokenizer = BPETokenizer(context_length=getattr(model, "context_length", 77))
    if task == "zeroshot":
        templates = load_templates(args.templates or "synthetic")
        prompts = [with_article(c) for c in world.classnames]
        results: dict[str, Any] = {"classnames": len(prompts), "templates": len(templates)}
        for name, tmpl in (("ensemble", templates), ("single_template", templates[:1])):
            classifier = build_classifier(model, tokenizer, prompts, tmpl)
            for split, combos in (("seen", world.seen), ("heldout", world.heldout)):
                features, labels = encode_images(model, SyntheticZeroShot(world, combos, args.per_class))
                for metric, value in zeroshot_scores(features, labels, classifier).items():
                    results[f"{split}/{name}/{metric}"] = value
        return results
    pairs = SyntheticPairs(world, STREAM_EVAL, length=args.pairs, complete=True)
    image_features, text_features = encode_pairs(model, tokenizer, pairs)
    return retrieval_metrics(image_features, text_features, torch.arange(len(pairs)))


def run_eval(task: str, model_spec: str, dataset: str, args: argparse.Namespace) -> dict:
    model, run_dir = resolve_model(model_spec)
    if dataset == "synthetic":
        cfg = synthetic_config(run_dir, args.config, model.image_size)
        return run_synthetic(task, model, SyntheticWorld(cfg), args)
    raise ConfigError(f"unknown dataset '{dataset}'; available: synthetic")
