"""The adaptation story: one model, one target with a few labelled images per class, six ways to adapt.

Starting from a model (e.g. the demo model, trained on the embedded synthetic world), adapt it to Fashion-MNIST
with `--shots` labelled training images per class, and score every method on the target (Fashion-MNIST test
accuracy) and on what the model knew before (zero-shot top-1 over the synthetic world's 64 classes):

- zero-shot: the model as it is;
- linear probe: logistic regression on frozen features (C chosen on the validation split, `eval.linear_probe`);
- zero-shot-initialised head: `clipforge finetune-head`'s head, trained on the same shots;
- LoRA: `clipforge train --finetune.lora_rank=R` on the shots, captioned with the dataset's prompt templates;
- full fine-tuning: the same run with every weight trained (lower learning rate);
- WiSE-FT: `clipforge merge` of the start model and the fully fine-tuned one at alpha = 0.5.

Heads and probes leave the model untouched, so their "before" score is the start model's. Every method sees the
same k-shot draw per seed; mean ± std over seeds. For the first seed the WiSE-FT alpha sweep is plotted.

    python scripts/adaptation_report.py --model runs/demo/model.safetensors --root DATA_ROOT --seeds 0 1 2 \
        --output docs/adaptation.json --figure docs/figures/wiseft-sweep.png
    # the heads at several learning rates, without the fine-tuning runs:
    python scripts/adaptation_report.py --model runs/demo/model.safetensors --root DATA_ROOT --skip-finetune \
        --head-lr 0.001 0.01 --output docs/adaptation-heads.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import clipforge
from clipforge.adapt.head import train_head, zeroshot_head
from clipforge.adapt.wiseft import interpolate, plot_sweep
from clipforge.checkpoint import save_model
from clipforge.data.catalog import get_dataset
from clipforge.eval.linear_probe import fit_logistic, sample_k_shot, select_C
from clipforge.eval.metrics import classification_metrics
from clipforge.eval.runner import EvalOptions, Evaluator
from clipforge.eval.evaluators import synthetic_headline
from clipforge.eval.tasks import SourceOptions, subset_indices
from clipforge.eval.templates import load_templates
from clipforge.tokenizer import tokenizer_for

DATASET = "fashion-mnist"


def before_score(model: torch.nn.Module) -> float:
    """Zero-shot top-1 over the synthetic world's 64 classes (seen words): what the model knew."""
    return synthetic_headline(model, tokenizer_for(model.config), pairs=10)["zeroshot_seen_top1"]


def target_score(model: torch.nn.Module, args: argparse.Namespace) -> float:
    ev = Evaluator(model, "model", None, DATASET, _eval_opts(args))
    data, features, labels = ev.labelled_features("test")
    return classification_metrics(features @ ev.classifier(data), labels)["acc1"]


