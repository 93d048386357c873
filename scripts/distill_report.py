"""Distillation on real data: a student trained alone vs the same student with `loss.distill`, same steps and
data, over several seeds, scored on real test splits; mean ± std over seeds and paired differences by seed.

For every seed and variant it runs, through the command line a user would type,

- `clipforge train --config CONFIG --seed=S --run_name=VARIANT-seedS` (plus `--loss.distill.teacher=T
  --loss.distill.weight=W` for a distilled variant), then
- `clipforge eval retrieval|zeroshot --dataset openclipart|emoji --split test --output ...` on the run,

and writes one record per cell to OUT/cells/ (atomically, as each finishes). Cells with a record are skipped,
so the command resumes, and seeds can be shared between processes (`--seeds 0` and `--seeds 1 2` at once,
then `--report-only` with all seeds). The teacher is scored on the same splits. OUT/results.json and
OUT/results.md hold the table: per metric, the teacher, each variant's mean ± std over seeds, and each distilled
variant minus the student alone, paired by seed (mean ± std of the per-seed differences).

    python scripts/distill_report.py --teacher runs/real-data/model.safetensors --output runs/distill-real
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from clipforge.checkpoint import atomic_write_text

BASELINE = "student"
TASKS = (("retrieval", "openclipart"), ("zeroshot", "openclipart"), ("retrieval", "emoji"), ("zeroshot", "emoji"))
# (row label, task JSON, key in it); retrieval's "text_retrieval" finds captions for an image (image→text)
METRICS = tuple(
    (f"{dataset} {label}", f"{task}-{dataset}", key)
    for dataset in ("openclipart", "emoji")
    for label, task, key in (
        ("image→text R@1", "retrieval", "text_retrieval_recall@1"),
        ("text→image R@1", "retrieval", "image_retrieval_recall@1"),
        ("image→text R@5", "retrieval", "text_retrieval_recall@5"),
        ("text→image R@5", "retrieval", "image_retrieval_recall@5"),
        ("zero-shot top-1", "zeroshot", "acc1"),
        ("zero-shot mean per-class recall", "zeroshot", "mean_per_class_recall"),
    )
)


def variant_name(weight: float) -> str:
    return f"distill-w{weight:g}"


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std" (sample, n - 1; NaN for one value), "n"}."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "n": len(values)}


def paired_differences(records: dict[str, dict[int, dict[str, float]]], variant: str, metric: str) -> dict[int, float]:
    """{seed: variant's metric - the baseline's} over the seeds where both were measured."""
    base, other = records.get(BASELINE, {}), records.get(variant, {})
    return {seed: other[seed][metric] - base[seed][metric] for seed in sorted(set(base) & set(other))}


def summarise(records: dict[str, dict[int, dict[str, float]]], teacher: dict[str, float] | None) -> dict[str, Any]:
    """records: {variant: {seed: {metric: value}}} -> per metric: teacher, each variant's mean ± std, and each
    non-baseline variant's paired difference to the baseline (per seed and mean ± std)."""
    summary: dict[str, Any] = {}
    for label, _, _ in METRICS:
        row: dict[str, Any] = {"teacher": None if teacher is None else teacher[label], "variants": {}, "paired": {}}
        for variant, by_seed in records.items():
            if by_seed:
                row["variants"][variant] = mean_std([by_seed[s][label] for s in sorted(by_seed)])
            if variant != BASELINE:
                diffs = paired_differences(records, variant, label)
                if diffs:
                    row["paired"][variant] = {"per_seed": diffs, **mean_std(list(diffs.values()))}
        summary[label] = row
    return summary


def _points(stat: dict[str, float] | None, signed: bool = False) -> str:
    if stat is None:
        return "—"
    sign = "+" if signed else ""
    spread = "" if math.isnan(stat["std"]) else f" ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:{sign}.1f}{spread}"


