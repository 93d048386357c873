"""The embedded synthetic world's class names (with articles, and in synonyms) and the demo's headline metrics."""

from __future__ import annotations

import json
from typing import Any


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


def headline(zeroshot: dict[str, Any], retrieval: dict[str, Any]) -> dict[str, float]:
    """The demo's and the study's flat metrics (fractions in [0, 1]) from the results of the synthetic world's
    `zeroshot` and `retrieval` evaluators: zero-shot over all 64 classes on the seen and the held-out
    combinations' images (template ensemble, single template, synonyms when measured), retrieval both ways."""
    out: dict[str, float] = {}
    for split in ("seen", "heldout"):
        ens, one = zeroshot["subsets"][split], zeroshot["single_template"]["subsets"][split]
        out[f"zeroshot_{split}_top1"] = ens["acc1"]
        out[f"zeroshot_{split}_top5"] = ens["acc5"]
        out[f"zeroshot_{split}_mean_per_class_recall"] = ens["mean_per_class_recall"]
        out[f"zeroshot_{split}_margin"] = ens["mean_margin"]  # right class's cosine minus the best wrong one
        out[f"zeroshot_{split}_top1_single_template"] = one["acc1"]
        out[f"zeroshot_{split}_top5_single_template"] = one["acc5"]
        if "synonyms" in zeroshot:
            out[f"zeroshot_{split}_top1_synonyms"] = zeroshot["synonyms"]["subsets"][split]["acc1"]
    for k in (1, 5, 10):
        out[f"retrieval_i2t_r{k}"] = retrieval[f"text_retrieval_recall@{k}"]
        out[f"retrieval_t2i_r{k}"] = retrieval[f"image_retrieval_recall@{k}"]
    return out
