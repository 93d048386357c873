"""What a negative queue buys: batch B vs batch B + queue K (with and without a momentum encoder) vs a larger batch,
same number of steps, on the embedded synthetic world; mean ± std over seeds.

Each run is `clipforge train` in its own process (so its peak memory is its own, read from wait4's rusage);
then the final model is scored with the demo's evaluation (zero-shot top-1 over the 64 classes, image->text
and text->image R@1 over 1,000 pairs). Time per step is the run's training time over its steps.

    python scripts/queue_report.py --steps 200 --seeds 0 1 2 --output docs/queue-results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "batch 32": ["--batch_size=32"],
    "batch 32 + queue 4096": ["--batch_size=32", "--loss.queue_size=4096"],
    "batch 32 + queue 4096, momentum 0.99": ["--batch_size=32", "--loss.queue_size=4096",
                                             "--loss.queue_momentum=0.99"],
    "batch 128": ["--batch_size=128"],
}


def run_one(name: str, args: list[str], seed: int, steps: int, out: Path) -> dict[str, float]:
    run_name = f"{name.replace(' ', '_').replace(',', '').replace('+', 'plus')}-seed{seed}"
    argv = [sys.executable, "-m", "clipforge", "train", "--no-progress", f"--steps={steps}", f"--seed={seed}",
            f"--output_dir={out}", f"--run_name={run_name}", "--threads=1", "--optim.warmup_steps=20", *args]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed: {child.stderr.read()[-2000:] if child.stderr else ''}")
    log = [json.loads(line) for line in (out / run_name / "log.jsonl").read_text().splitlines()]
    last = [e for e in log if "elapsed_s" in e][-1]
    metrics = evaluate(out / run_name)
    return {**metrics, "s_per_step": last["elapsed_s"] / steps, "peak_rss_mib": usage.ru_maxrss / 1024}


def evaluate(run_dir: Path) -> dict[str, float]:
    import clipforge  # noqa: PLC0415
    from clipforge.eval.evaluators import synthetic_headline  # noqa: PLC0415

    model = clipforge.load_model(run_dir / "model.safetensors")
    tokenizer = clipforge.get_tokenizer("RN-Tiny-64")
    metrics = synthetic_headline(model, tokenizer)
    keep = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "retrieval_t2i_r1")
    return {k: metrics[k] for k in keep}


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    keys = list(next(iter(results.values()))[0])
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", default="runs/queue-report")
    parser.add_argument("--output", default="queue-results.json")
    args = parser.parse_args()
    out = Path(args.runs_dir)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for name in args.variants:
            results.setdefault(name, []).append(run_one(name, VARIANTS[name], seed, args.steps, out))
            print(name, seed, results[name][-1], flush=True)
            Path(args.output).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": results},
                                                    indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
