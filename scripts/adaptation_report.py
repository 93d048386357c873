"""The adaptation story: one model, one target with a few labelled images per class, six ways to adapt.

Starting from a model (e.g. the real-data model of docs/real-data.md), adapt it to Fashion-MNIST with `--shots`
labelled training images per class, and score every method on the target (Fashion-MNIST top-1 on `--target-split`,
`test` for the table, `val` for choosing settings) and on what the model knew before (`--before`, one column per
task: `synthetic`, `zeroshot:DATASET`, `retrieval:DATASET`; see `clipforge.adapt.forgetting`):

- zero-shot: the model as it is;
- linear probe: logistic regression on frozen features (C chosen on the validation split, `eval.linear_probe`);
- zero-shot-initialised head: `clipforge finetune-head`'s head, trained on the same shots (one per `--head-lr`);
- LoRA: `clipforge train --finetune.lora_rank=R` on the shots, captioned with the dataset's prompt templates;
- full fine-tuning: the same run with every weight trained (lower learning rate); `--full-bn frozen` keeps the
  start model's BatchNorm statistics (`--finetune.freeze_bn_stats=true`);
- WiSE-FT: `clipforge merge` of the start model and the fully fine-tuned one at alpha = 0.5.

Heads and probes leave the model untouched, so their "before" scores are the start model's. Every method sees the
same k-shot draw per seed; mean ± std over seeds. For the first seed the WiSE-FT alpha sweep is plotted against
the first `--before` task.

    python scripts/adaptation_report.py --model runs/real-data/model.safetensors --seeds 0 1 2 \
        --before zeroshot:openclipart retrieval:openclipart --output adaptation.json --figure wiseft-sweep.png
    # the heads only (no fine-tuning runs), several learning rates, scored on the validation split:
    python scripts/adaptation_report.py --model runs/real-data/model.safetensors --skip-finetune \
        --head-lr 0.001 0.01 0.1 --target-split val --output heads-val.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import clipforge
from clipforge.adapt.forgetting import BeforeTask, before_score, parse_before, summary_table
from clipforge.adapt.head import train_head, zeroshot_head
from clipforge.adapt.wiseft import interpolate, plot_sweep
from clipforge.checkpoint import atomic_write_text
from clipforge.config import ConfigError
from clipforge.data.catalog import get_dataset
from clipforge.eval.evaluators import EvalOptions, Session
from clipforge.eval.linear_probe import fit_logistic, sample_k_shot, select_C
from clipforge.eval.metrics import classification_metrics
from clipforge.eval.tasks import SourceOptions, subset_indices
from clipforge.eval.templates import load_templates
from clipforge.tokenizer import tokenizer_for

DATASET = "fashion-mnist"


def session(model: torch.nn.Module, args: argparse.Namespace, cache: bool = False) -> Session:
    """The target dataset seen by `model` (image features cached on disk for the start model only)."""
    opts = EvalOptions(source=SourceOptions(limit=args.limit, root=args.root),
                       cache_dir=args.cache if cache else None)
    return Session(model, tokenizer_for(model.config), None, DATASET, opts)


def target_score(model: torch.nn.Module, args: argparse.Namespace, cache: bool = False) -> float:
    ev = session(model, args, cache)
    data, features, labels = ev.labelled_features(args.target_split)
    return classification_metrics(features @ ev.classifier(data), labels)["acc1"]


def befores(model: torch.nn.Module, tasks: list[BeforeTask], args: argparse.Namespace) -> dict[str, float]:
    return {task.spec: before_score(model, task, args.root) for task in tasks}


def write_shots(indices: list[int], seed: int, folder: Path, args: argparse.Namespace) -> Path:
    """The k-shot training images as PNGs plus a manifest captioned with the dataset's templates."""
    raw = get_dataset(DATASET, "train", transform=None, root=args.root)
    keep = subset_indices(len(raw), args.limit) or list(range(len(raw)))  # the Session's train subset
    templates, rng = load_templates(DATASET), random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in indices:
        index = keep[i]
        name = f"{index}.png"
        raw.load_image(index).convert("RGB").save(folder / name)
        rows.append(f"{name}\t{rng.choice(templates).format(raw.classnames[raw.label(index)])}")
    manifest = folder / "manifest.tsv"
    manifest.write_text("image\tcaption\n" + "\n".join(rows) + "\n")
    return manifest


def finetune(manifest: Path, seed: int, name: str, extra: list[str], args: argparse.Namespace) -> Path:
    """One `clipforge train` run from the start model on the shots; the path of its final model."""
    argv = [sys.executable, "-m", "clipforge", "train", "--no-progress", f"--model={args.arch}",
            f"--finetune.init={args.model}", "--data.source=manifest", f"--data.path={manifest}", f"--seed={seed}",
            f"--steps={args.steps}", f"--batch_size={args.batch_size}", "--optim.warmup_steps=5",
            f"--output_dir={args.runs_dir}", f"--run_name={name}-seed{seed}", "--threads=1", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed}: {done.stderr[-2000:]}")
    return Path(args.runs_dir) / f"{name}-seed{seed}" / "model.safetensors"


def head_name(lr: float, args: argparse.Namespace) -> str:
    return "zero-shot-init head" if len(args.head_lr) == 1 else f"zero-shot-init head (lr {lr:g})"


