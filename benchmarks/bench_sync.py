"""`clipforge index sync` against what it replaces: embedding and indexing the changed folder from scratch.

A folder of `--images` synthetic-world PNGs (with caption sidecars) is embedded and indexed once. Each round then
changes it as a photo library changes (`--add` new files, `--delete` removed, `--edit` rewritten with another
picture) and times, one after the other on the same folder state:
- sync: `index sync` of a copy of the index as the previous round left it (the copy is not timed), so each
  round's sync embeds that round's changes only;
- rebuild: `embed` of the whole folder into a new folder, then `index build` over it (what one would run
  without sync).
Both must end with the same files in the index (checked every round). Printed: seconds of each, the ratio of
medians with the per-round range (benchmarks/common.py), and the machine.

Measure (`--section measure`): what the 5% rule saves where measuring costs. Synthetic clustered vectors
(`bench_search.synthetic_collection`, `--measure-rows` x `--dim`) in an IVF-PQ (or `--kind`) index; each round
appends `--change` x rows new vectors and removes as many, once with the measurement (`add_to_index(...,
measure=True)`, what `index add` does) and once under the rule (`measure=None`, what `index sync` does: 2% of
changes keep the numbers), each on a fresh copy of the same index, in turns.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_sync.py --threads 2 \\
        --output docs/benchmarks/sync-avx2-2thread.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import finish_report, format_ratio, hardware_note, round_ratios

from clipforge.checkpoint import save_model
from clipforge.cli import main as clipforge_main
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.factory import create_model


def _write(world: SyntheticWorld, folder: Path, name: str, index: int) -> None:
    image, caption = world.pair(STREAM_TRAIN, index)
    image.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption)


def _run(args: list[str]) -> float:
    started = time.perf_counter()
    if clipforge_main(args) != 0:
        raise SystemExit(f"clipforge {' '.join(args)} failed")
    return time.perf_counter() - started


def _indexed_paths(index_dir: Path) -> set[str]:
    from clipforge.search import open_index

    index = open_index(index_dir)
    return {m["path"] for m in index.metadata(index.removed.live())}


def _change(world: SyntheticWorld, folder: Path, round_: int, add: int, delete: int, edit: int) -> None:
    files = sorted(folder.glob("*.png"))
    for path in files[:delete]:
        path.unlink()
        path.with_suffix(".txt").unlink()
    for path in files[delete:delete + edit]:
        world.pair(STREAM_TRAIN, 900_000 + round_ * 1000 + files.index(path))[0].save(path)
    for i in range(add):
        _write(world, folder, f"r{round_}_{i:05d}", 500_000 + round_ * 10_000 + i)


def bench_sync(images: int = 5000, arch: str = "RN-Tiny-64", add: int = 50, delete: int = 25, edit: int = 10,
               rounds: int = 3, threads: int = 2, workers: int = 1) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        root = Path(tmp)
        model = create_model(arch).eval()
        model_path = str(save_model(model, root / "model.safetensors"))
        world = SyntheticWorld(SyntheticConfig(image_size=model.image_size))
        folder = root / "photos"
        folder.mkdir()
        for i in range(images):
            _write(world, folder, f"img_{i:06d}", 50_000 + i)
        quiet = ["--no-progress", "--workers", str(workers)]
        _run(["embed", str(folder), "--model", model_path, "--output", str(root / "emb"), *quiet])
        _run(["index", "build", str(root / "emb"), "--index", str(root / "index"), "--kind", "flat"])
        sync_s, rebuild_s, stages = [], [], []
        base = root / "index"
        for r in range(rounds):
            _change(world, folder, r, add, delete, edit)
            synced = root / f"index-{r}"
            shutil.copytree(base, synced)
            report = root / f"sync-{r}.json"
            sync_s.append(_run(["index", "sync", str(synced), str(folder), *quiet, "--output", str(report)]))
            stages.append(json.loads(report.read_text())["seconds"])
            fresh = root / f"rebuilt-{r}"
            rebuild_s.append(_run(["embed", str(folder), "--model", model_path, "--output", str(fresh / "emb"), *quiet])
                             + _run(["index", "build", str(fresh / "emb"), "--index", str(fresh / "index"),
                                     "--kind", "flat"]))
            want = {str(p.resolve()) for p in folder.glob("*.png")}
            if not _indexed_paths(synced) == _indexed_paths(fresh / "index") == want:
                raise SystemExit(f"round {r}: the synced and rebuilt indices hold different files")
            shutil.rmtree(fresh)
            base = synced
    ratio = statistics.median(rebuild_s) / statistics.median(sync_s)
    rounds_ = round_ratios(sync_s, rebuild_s)
    stage_medians = {k: round(statistics.median(s[k] for s in stages), 3) for k in stages[0]}
    print(f"index sync vs embed + build from scratch ({images} images, {arch}, +{add} -{delete} ~{edit} a round): "
          f"{format_ratio(ratio, rounds_)}; sync {statistics.median(sync_s):.1f} s, rebuild "
          f"{statistics.median(rebuild_s):.1f} s (median of {rounds}); sync stages {stage_medians}", flush=True)
    return {"images": images, "model": arch, "add": add, "delete": delete, "edit": edit, "workers": workers,
            "sync_s": sync_s, "sync_stages": stages, "rebuild_s": rebuild_s, "speedup": round(ratio, 3),
            "speedup_rounds": rounds_}


def bench_measure(rows: int = 200_000, dim: int = 512, kind: str = "ivfpq", change: float = 0.01, rounds: int = 3,
                  threads: int = 2) -> dict[str, Any]:
    import numpy as np
    from bench_search import synthetic_collection

    from clipforge.search.build import BuildOptions, add_to_index, build_index

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        root = Path(tmp)
        synthetic_collection(root / "emb", rows, dim, seed=0)
        started = time.perf_counter()
        built = build_index([root / "emb"], root / "index", BuildOptions(kind=kind, target_recall=0.9))
        build_s = time.perf_counter() - started
        measured_s, kept_s = [], []
        n = max(1, int(rows * change))
        for r in range(rounds):
            synthetic_collection(root / f"new-{r}", n, dim, seed=r + 1, model=0)
            remove = np.random.default_rng(r).choice(rows, n, replace=False)
            for measure, times in ((True, measured_s), (None, kept_s)):
                copy = root / f"index-{r}-{measure}"
                shutil.copytree(root / "index", copy)
                started = time.perf_counter()
                info = add_to_index(copy, [root / f"new-{r}"], remove=remove, measure=measure)
                times.append(time.perf_counter() - started)
                if (info["unmeasured_changes"] == 0) != bool(measure):
                    raise SystemExit(f"round {r}: measure={measure} did not do what it says")
                shutil.rmtree(copy)
    ratio = statistics.median(measured_s) / statistics.median(kept_s)
    rounds_ = round_ratios(kept_s, measured_s)
    print(f"sync's index stage, {rows} x {dim} {built['build']['factory']}, +{n} -{n} rows: re-measured "
          f"{statistics.median(measured_s):.1f} s, kept under the 5% rule {statistics.median(kept_s):.1f} s: "
          f"{format_ratio(ratio, rounds_)} (build + first measurement {build_s:.0f} s)", flush=True)
    return {"rows": rows, "dim": dim, "factory": built["build"]["factory"], "changed_rows": 2 * n,
            "build_and_measure_s": build_s, "measured_s": measured_s, "kept_s": kept_s, "speedup": round(ratio, 3),
            "speedup_rounds": rounds_}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--model", default="RN-Tiny-64", help="architecture (seed-0 random weights)")
    parser.add_argument("--add", type=int, default=50)
    parser.add_argument("--delete", type=int, default=25)
    parser.add_argument("--edit", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="loader processes decoding images")
    parser.add_argument("--section", action="append", choices=["folder", "measure"],
                        help="what to run (repeatable; default: both)")
    parser.add_argument("--measure-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kind", default="ivfpq", choices=["flat", "ivfpq", "hnsw"])
    parser.add_argument("--change", type=float, default=0.01, help="fraction of rows added, and as many removed")
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    sections = args.section or ["folder", "measure"]
    report: dict[str, Any] = {"machine": hardware_note(args.threads)}
    print(report["machine"], flush=True)
    if "folder" in sections:
        report["sync"] = bench_sync(args.images, args.model, args.add, args.delete, args.edit, args.rounds,
                                    args.threads, args.workers)
    if "measure" in sections:
        report["measure"] = bench_measure(args.measure_rows, args.dim, args.kind, args.change, args.rounds,
                                          args.threads)
    finish_report(report, args.threads, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
