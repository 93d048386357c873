"""Data pipeline throughput from JPEG tar shards: images/s per worker for read + decode + augment.

Writes shards of the synthetic world's scenes rendered at `--source-size` (JPEG, quality 95, like
img2dataset's resized output) into a temporary folder, then measures, in this process and on one thread
(what one DataLoader worker has):
- decode: tar member read and JPEG decode only;
- train transform: decode + random resized crop to `--size` + normalise (`clipforge.transforms.TrainTransform`);
- stream: the whole `ShardDataset` path (header scan, shuffle buffer, decode, augment);
and, with `--workers N`, a `ShardLoader` with N workers and the tokenizer in the collate (images/s in total).

    PYTHONPATH=src:benchmarks python benchmarks/bench_data.py --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import hardware_note

from clipforge.data.shards import ShardDataset, ShardLoader, expand_shards, scan_shard
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.data.writer import write_shards
from clipforge.tokenizer import get_tokenizer
from clipforge.train.feed import BatchCollate
from clipforge.transforms import TrainTransform


def write_source_shards(out: Path, count: int, source_size: int, per_shard: int) -> list[str]:
    world = SyntheticWorld(SyntheticConfig(image_size=source_size))
    pairs = (world.pair(STREAM_TRAIN, i) for i in range(count))
    write_shards(pairs, out, samples_per_shard=per_shard)
    return expand_shards(out)


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def measure_single(paths: list[str], size: int) -> dict[str, float]:
    members = []
    for i, path in enumerate(paths):
        with open(path, "rb") as handle:
            for ref in scan_shard(path, i):
                ext, offset, length = ref.members[0]
                handle.seek(offset)
                members.append(handle.read(length))
    transform = TrainTransform(size, scale=(0.9, 1.0), seed=0)

    def decode() -> None:
        for data in members:
            with Image.open(io.BytesIO(data)) as image:
                image.load()

    def augment() -> None:
        for data in members:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                transform(image)

    def stream() -> None:
        for _ in ShardDataset(paths, transform, seed=0, shuffle_buffer=256, epochs=1):
            pass

    return {"decode": rate(decode, len(members)), "decode + train transform": rate(augment, len(members)),
            "ShardDataset stream": rate(stream, len(members))}


def one_thread(_: int) -> None:
    torch.set_num_threads(1)


def measure_loader(paths: list[str], size: int, workers: int, batch: int, count: int) -> float:
    dataset = ShardDataset(paths, TrainTransform(size), seed=0, shuffle_buffer=256, epochs=1)
    loader = ShardLoader(dataset, batch, num_workers=workers, collate_fn=BatchCollate(get_tokenizer()),
                         worker_init_fn=one_thread, prefetch_factor=4)
    start, seen = time.perf_counter(), 0
    for images, *_ in loader:  # TrainBatch(images, tokens, problems, stream)
        seen += images.shape[0]
    assert seen == count, (seen, count)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--size", type=int, default=224, help="model input size after the crop")
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader run (0: skip)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(hardware_note(1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_source_shards(Path(tmp), args.images, args.source_size, args.per_shard)
        size_mb = sum(Path(p).stat().st_size for p in paths) / 1e6
        print(f"{args.images} JPEGs of {args.source_size}px in {len(paths)} shards ({size_mb:.1f} MB); "
              f"crop to {args.size}px")
        results = measure_single(paths, args.size)
        for label, value in results.items():
            print(f"  one worker, {label:28s} {value:8.1f} images/s")
        if args.workers > 0:
            key = f"ShardLoader, {args.workers} workers + tokenizer"
            results[key] = measure_loader(paths, args.size, args.workers, args.batch, args.images)
            print(f"  {key:40s} {results[key]:8.1f} images/s ({results[key] / args.workers:.1f} per worker)")
    print(hardware_note(1))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"machine": hardware_note(1), "images_per_s": results, **vars(args)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