def _eval_opts(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(source=SourceOptions(limit=args.limit, root=args.root), cache_dir=args.cache)


def write_shots(indices: list[int], seed: int, folder: Path, args: argparse.Namespace) -> Path:
    """The k-shot training images as PNGs plus a manifest captioned with the dataset's templates."""
    raw = get_dataset(DATASET, "train", transform=None, root=args.root)
    keep = subset_indices(len(raw), args.limit) or list(range(len(raw)))  # the Evaluator's train subset
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


def finetune(start: str, manifest: Path, seed: int, name: str, extra: list[str], args: argparse.Namespace) -> Path:
    argv = [sys.executable, "-m", "clipforge", "train", "--no-progress", f"--model={args.arch}",
            f"--finetune.init={start}", "--data.source=manifest", f"--data.path={manifest}", f"--seed={seed}",
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
    ev = Evaluator(model, "model", None, DATASET, _eval_opts(args))
    data, train_x, train_y = ev.labelled_features("train")
    _, val_x, val_y = ev.labelled_features("val")
    _, test_x, test_y = ev.labelled_features("test")
    x, y = train_x[shots], train_y[shots]
    classes = len(data.classnames)
    probe = fit_logistic(x, y, select_C((x, y), (val_x, val_y), classes).C, classes)
    start = zeroshot_head(ev.classifier(data), float(model.logit_scale.detach().exp()), data.classnames)
    out = {"linear probe": classification_metrics(probe.logits(test_x), test_y)["acc1"]}
    for lr in args.head_lr:
        head = train_head(start, x, y, epochs=args.head_epochs, lr=lr, seed=seed)
        out[head_name(lr, args)] = classification_metrics(head(test_x), test_y)["acc1"]
    return out


def one_seed(seed: int, args: argparse.Namespace, base: torch.nn.Module, base_before: float) -> dict[str, Any]:
    ev = Evaluator(base, "model", None, DATASET, _eval_opts(args))
    _, _, train_y = ev.labelled_features("train")
    shots = sample_k_shot(train_y, args.shots, torch.Generator().manual_seed(seed))
    target = {"zero-shot": target_score(base, args), **heads(base, shots, seed, args)}
    before = {name: base_before for name in target}  # the model itself is unchanged
    if args.skip_finetune:
        return {"target": target, "before": before}
    manifest = write_shots(shots.tolist(), seed, Path(args.runs_dir) / f"shots-seed{seed}", args)
    lora = clipforge.load_model(finetune(args.model, manifest, seed, "lora", [
        f"--finetune.lora_rank={args.lora_rank}", f"--optim.lr={args.lora_lr}"], args))
    full = clipforge.load_model(finetune(args.model, manifest, seed, "full", [f"--optim.lr={args.full_lr}"], args))
    for name, model in (("LoRA", lora), ("full fine-tuning", full), ("WiSE-FT (α=0.5)", interpolate(base, full, 0.5))):
        target[name], before[name] = target_score(model, args), before_score(model)
    out: dict[str, Any] = {"target": target, "before": before}
    if seed == args.seeds[0] and args.figure:
        out["sweep"] = sweep(base, full, args)
    return out


def sweep(base: torch.nn.Module, full: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, float]]:
    points = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        model = interpolate(base, full, alpha)
        points.append({"alpha": alpha, "target": target_score(model, args), "before": before_score(model)})
    plot_sweep(args.figure, points, "before", "target", "zero-shot top-1, synthetic world (what it knew)",
               f"zero-shot top-1, {DATASET} test (the target)",
               f"WiSE-FT: start model (α=0) to fully fine-tuned (α=1), {args.shots} shots/class")
    return points


def table(seeds: list[dict[str, Any]]) -> str:
    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"

    lines = ["| method | target: Fashion-MNIST top-1 (%) | before: synthetic zero-shot top-1 (%) |",
             "|---|---|---|"]
    for method in seeds[0]["target"]:
        lines.append(f"| {method} | {cell([s['target'][method] for s in seeds])} | "
                     f"{cell([s['before'][method] for s in seeds])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the start model (.safetensors)")
    parser.add_argument("--arch", default="RN-Tiny-64", help="its architecture name, for the fine-tuning runs")
    parser.add_argument("--root", help="data root holding the prepared fashion-mnist")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=2000, help="images per split (a fixed random subset)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--head-epochs", type=int, default=100)
    parser.add_argument("--head-lr", type=float, nargs="+", default=[1e-3], help="one head per learning rate")
    parser.add_argument("--skip-finetune", action="store_true", help="zero-shot, probe and heads only")
    parser.add_argument("--runs-dir", default="runs/adaptation")
    parser.add_argument("--cache", default=None, help="image features cache folder (default: none)")
    parser.add_argument("--output", default="adaptation.json")
    parser.add_argument("--figure", default=None, help="PNG of the WiSE-FT sweep (first seed)")
    args = parser.parse_args()
    base = clipforge.load_model(args.model)
    save_model(base, Path(args.runs_dir) / "start.safetensors")
    base_before = before_score(base)
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args, base, base_before))
        Path(args.output).write_text(json.dumps({"args": vars(args), "seeds": results}, indent=1))
        print(f"seed {seed}: {results[-1]['target']}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
