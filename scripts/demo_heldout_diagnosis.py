"""Which part of a held-out combination a synthetic-world model gets wrong: per held-out combination, the recall
of 64-way zero-shot ("a photo of a black ring."), of shape-only prompts over the 8 shapes ("a photo of a ring.")
and of colour-only prompts over the 8 colours ("a photo of a black shape."), and the most common 64-way miss.

    python scripts/demo_heldout_diagnosis.py runs/RN-Tiny-64-seed0 [--per-class 60] [--output diag.json]

A model that names the colour but not the shape of a held-out image, with shape-only prompts failing on it too,
has colour-specific shape features in its image tower; shape-only prompts that succeed point at the text side.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

import torch

from clipforge.checkpoint import atomic_write_text
from clipforge.data.synthetic import COLOURS, SHAPES, SyntheticConfig, SyntheticWorld, SyntheticZeroShot
from clipforge.eval.features import encode_images, encode_texts
from clipforge.factory import resolve_model
from clipforge.tokenizer import tokenizer_for


def recall_by_class(truth: Sequence[str], predicted: Sequence[str], part: int | None = None) -> dict[str, float]:
    """Per true 'colour shape' class, the share of its images whose prediction is right; `part` 0 or 1 compares
    only the colour or the shape word of the truth with a one-word prediction."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter(truth)
    for true, guess in zip(truth, predicted, strict=True):
        target = true if part is None else true.split()[part]
        hits[true] += target == guess
    return {name: hits[name] / totals[name] for name in sorted(totals)}


def diagnose(model: torch.nn.Module, per_class: int) -> dict[str, dict]:
    """The three recalls and the most common 64-way miss, per held-out combination of the default world."""
    world = SyntheticWorld(SyntheticConfig(image_size=model.config.vision_cfg.image_size))
    data = SyntheticZeroShot(world, world.heldout, per_class=per_class)
    tokenize = tokenizer_for(model.config)
    feats, labels = encode_images(model, data, batch_size=256)  # [N, D], normalised
    truth = [world.classnames[label] for label in labels]

    def classify(names: list[str], prompt: str) -> list[str]:
        text = encode_texts(model, tokenize, [prompt.format(n) for n in names])  # [C, D], normalised
        return [names[k] for k in (feats @ text.T).argmax(dim=1).tolist()]

    full = classify(world.classnames, "a photo of a {}.")
    shape = classify(list(SHAPES), "a photo of a {}.")
    colour = classify(list(COLOURS), "a photo of a {} shape.")
    rows = {}
    recalls = (recall_by_class(truth, full), recall_by_class(truth, shape, 1), recall_by_class(truth, colour, 0))
    for name in recalls[0]:
        misses = Counter(g for t, g in zip(truth, full) if t == name and g != name)
        rows[name] = {"full": recalls[0][name], "shape_only": recalls[1][name], "colour_only": recalls[2][name],
                      "most_common_miss": misses.most_common(1)[0][0] if misses else None}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run folder of the synthetic world or any checkpoint load_model reads")
    parser.add_argument("--per-class", type=int, default=60, help="images per held-out combination")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        print(f"error: --per-class: expected at least 1, got {args.per_class}", file=sys.stderr)
        return 2
    model, _ = resolve_model(args.model)
    rows = diagnose(model, args.per_class)
    print("| held-out combination | 64-way | shape-only prompts | colour-only prompts | most common miss |")
    print("|---|---:|---:|---:|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['full']:.0%} | {row['shape_only']:.0%} | {row['colour_only']:.0%} | "
              f"{row['most_common_miss'] or '–'} |")
    if args.output:
        atomic_write_text(args.output, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