def markdown(summary: dict[str, Any], variants: Sequence[str]) -> str:
    """One row per metric (%): teacher, each variant's mean ± std, each distilled variant minus the student."""
    distilled = [v for v in variants if v != BASELINE]
    first = next(iter(summary.values()))
    counts = {v: first["variants"].get(v, {}).get("n", 0) for v in variants}
    head = ["metric (%)", "teacher", *(f"{v} (n={counts[v]})" for v in variants),
            *(f"{v} − {BASELINE}, paired" for v in distilled)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, row in summary.items():
        teacher = "—" if row["teacher"] is None else f"{100 * row['teacher']:.1f}"
        cells = [label, teacher, *(_points(row["variants"].get(v)) for v in variants),
                 *(_points(row["paired"].get(v), signed=True) for v in distilled)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_of(folder: Path) -> dict[str, float]:
    """The METRICS read from the task JSONs `clipforge eval --output` wrote into folder."""
    tasks = {name: json.loads((folder / f"{name}.json").read_text()) for name in {t for _, t, _ in METRICS}}
    return {label: float(tasks[task][key]) for label, task, key in METRICS}


def run(command: list[str], log: Path) -> float:
    """Run a clipforge command with its output appended to log; seconds taken, or SystemExit on failure."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(command[:4])}... failed with status {code}; see {log}")
    return time.perf_counter() - start


def evaluate(model: Path, folder: Path, threads: int, log: Path) -> float:
    """Every (task, dataset) of TASKS on the test split, one JSON each in folder; returns seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for task, dataset in TASKS:
        seconds += run([sys.executable, "-m", "clipforge", "eval", task, "--model", str(model), "--dataset", dataset,
                        "--split", "test", "--no-cache", f"--threads={threads}",
                        "--output", str(folder / f"{task}-{dataset}.json")], log)
    return seconds


def run_cell(args: argparse.Namespace, variant: str, seed: int, weight: float | None) -> None:
    """Train one student and score it; the record lands in OUT/cells/<variant>-seed<seed>.json."""
    out = Path(args.output)
    name = f"{variant}-seed{seed}"
    record_path = out / "cells" / f"{name}.json"
    if record_path.is_file():
        return
    log = out / "logs" / f"{name}.log"
    command = [sys.executable, "-m", "clipforge", "train", "--config", args.config, f"--seed={seed}",
               f"--output_dir={out / 'runs'}", f"--run_name={name}", f"--threads={args.threads}",
               "--resume=auto", *(f"--{item}" for item in args.set)]
    if weight is not None:
        command += [f"--loss.distill.teacher={args.teacher}", f"--loss.distill.weight={weight:g}"]
    print(f"{name}: training", flush=True)
    train_seconds = run(command, log)
    eval_seconds = evaluate(out / "runs" / name, out / "eval" / name, args.threads, log)
    record = {"variant": variant, "seed": seed, "distill_weight": weight, "train_seconds": round(train_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "command": command,
              "metrics": metrics_of(out / "eval" / name)}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    print(f"{name}: trained in {train_seconds:.0f} s, evaluated in {eval_seconds:.0f} s", flush=True)


def load_records(out: Path, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, dict[str, float]]]:
    records: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for variant in variants:
        for seed in seeds:
            path = out / "cells" / f"{variant}-seed{seed}.json"
            if path.is_file():
                records[variant][seed] = json.loads(path.read_text())["metrics"]
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint (any format load_model reads)")
    parser.add_argument("--output", required=True, help="folder for runs, evaluation JSONs, records and results")
    parser.add_argument("--config", default="configs/distill-real.yaml", help="the student's training config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0], help="loss.distill.weight values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override for every cell, e.g. --set steps=300")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the stored records")
    args = parser.parse_args(argv)
    if not Path(args.teacher).exists():
        parser.error(f"--teacher {args.teacher}: no such file or folder")
    bad = [w for w in args.weights if not (math.isfinite(w) and w > 0)]
    if bad:
        parser.error(f"--weights {bad[0]}: expected a positive number")
    out = Path(args.output)
    variants = [BASELINE, *(variant_name(w) for w in args.weights)]
    if not args.report_only:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            run_cell(args, BASELINE, seed, None)
            for weight in args.weights:
                run_cell(args, variant_name(weight), seed, weight)
        if not (out / "eval" / "teacher" / "zeroshot-emoji.json").is_file():
            evaluate(Path(args.teacher), out / "eval" / "teacher", args.threads, out / "logs" / "teacher.log")
    teacher_folder = out / "eval" / "teacher"
    teacher = metrics_of(teacher_folder) if (teacher_folder / "zeroshot-emoji.json").is_file() else None
    summary = summarise(load_records(out, variants, args.seeds), teacher)
    atomic_write_text(out / "results.json", json.dumps({"teacher": args.teacher, "seeds": args.seeds,
                                                         "variants": variants, "metrics": summary}, indent=2) + "\n")
    table = markdown(summary, variants)
    atomic_write_text(out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
