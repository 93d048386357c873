"""Search benchmarks. Section `server`: `clipforge serve` under 8 concurrent clients on loopback.

server: an index of `--rows` random L2-normalised vectors (the model's dimension; their metadata point at one
small PNG) is built with the embedding layout and `index build --kind flat`, carrying the fingerprint of the
model given by `--model` (default: RN-Tiny-64 with seed-0 random weights: the text tower is what costs, and
its size, not its training, sets the speed). `clipforge serve` runs in its own process; `--clients` threads
send text queries (colour x shape phrases, each a fresh text-tower forward: nothing is cached) over HTTP/1.1
keep-alive connections. Two measurements:
- closed loop: each client sends its next query as soon as the last one is answered (the server's capacity:
  queries/s, and latency with `--clients` requests always in flight);
- open loop at `--rate` queries/s in total, spread evenly over the clients (latency at that offered load).
Any non-200 answer counts as a failure.

    PYTHONPATH=src:benchmarks python benchmarks/bench_search.py server --rows 100000 --clients 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import machine_note

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")


def random_index(root: Path, rows: int, model_spec: str | None, seed: int = 0) -> Path:
    """An index of `rows` random normalised vectors carrying the model's fingerprint; returns its folder."""
    import torch
    from PIL import Image

    from clipforge.search.build import BuildOptions, build_index
    from clipforge.search.encoder import load_encoder
    from clipforge.search.parts import write_manifest, write_part

    if model_spec is None:
        from clipforge.checkpoint import save_model
        from clipforge.factory import create_model

        torch.manual_seed(0)
        model_spec = str(save_model(create_model("RN-Tiny-64"), root / "model.safetensors"))
    encoder = load_encoder(model_spec, device="cpu")
    dim = int(encoder.fingerprint["dim"])
    picture = root / "one.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    rng = np.random.default_rng(seed)
    parts, per_part = [], 50_000
    for number, start in enumerate(range(0, rows, per_part)):
        count = min(per_part, rows - start)
        img = rng.standard_normal((count, dim)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        text = rng.standard_normal((count, dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        keys = [f"row{start + i:07d}" for i in range(count)]
        parts.append(write_part(root / "emb", number, img, text,
                                {"key": keys, "path": [str(picture)] * count, "caption": keys}))
    write_manifest(root / "emb", parts, {"fingerprint": encoder.fingerprint, "dim": dim, "model": model_spec,
                                         "has_text": True})
    build_index([root / "emb"], root / "index", BuildOptions(kind="flat", queries=200))
    return root / "index"


def start_server(index: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "clipforge", "serve", str(index), "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"clipforge serve exited: {server.stdout.read() if server.stdout else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("clipforge serve did not answer /healthz within 120 s")


def run_clients(base: str, clients: int, per_client: int, rate: float | None) -> dict[str, Any]:
    """Latencies (s) and failures of `clients` threads sending `per_client` text queries each."""
    import httpx

    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start_at = time.perf_counter() + 0.2

    def client(n: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(per_client):
                if rate is not None:  # open loop: request i of client n is due at a fixed time
                    due = start_at + (i * clients + n) / rate
                    time.sleep(max(0.0, due - time.perf_counter()))
                text = texts[(n * per_client + i) % len(texts)]
                began = time.perf_counter()
                try:
                    ok = http.get("/api/search", params={"text": text, "k": 10}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[n].append(time.perf_counter() - began)
                failures[n] += not ok

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - max(began, start_at if rate is not None else began)
    flat = sorted(x for per in latencies for x in per)
    return {"requests": len(flat), "failures": sum(failures), "seconds": round(wall, 3),
            "queries_per_s": round(len(flat) / wall, 2), "p50_ms": round(1000 * statistics.median(flat), 2),
            "p99_ms": round(1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))], 2),
            "mean_ms": round(1000 * statistics.fmean(flat), 2)}


def bench_server(rows: int = 100_000, clients: int = 8, per_client: int = 50, rate: float = 20.0,
                 model: str | None = None, port: int = 8765) -> dict[str, Any]:
    """Build the random index, serve it, and measure closed-loop and open-loop latency and throughput."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        started = time.perf_counter()
        index = random_index(Path(tmp), rows, model)
        build_s = time.perf_counter() - started
        server = start_server(index, port)
        base = f"http://127.0.0.1:{port}"
        try:
            run_clients(base, clients, 5, None)  # warm-up: first forward passes, connections
            closed = run_clients(base, clients, per_client, None)
            opened = run_clients(base, clients, per_client, rate)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return {"rows": rows, "clients": clients, "index_setup_s": round(build_s, 1), "closed_loop": closed,
            f"open_loop_{rate:g}_qps": opened, "targets": {"p50_ms": 50, "queries_per_s": 20}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="section", required=True)
    p = sub.add_parser("server", help="clipforge serve under concurrent text queries")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per client and measurement")
    p.add_argument("--rate", type=float, default=20.0, help="open-loop offered load, queries/s in total")
    p.add_argument("--model", help="model to embed queries with (default: RN-Tiny-64, random seed-0 weights)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = bench_server(args.rows, args.clients, args.requests, args.rate, args.model, args.port)
    result["machine"] = machine_note(threads=0) + " (server process: torch's default threads)"
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0 if result["closed_loop"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
