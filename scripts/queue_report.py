"""What a negative queue buys: batch B vs batch B + queue K (with and without a momentum encoder) vs a larger batch,
same number of steps, on the embedded synthetic world or on real data; mean ± std over seeds.

The arms (`--variants`): `batch` (B), `queue` (B + queue K), `momentum` (B + queue K filled by a momentum encoder,
0.99), `batch4x` (4B), `accum` (batch K by exact accumulation, `--batch_size=K --accum_chunk=C`: as many
negatives per step as the queue, all of them current and all carrying gradient, at K / B times the compute).
`--train-arg` passes further options to every run (a smaller model or image size for the `accum` arm).

Each run is `clipforge train` in its own process (so its peak memory is its own, read from wait4's rusage);
then the final model is scored with the demo's evaluation (zero-shot top-1 over the 64 classes, image->text
and text->image R@1 over 1,000 pairs), or with `--score SPEC...` on prepared datasets' test splits
(`zeroshot:DATASET`: top-1 and class-balanced recall; `retrieval:DATASET`: R@1 both ways). Time per step
is the run's training time over its steps.

    python scripts/queue_report.py --steps 200 --seeds 0 1 2 --output docs/queue-results.json
    # scaled down so that batch K by accumulation fits a CPU: B = 8, K = 1024, ViT-Micro at 32 px
    python scripts/queue_report.py --steps 128 --batch 8 --queue 1024 --accum-chunk 128 \
        --variants batch queue momentum accum --train-arg=--model=ViT-Micro-8-32 \
        --train-arg=--data.synthetic.image_size=32
    # the real-data recipe (configs/real-data.yaml: openclipart + Tux Paint + emoji), scored on their test splits
    python scripts/queue_report.py --steps 200 --variants batch queue momentum accum \
        --train-arg=--config=configs/real-data.yaml --train-arg=--model=ViT-Micro-8-32 \
        --score zeroshot:openclipart retrieval:openclipart zeroshot:emoji
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from clipforge.checkpoint import atomic_write_text
from clipforge.study.stats import mean_std

ARMS = ("batch", "queue", "momentum", "batch4x", "accum")


def variants(arms: list[str], batch: int, queue: int, chunk: int) -> dict[str, list[str]]:
    """Each arm's display name and its `clipforge train` options."""
    every = {
        "batch": (f"batch {batch}", [f"--batch_size={batch}"]),
        "queue": (f"batch {batch} + queue {queue}", [f"--batch_size={batch}", f"--loss.queue_size={queue}"]),
        "momentum": (f"batch {batch} + queue {queue}, momentum 0.99",
                     [f"--batch_size={batch}", f"--loss.queue_size={queue}", "--loss.queue_momentum=0.99"]),
        "batch4x": (f"batch {4 * batch}", [f"--batch_size={4 * batch}"]),
        "accum": (f"batch {queue} by accumulation (chunk {chunk})", [f"--batch_size={queue}", f"--accum_chunk={chunk}"]),
    }
    return dict(every[arm] for arm in arms)


def run_one(name: str, args: list[str], seed: int, steps: int, out: Path, score: list[str]) -> dict[str, float]:
    run_name = f"{name.replace(' ', '_').replace(',', '').replace('+', 'plus').replace('(', '').replace(')', '')}"
    run_name = f"{run_name}-seed{seed}"
    argv = [sys.executable, "-m", "clipforge", "train", "--no-progress", f"--steps={steps}", f"--seed={seed}",
            f"--output_dir={out}", f"--run_name={run_name}", "--threads=1", "--optim.warmup_steps=20", *args]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed: {child.stderr.read()[-2000:] if child.stderr else ''}")
    log = [json.loads(line) for line in (out / run_name / "log.jsonl").read_text().splitlines()]
    last = [e for e in log if "elapsed_s" in e][-1]
    metrics = evaluate(out / run_name, score)
    return {**metrics, "s_per_step": last["elapsed_s"] / steps, "peak_rss_mib": usage.ru_maxrss / 1024}


def evaluate(run_dir: Path, score: list[str]) -> dict[str, float]:
    import clipforge  # noqa: PLC0415
    from clipforge.eval.evaluators import synthetic_headline  # noqa: PLC0415
    from clipforge.tokenizer import tokenizer_for  # noqa: PLC0415

    model = clipforge.load_model(run_dir / "model.safetensors")
    tokenizer = tokenizer_for(model.config)  # the model's own context length
    if score:
        return {key: value for spec in score for key, value in score_on_dataset(model, tokenizer, spec).items()}
    metrics = synthetic_headline(model, tokenizer, run_dir=run_dir)  # the run's own world (its image size)
    keep = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "retrieval_t2i_r1")
    return {k: metrics[k] for k in keep}


def score_on_dataset(model: Any, tokenizer: Any, spec: str) -> dict[str, float]:
    """`zeroshot:D`: top-1 and mean per-class recall (class-balanced: a model that names one class for every
    image scores 1/C, whatever that class's share of the test split); `retrieval:D`: R@1 both ways."""
    from clipforge.adapt.forgetting import parse_before  # noqa: PLC0415
    from clipforge.eval.evaluators import EvalOptions, Evaluator  # noqa: PLC0415

    task = parse_before(spec)
    metrics = Evaluator(task.kind, task.dataset, EvalOptions(split="test")).run(model, tokenizer)
    if task.kind == "zeroshot":
        return {f"{spec} top1": float(metrics["acc1"]), f"{spec} balanced": float(metrics["mean_per_class_recall"])}
    return {f"{spec} i2t_r1": float(metrics["text_retrieval_recall@1"]),
            f"{spec} t2i_r1": float(metrics["image_retrieval_recall@1"])}


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    keys = list(next(iter(results.values()))[0])
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for key in keys:
            stats = mean_std([r[key] for r in runs])
            cells.append(f"{stats['mean']:.3f} ± {stats['std']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32, help="B: the small batch")
    parser.add_argument("--queue", type=int, default=4096, help="K: queue size, and the accumulated batch")
    parser.add_argument("--accum-chunk", type=int, default=128, help="pairs embedded at a time in the accum arm")
    parser.add_argument("--variants", nargs="+", default=["batch", "queue", "momentum", "batch4x"], choices=ARMS)
    parser.add_argument("--train-arg", action="append", default=[], help="an option for every run (repeatable)")
    parser.add_argument("--score", nargs="+", default=[], metavar="SPEC",
                        help="score on prepared datasets instead of the synthetic world: zeroshot:D, retrieval:D")
    parser.add_argument("--runs-dir", default="runs/queue-report")
    parser.add_argument("--output", default="queue-results.json")
    args = parser.parse_args()
    for spec in args.score:  # a bad spec stops here, in one line, before any training
        kind, _, dataset = spec.partition(":")
        if kind not in ("zeroshot", "retrieval") or not dataset:
            raise SystemExit(f"error: --score {spec!r}: expected 'zeroshot:DATASET' or 'retrieval:DATASET'")
    out = Path(args.runs_dir)
    arms = variants(args.variants, args.batch, args.queue, args.accum_chunk)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for name, options in arms.items():
            results.setdefault(name, []).append(run_one(name, [*options, *args.train_arg], seed, args.steps, out,
                                                                args.score))
            print(name, seed, results[name][-1], flush=True)
            record = {"steps": args.steps, "seeds": args.seeds, "train_args": args.train_arg, "score": args.score,
                      "runs": results}
            atomic_write_text(args.output, json.dumps(record, indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
