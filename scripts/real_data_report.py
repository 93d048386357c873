"""Evaluate CLIP models on the real offline datasets and write the comparison table of docs/real-data.md.

For every model given (a run directory, a checkpoint, or an architecture name for the random-init floor) it
runs, through the same code as `clipforge eval`:

- retrieval (image->text and text->image R@1/5/10) on the test split of openclipart, tuxpaint and emoji;
- zero-shot classification (ensemble and single template) over their category labels and Fashion-MNIST's
  10 classes;
- the linear probe on Fashion-MNIST features (the CLIP paper's protocol; `--probe-limit` training images).

It writes every task's results JSON to OUT/<model label>/, a Markdown table to OUT/results.md, and, for the
first model, the figures: Fashion-MNIST per-class zero-shot bars, recall@k curves on openclipart, and the
Fashion-MNIST zero-shot vs k-shot probe curve.

    python scripts/real_data_report.py --model real=runs/real-data --model synthetic=runs/demo \
        --model random=RN-Tiny-64 --output docs/real-data-results --figures docs/figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from clipforge.eval.runner import EvalOptions, default_cache_dir, finite_or_none, run_eval
from clipforge.eval.tasks import SourceOptions

CAPTIONED = ("openclipart", "tuxpaint", "emoji")
LABELLED = ("openclipart", "tuxpaint", "emoji", "fashion-mnist")
SHOTS = (1, 2, 4, 8, 16)


def evaluate(label: str, spec: str, out: Path, figures: Path | None, probe_limit: int) -> dict[str, Any]:
    """All tasks for one model; returns {task/dataset: metrics}, each task's JSON written under out/label."""
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}

    def run(task: str, dataset: str, name: str, figure: str | None = None, **kwargs: Any) -> dict[str, Any]:
        source = SourceOptions(limit=probe_limit if task == "linear-probe" else None)
        opts = EvalOptions(source=source, cache_dir=str(default_cache_dir()),
                           plot=str(figures / figure) if figures and figure else None, **kwargs)
        start = time.perf_counter()
        result = finite_or_none(run_eval(task, spec, dataset, opts))
        print(f"  {label} {name}: {time.perf_counter() - start:.0f} s", flush=True)
        (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows[name] = result
        return result

    for dataset in CAPTIONED:
        run("retrieval", dataset, f"retrieval-{dataset}",
            figure="real-data-recall-openclipart.png" if dataset == "openclipart" else None)
    for dataset in LABELLED:
        run("zeroshot", dataset, f"zeroshot-{dataset}",
            figure="real-data-zeroshot-fashion-mnist.png" if dataset == "fashion-mnist" else None)
    run("linear-probe", "fashion-mnist", "linear-probe-fashion-mnist",
        figure="real-data-kshot-fashion-mnist.png" if figures else None, shots=SHOTS if figures else ())
    return rows


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def table(results: dict[str, dict[str, Any]], specs: dict[str, str]) -> str:
    """Markdown: one row per metric, one column per model, and the chance level of each metric (a uniformly
    random ranking: R@k ≈ k / images both ways, since an image has captions/images captions on average)."""
    labels = list(results)
    first = results[labels[0]]
    lines = ["| metric (%) | " + " | ".join(f"{label} (`{specs[label]}`)" for label in labels) + " | chance |",
             "|---|" + "---:|" * (len(labels) + 1)]

    def row(name: str, key: str, pick: Any, chance: float) -> None:
        values = [_pct(pick(results[label][key])) for label in labels]
        lines.append(f"| {name} | " + " | ".join(values) + f" | {_pct(chance)} |")

    for d in CAPTIONED:
        r = first[f"retrieval-{d}"]
        n_img, n_txt = r["images"], r["captions"]
        for k in (1, 5):
            row(f"{d} retrieval image→text R@{k} ({n_img} test images)", f"retrieval-{d}",
                lambda x, k=k: x[f"text_retrieval_recall@{k}"], min(1.0, k / n_img))  # ~k·(T/I)/T
            row(f"{d} retrieval text→image R@{k} ({n_txt} test captions)", f"retrieval-{d}",
                lambda x, k=k: x[f"image_retrieval_recall@{k}"], min(1.0, k / n_img))
    for d in LABELLED:
        z = first[f"zeroshot-{d}"]
        classes = z["classes"]
        row(f"{d} zero-shot mean per-class recall ({classes} classes, {z['images']} images)", f"zeroshot-{d}",
            lambda x: x["mean_per_class_recall"], 1 / classes)
        row(f"{d} zero-shot top-1", f"zeroshot-{d}", lambda x: x["acc1"], float("nan"))
    p = first["linear-probe-fashion-mnist"]
    row(f"Fashion-MNIST linear probe top-1 ({p['train_images']} train, {p['test_images']} test images)",
        "linear-probe-fashion-mnist", lambda x: x["acc1"], 1 / p["classes"])
    return "\n".join(lines).replace("| nan |", "| — |") + "\n"


def load_results(out: Path, labels: list[str]) -> dict[str, dict[str, Any]]:
    """The task JSONs a previous run wrote under out/<label>/ (for --report-only)."""
    results = {}
    for label in labels:
        folder = out / label
        if not folder.is_dir():
            raise SystemExit(f"--report-only: {folder} does not exist; run the evaluation first")
        results[label] = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=SPEC",
                        help="a model to evaluate: LABEL=run directory, checkpoint or architecture name")
    parser.add_argument("--output", required=True, help="folder for the results JSONs and results.md")
    parser.add_argument("--figures", help="folder for the first model's figures")
    parser.add_argument("--report-only", action="store_true", help="rebuild results.md from the stored JSONs")
    parser.add_argument("--probe-limit", type=int, default=10000,
                        help="Fashion-MNIST images per split for the linear probe (default: 10000)")
    args = parser.parse_args(argv)
    specs: dict[str, str] = {}
    for item in args.model:
        label, sep, spec = item.partition("=")
        if not sep or not label or not spec:
            parser.error(f"--model {item!r}: expected LABEL=SPEC, e.g. real=runs/real-data")
        specs[label] = spec
    out = Path(args.output)
    figures = Path(args.figures) if args.figures else None
    if figures:
        figures.mkdir(parents=True, exist_ok=True)
    results = load_results(out, list(specs)) if args.report_only else {}
    for index, (label, spec) in enumerate(specs.items() if not args.report_only else ()):
        start = time.perf_counter()
        results[label] = evaluate(label, spec, out, figures if index == 0 else None, args.probe_limit)
        print(f"{label}: all tasks in {time.perf_counter() - start:.0f} s", flush=True)
    (out / "results.md").write_text(table(results, specs))
    print(table(results, specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
