"""A page of search results from a photo library: full files against previews (`GET /api/image/N?size=384`).

`--photos` synthetic camera-sized JPEGs (`--width` x `--height`, quality 90, with sensor-like noise so that they
weigh what photos weigh) are embedded and indexed with a tiny random model; a FastAPI test client (in process:
no network, so the times are the server's work alone) then fetches the `--page` results of a query three ways,
in turns for `--rounds` rounds:
- full: the files, as the page fetched them before previews;
- cold: previews made on the spot (each round clears the preview cache first);
- warm: previews again, from the cache.
Printed: bytes per page and milliseconds per page of each, the ratios of medians with the per-round range
(benchmarks/common.py), and the machine. What a browser then spends decoding is not measured: a 12-megapixel
JPEG costs it tens of milliseconds and ~48 MB of memory per card, a 384-px WebP a fraction of that.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:tests python benchmarks/bench_previews.py --threads 1 \\
        --output docs/benchmarks/previews.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import finish_report, format_ratio, hardware_note, round_ratios
from PIL import Image

from clipforge.checkpoint import save_model
from clipforge.cli import main as clipforge_main
from clipforge.factory import create_model

PREVIEW = 384  # what the page asks for on a screen of device-pixel ratio 1


def camera_jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth shapes under per-pixel noise (which is what makes camera files large)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=90)
    return out.getvalue()


def build(root: Path, photos: int, width: int, height: int) -> Path:
    images = root / "photos"
    images.mkdir()
    for i in range(photos):
        (images / f"IMG_{i:04d}.jpg").write_bytes(camera_jpeg(i, width, height))
    torch.manual_seed(0)
    model = save_model(create_model("ViT-Micro-8-32").eval(), root / "model.safetensors")
    assert clipforge_main(["embed", str(images), "--model", str(model), "--output", str(root / "emb"),
                           "--workers", "0", "--no-progress"]) == 0
    assert clipforge_main(["index", "build", str(root / "emb"), "--index", str(root / "index"), "--kind", "flat",
                           "--queries", str(min(50, photos // 2))]) == 0
    return root / "index"


def measure(client: object, urls: list[str], rounds: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per page of each way, in turns, and bytes per page."""
    def page(suffix: str) -> int:
        sent = 0
        for url in urls:
            answer = client.get(url + suffix)  # type: ignore[attr-defined]
            assert answer.status_code == 200, answer.text
            sent += len(answer.content)
        return sent

    times: dict[str, list[float]] = {"full": [], "cold": [], "warm": []}
    sizes: dict[str, int] = {}
    page(f"?size={PREVIEW}")  # warm-up: imports, first decodes
    for _ in range(rounds):
        for name, seconds in times.items():
            if name == "cold":
                client.app.state.previews.clear()  # type: ignore[attr-defined]
            start = time.perf_counter()
            sizes[name] = page("" if name == "full" else f"?size={PREVIEW}")
            seconds.append(time.perf_counter() - start)
    return times, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--page", type=int, default=24, help="results per page (the page's default k is 12-24)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastapi.testclient import TestClient

    from clipforge import Searcher
    from clipforge.search.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        client = TestClient(create_app(Searcher(build(Path(tmp), args.photos, args.width, args.height))))
        found = client.get("/api/search", params={"text": "a photo", "k": args.page}).json()["results"]
        urls = [hit["image_url"] for hit in found]
        times, sizes = measure(client, urls, args.rounds)
    report = {"machine": hardware_note(args.threads), "photos": args.photos, "size": [args.width, args.height],
              "page": len(urls), "preview": PREVIEW, "seconds": times, "bytes_per_page": sizes}
    print(report["machine"])
    for name, seconds in times.items():
        print(f"{name:5s}: {sizes[name] / 1e6:8.2f} MB per page of {len(urls)}, "
              f"{statistics.median(seconds) * 1e3:8.1f} ms per page (median of {args.rounds})")
    report["ratios"] = {"bytes full / preview": sizes["full"] / sizes["cold"]}
    print(f"bytes: full files are {sizes['full'] / sizes['cold']:.0f}x the previews")
    for way in ("cold", "warm"):
        ratio = statistics.median(times["full"]) / statistics.median(times[way])
        rounds = round_ratios(times[way], times["full"])
        report["ratios"][f"time full / {way} preview"] = {"ratio": ratio, "rounds": rounds}
        print(f"time, full / {way} previews: {format_ratio(ratio, rounds)}")
    finish_report(report, args.threads, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