def heads(model: torch.nn.Module, shots: torch.Tensor, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Linear probe and zero-shot-initialised heads (one per --head-lr) on the same k-shot features."""
    ev = session(model, args, cache=True)
    data, train_x, train_y = ev.labelled_features("train")
    _, val_x, val_y = ev.labelled_features("val")
    _, test_x, test_y = ev.labelled_features(args.target_split)
    x, y = train_x[shots], train_y[shots]
    classes = len(data.classnames)
    probe = fit_logistic(x, y, select_C((x, y), (val_x, val_y), classes).C, classes)
    start = zeroshot_head(ev.classifier(data), float(model.logit_scale.detach().exp()), data.classnames)
    out = {"linear probe": classification_metrics(probe.logits(test_x), test_y)["acc1"]}
    for lr in args.head_lr:
        head = train_head(start, x, y, epochs=args.head_epochs, lr=lr, seed=seed)
        out[head_name(lr, args)] = classification_metrics(head(test_x), test_y)["acc1"]
    return out


def one_seed(seed: int, args: argparse.Namespace, base: torch.nn.Module, base_before: dict[str, float]
             ) -> dict[str, Any]:
    _, _, train_y = session(base, args, cache=True).labelled_features("train")
    shots = sample_k_shot(train_y, args.shots, torch.Generator().manual_seed(seed))
    target = {"zero-shot": target_score(base, args, cache=True), **heads(base, shots, seed, args)}
    before = {spec: {name: score for name in target} for spec, score in base_before.items()}  # model unchanged
    out: dict[str, Any] = {"seed": seed, "target": target, "before": before}
    if args.skip_finetune:
        return out
    manifest = write_shots(shots.tolist(), seed, Path(args.runs_dir) / f"shots-seed{seed}", args)
    adapted: dict[str, torch.nn.Module] = {}
    if not args.skip_lora:
        adapted["LoRA"] = clipforge.load_model(finetune(manifest, seed, "lora", [
            f"--finetune.lora_rank={args.lora_rank}", f"--optim.lr={args.lora_lr}"], args))
    frozen = args.full_bn == "frozen"
    full = clipforge.load_model(finetune(manifest, seed, "full-frozen-bn" if frozen else "full", [
        f"--optim.lr={args.full_lr}", f"--finetune.freeze_bn_stats={str(frozen).lower()}"], args))
    suffix = ", BatchNorm statistics frozen" if frozen else ""
    adapted[f"full fine-tuning{suffix}"] = full
    adapted[f"WiSE-FT (α=0.5){suffix}"] = interpolate(base, full, 0.5)
    for name, model in adapted.items():
        target[name] = target_score(model, args)
        for spec, score in befores(model, args.before_tasks, args).items():
            before[spec][name] = score
    if seed == args.seeds[0] and args.figure:
        out["sweep"] = sweep(base, full, args)
    return out


def sweep(base: torch.nn.Module, full: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, float]]:
    """Target and the first "before" task along (1 - α)·start + α·fine-tuned; plotted to --figure."""
    task = args.before_tasks[0]
    points = []
    for alpha in args.alphas:
        model = interpolate(base, full, alpha)
        points.append({"alpha": alpha, "target": target_score(model, args), "before": before_score(model, task,
                                                                                                   args.root)})
    plot_sweep(args.figure, points, "before", "target", f"{task.label}, test (what it knew)",
               f"zero-shot top-1, {DATASET} {args.target_split} (the target)",
               f"WiSE-FT: start model (α=0) to fully fine-tuned (α=1), {args.shots} shots/class, seed {args.seeds[0]}")
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the start model (.safetensors)")
    parser.add_argument("--arch", default="RN-Tiny-64", help="its architecture name, for the fine-tuning runs")
    parser.add_argument("--root", help="data root holding the prepared datasets (default: clipforge's)")
    parser.add_argument("--before", nargs="+", default=["synthetic"],
                        help="what the model knew: synthetic, zeroshot:DATASET, retrieval:DATASET (one column each)")
    parser.add_argument("--target-split", default="test", choices=["test", "val"],
                        help="where the target is scored: test for the table, val for choosing settings")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=1000, help="target images per split (a fixed random subset)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--head-epochs", type=int, default=100)
    parser.add_argument("--head-lr", type=float, nargs="+", default=[1e-3], help="one head per learning rate")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--full-bn", default="train", choices=["train", "frozen"],
                        help="full fine-tuning: BatchNorm statistics follow the shots (train) or stay the start "
                             "model's (frozen, --finetune.freeze_bn_stats)")
    parser.add_argument("--skip-finetune", action="store_true", help="zero-shot, probe and heads only")
    parser.add_argument("--skip-lora", action="store_true", help="no LoRA runs")
    parser.add_argument("--runs-dir", default="runs/adaptation")
    parser.add_argument("--cache", default=None, help="image features cache folder for the start model")
    parser.add_argument("--output", default="adaptation.json")
    parser.add_argument("--figure", default=None, help="PNG of the WiSE-FT sweep (first seed)")
    args = parser.parse_args(argv)
    try:
        args.before_tasks = [parse_before(spec) for spec in args.before]
    except ConfigError as err:
        parser.error(str(err))
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    base = clipforge.load_model(args.model)
    base_before = befores(base, args.before_tasks, args)
    labels = {t.spec: t.label for t in args.before_tasks}
    results: list[dict[str, Any]] = []
    settings = {k: v for k, v in vars(args).items() if k != "before_tasks"}
    for seed in args.seeds:
        results.append(one_seed(seed, args, base, base_before))
        record = {"args": settings, "before_labels": labels, "seeds": results,
                  "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_text(args.output, json.dumps(record, indent=1))
        print(f"seed {seed}: {results[-1]['target']} {results[-1]['before']}", flush=True)
    print(summary_table(results, f"{DATASET} {args.target_split} top-1", labels))


if __name__ == "__main__":
    main()
