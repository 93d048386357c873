"""`clipforge demo`: train a small CLIP on the embedded data, then classify unseen images by their names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import atomic_write_text
from .data.synthetic import SyntheticWorld
from .eval.features import input_device
from .eval.synthetic import evaluate_synthetic, with_article
from .eval.templates import load_templates
from .eval.zeroshot import build_classifier
from .tokenizer import get_tokenizer
from .train.config import TrainConfig, load_train_config
from .train.loop import train

DEMO_KEYS = (
    "zeroshot_seen_top1", "zeroshot_heldout_top1", "zeroshot_seen_top1_single_template",
    "zeroshot_heldout_top1_single_template", "retrieval_i2t_r1", "retrieval_t2i_r1",
)


def results_table(metrics: dict[str, float]) -> str:
    """A Markdown table of the demo's headline numbers (percentages)."""
    rows = [
        ("zero-shot top-1, seen combinations", "zeroshot_seen_top1_single_template", "zeroshot_seen_top1"),
        ("zero-shot top-1, held-out combinations", "zeroshot_heldout_top1_single_template", "zeroshot_heldout_top1"),
        ("zero-shot top-5, seen combinations", "zeroshot_seen_top5_single_template", "zeroshot_seen_top5"),
        ("zero-shot top-5, held-out combinations", "zeroshot_heldout_top5_single_template", "zeroshot_heldout_top5"),
    ]
    lines = ["| metric | single template | template ensemble |", "|---|---:|---:|"]
    for label, single, ensemble in rows:
        lines.append(f"| {label} | {100 * metrics[single]:.1f}% | {100 * metrics[ensemble]:.1f}% |")
    if "zeroshot_seen_top1_synonyms" in metrics:
        lines.append(f"| zero-shot top-1 with synonym class names, seen / held-out | | "
                     f"{100 * metrics['zeroshot_seen_top1_synonyms']:.1f}% / "
                     f"{100 * metrics['zeroshot_heldout_top1_synonyms']:.1f}% |")
    lines += ["", "| retrieval (1000 held-out pairs) | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for label, key in (("image → text", "i2t"), ("text → image", "t2i")):
        cells = " | ".join(f"{100 * metrics[f'retrieval_{key}_r{k}']:.1f}%" for k in (1, 5, 10))
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


@torch.no_grad()
def show_examples(model: torch.nn.Module, cfg: TrainConfig, count: int = 6) -> list[str]:
    """Classify a few freshly generated images (half of them held-out combinations) by class name."""
    world = SyntheticWorld(cfg.data.synthetic)
    tokenizer = get_tokenizer(cfg.model)
    model.eval()
    classifier = build_classifier(model, tokenizer, [with_article(c) for c in world.classnames],
                                  load_templates(cfg.eval.templates))
    lines = []
    for i in range(count):
        combos = world.heldout if i % 2 else world.seen
        image, label = world.zeroshot_example(10_000 + 7 * i, combos)
        from .transforms import normalize, to_tensor  # noqa: PLC0415

        pixels = normalize(to_tensor(image))[None].to(input_device(model))  # [1, 3, S, S]
        features = model.encode_image(pixels, normalize=True).float().cpu()
        probs = (100.0 * features @ classifier).softmax(dim=-1)[0]
        top = probs.topk(3)
        guesses = ", ".join(f"{world.classnames[j]} {p:.0%}" for p, j in zip(top.values.tolist(), top.indices.tolist()))
        kind = "held-out" if i % 2 else "seen"
        lines.append(f"  image of {with_article(world.classnames[label]):<19} ({kind:>8}) -> {guesses}")
    return lines


def run_demo(output: str | Path | None = None, overrides: list[str] | None = None, progress: bool = True,
             config: str | Path | None = None) -> dict[str, float]:
    cfg = load_train_config(config, overrides or [])
    print(f"Training {cfg.model} on the embedded synthetic world: {cfg.steps} steps of {cfg.batch_size} pairs "
          f"({len(cfg.data.synthetic.heldout)} colour x shape combinations held out of training).")
    result = train(cfg, progress=progress)
    if result.interrupted:  # a signal stopped training (a checkpoint was saved): no evaluation of half a run
        raise KeyboardInterrupt
    assert result.model is not None
    world = SyntheticWorld(cfg.data.synthetic)
    metrics = evaluate_synthetic(result.model, get_tokenizer(cfg.model), world, cfg.eval.zeroshot_per_class,
                                 cfg.eval.retrieval_pairs, cfg.eval.templates, synonyms=cfg.eval.synonyms)
    metrics["train_seconds"] = result.train_seconds
    print(f"\nTrained in {result.train_seconds:.0f} s. Zero-shot over all 64 colour x shape classes:\n")
    print(results_table(metrics))
    print("\nZero-shot classification of new images, by reading the class names:")
    print("\n".join(show_examples(result.model, cfg)))
    from .search.demo_search import run_search_demo  # noqa: PLC0415 - the search side loads only here

    run_search_demo(result.run_dir, cfg.data.synthetic, progress=progress)
    atomic_write_text(result.run_dir / "results.json", json.dumps(metrics, indent=2))
    if output is not None:
        atomic_write_text(output, json.dumps(metrics, indent=2))
        print(f"\nResults written to {output}")
    return metrics
