"""`clipforge demo`: train a small CLIP on the embedded data, then classify unseen images by their names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import atomic_write_text
from .config import ConfigError
from .data.synthetic import SyntheticWorld
from .eval.evaluators import Evaluator, run_evaluators
from .eval.features import input_device
from .eval.synthetic import headline, with_article
from .eval.templates import load_templates
from .eval.zeroshot import build_classifier
from .tokenizer import tokenizer_for
from .train.config import TrainConfig, load_train_config
from .train.loop import train

def results_table(metrics: dict[str, Any]) -> str:
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
def show_examples(model: torch.nn.Module, tokenizer: Callable, cfg: TrainConfig, count: int = 6) -> list[str]:
    """Classify a few freshly generated images (half of them held-out combinations) by class name."""
    world = SyntheticWorld(cfg.data.synthetic)
    model.eval()
    classifier = build_classifier(model, tokenizer, [with_article(c) for c in world.classnames],
                                  load_templates("synthetic"))
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


def check_demo_config(cfg: TrainConfig) -> None:
    """The demo trains on the synthetic world and reports its zero-shot and retrieval evaluators."""
    if cfg.data.source != "synthetic":
        raise ConfigError(f"config key 'data.source': the demo trains on the synthetic world, not '{cfg.data.source}'")
    names = {task.key for task in cfg.eval.tasks}
    missing = [n for n in ("zeroshot/synthetic", "retrieval/synthetic") if n not in names]
    if missing:
        raise ConfigError(f"config key 'eval.tasks': the demo reports '{missing[0]}'; add that evaluator")


# The demo's recipe is the trainer's defaults with a far stronger weight decay. With AdamW's usual 0.1 the held-out
# colour x shape combinations depended on the seed (71.2-85.6% over seeds 0-2); with 3.0 they reached 90.6-99.4%
# (seeds 0-3, one and two threads), shapes held out in one colour now recognised in it (README, "What the demo
# shows"). It stays out of the trainer's defaults, which other models and data also start from.
# `configs/demo.yaml` restates it.
DEMO_OVERRIDES: tuple[str, ...] = ("--optim.weight_decay=3.0",)


def demo_config(config: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The demo's training configuration: `config` (a YAML file) if given, else the trainer's defaults with
    `DEMO_OVERRIDES`; then `overrides` (`--key=value`), which win."""
    recipe = [] if config is not None else list(DEMO_OVERRIDES)
    return load_train_config(config, recipe + list(overrides or []))


def run_demo(output: str | Path | None = None, overrides: list[str] | None = None, progress: bool = True,
             config: str | Path | None = None) -> dict[str, Any]:
    cfg = demo_config(config, overrides)
    check_demo_config(cfg)
    print(f"Training {cfg.model} on the embedded synthetic world: {cfg.steps} steps of {cfg.batch_size} pairs "
          f"({len(cfg.data.synthetic.heldout)} colour x shape combinations held out of training).")
    result = train(cfg, progress=progress)
    if result.interrupted:  # a signal stopped training (a checkpoint was saved): no evaluation of half a run
        raise KeyboardInterrupt
    assert result.model is not None
    tokenizer = tokenizer_for(result.model.config)  # as `clipforge eval` derives it from the saved model
    evaluators = [Evaluator.from_task(task, run_dir=result.run_dir) for task in cfg.eval.tasks]
    results = run_evaluators(evaluators, result.model, tokenizer)
    metrics: dict[str, Any] = headline(results["zeroshot/synthetic"], results["retrieval/synthetic"])
    metrics["evaluators"] = results  # what `clipforge eval zeroshot|retrieval --model RUN_DIR` reproduces
    metrics["train_seconds"] = result.train_seconds
    print(f"\nTrained in {result.train_seconds:.0f} s. Zero-shot over all 64 colour x shape classes:\n")
    print(results_table(metrics))
    print("\nZero-shot classification of new images, by reading the class names:")
    print("\n".join(show_examples(result.model, tokenizer, cfg)))
    from .search.demo_search import run_search_demo  # noqa: PLC0415 - the search side loads only here

    run_search_demo(result.run_dir, cfg.data.synthetic, progress=progress)
    atomic_write_text(result.run_dir / "results.json", json.dumps(metrics, indent=2))
    if output is not None:
        atomic_write_text(output, json.dumps(metrics, indent=2))
        print(f"\nResults written to {output}")
    return metrics
