"""Evaluation on the embedded synthetic world: zero-shot on seen and held-out combinations, retrieval."""

from __future__ import annotations

import json
from typing import Callable

import torch

from ..data.synthetic import STREAM_EVAL, SyntheticPairs, SyntheticWorld, SyntheticZeroShot
from .features import input_device
from .metrics import retrieval_metrics
from .templates import load_templates
from .zeroshot import build_classifier, encode_images, zeroshot_scores


def with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def synonym_classnames(classnames: list[str]) -> list[str]:
    """'red circle' -> 'crimson disc': the same classes in words the captions never use."""
    from importlib import resources  # noqa: PLC0415

    table = json.loads((resources.files("clipforge") / "eval" / "synonyms" / "synthetic.json").read_text())
    out = []
    for name in classnames:
        colour, shape = name.split()
        out.append(f"{table['colours'][colour]} {table['shapes'][shape]}")
    return out


@torch.no_grad()
def encode_pairs(model: torch.nn.Module, tokenizer: Callable, dataset: SyntheticPairs, batch_size: int = 256,
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = torch.stack([img for img, _ in items]).to(input_device(model, device))
        tokens = tokenizer([cap for _, cap in items]).to(input_device(model, device))
        images.append(model.encode_image(batch, normalize=True).float().cpu())
        texts.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def evaluate_synthetic(
    model: torch.nn.Module, tokenizer: Callable, world: SyntheticWorld, per_class: int = 20,
    retrieval_pairs: int = 1000, templates: str = "synthetic", device: str | torch.device | None = None,
    synonyms: bool = False,
) -> dict[str, float]:
    """The demo's metrics, as fractions in [0, 1]. Classification is always over all 64 classes.

    With `synonyms`, also zero-shot top-1 with class names in words the captions never use
    (`zeroshot_{seen,heldout}_top1_synonyms`).
    """
    was_training = model.training
    model.eval()
    all_templates = load_templates(templates)
    prompts = [with_article(c) for c in world.classnames]
    ensemble = build_classifier(model, tokenizer, prompts, all_templates, device)
    single = build_classifier(model, tokenizer, prompts, all_templates[:1], device)
    synonym = None
    if synonyms:
        synonym_prompts = [with_article(c) for c in synonym_classnames(world.classnames)]
        synonym = build_classifier(model, tokenizer, synonym_prompts, all_templates, device)
    results: dict[str, float] = {}
    for split, combos in (("seen", world.seen), ("heldout", world.heldout)):
        features, labels = encode_images(model, SyntheticZeroShot(world, combos, per_class), device=device)
        if synonym is not None:
            results[f"zeroshot_{split}_top1_synonyms"] = zeroshot_scores(features, labels, synonym)["acc1"]
        ens = zeroshot_scores(features, labels, ensemble)
        one = zeroshot_scores(features, labels, single)
        results[f"zeroshot_{split}_top1"] = ens["acc1"]
        results[f"zeroshot_{split}_top5"] = ens["acc5"]
        results[f"zeroshot_{split}_mean_per_class_recall"] = ens["mean_per_class_recall"]
        results[f"zeroshot_{split}_top1_single_template"] = one["acc1"]
        results[f"zeroshot_{split}_top5_single_template"] = one["acc5"]
    pairs = SyntheticPairs(world, STREAM_EVAL, length=retrieval_pairs, complete=True)
    image_features, text_features = encode_pairs(model, tokenizer, pairs, device=device)
    scores = retrieval_metrics(image_features, text_features, torch.arange(len(pairs)))
    for k in (1, 5, 10):
        results[f"retrieval_i2t_r{k}"] = scores[f"text_retrieval_recall@{k}"]
        results[f"retrieval_t2i_r{k}"] = scores[f"image_retrieval_recall@{k}"]
    model.train(was_training)
    return results
