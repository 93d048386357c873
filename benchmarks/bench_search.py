"""Search-side benchmarks: embedding throughput end to end, and index build / size / latency / recall.

Embedding (`--section embedding`): images/s from image files to L2-normalised features (decode + preprocess in
loader workers, then the image tower), the same files, thread count, batch size and worker count for every
pipeline, per precision:
- clipforge: the real `clipforge embed` path (listing, loader, encoder, parts written to disk);
- open_clip: open_clip's CLIP (its own model.py, by file path) holding the same weights, fed by the same loader
  and preprocessing as ours: open_clip's preprocessing needs torchvision, which does not install against this
  CPU build of torch from PyPI, so this ratio isolates the model; bf16 is open_clip's `amp_bf16` (autocast);
- transformers: CLIPModel with the same weights and CLIPImageProcessor (its own preprocessing) in the loader;
  bf16 is `model.to(torch.bfloat16)`.
Rounds take turns (A B C A B C) and the best round counts, as the machine is shared.

Index (`--section index`): synthetic clustered unit vectors with a caption set offset from the images (a
modality gap), written as embedding parts and indexed by `clipforge.search.build`: build seconds, bytes per
vector, 10-recall@10 per query modality (held-out queries against exact search), batch-1 latency p50/p99 of
caption queries on one faiss thread; and for caption search (`modality="text"`: the same caption queries
against the stored caption vectors), the caption index's recall and latency beside the exact scan of every
stored caption, which is what a flat index, an index built with `--no-caption-index` or one built before
caption indices does.

Server (`--section server`): `clipforge serve` in its own process over an index of `--server-rows` random unit
vectors carrying the fingerprint of `--server-model` (default RN-Tiny-64 with seed-0 random weights, the demo's
architecture: its text tower's size, not its training, sets the speed; metadata point at one small PNG).
`--clients` threads send text queries (colour x shape phrases; every one a text-tower forward, nothing cached)
over keep-alive HTTP/1.1 on loopback: closed loop (each client sends its next query when the last is answered:
the capacity) and open loop at `--rate` queries/s in total (latency at that offered load). Any answer other
than 200 is a failure. Then `--dedup-rounds` closed-loop rounds alternate plain queries and the same queries
with `dedup=0.95` (near-duplicate collapsing: 4k candidates fetched and their stored vectors compared; random
vectors have no duplicates, so this is its cost when it hides nothing), reported as the per-round ratio of mean
latencies; and the server's own /metrics give the mean time of each query stage over every request sent.

Batch (`--section batch`): `--batch-queries` distinct text queries against an index of `--server-rows` random
unit vectors carrying the fingerprint of `--batch-model` (default ViT-B-32 with seed-0 random weights: the size
of a real CLIP's text tower), answered one at a time (`Searcher.search` in a loop: what a script calling the API
per query, or the server per request, does) and by `Searcher.search_batch` (`clipforge search --queries`), in
alternating rounds; the per-round ratio of times, and how many top-10 id lists agree between the two. Then the
index search alone for the same query vectors: faiss's flat search against `index.topk_scan` (the block path
flat indices take from 8 queries up), for all the queries at once and for one.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks:tests nice -n 10 python benchmarks/bench_search.py --threads 2
    PYTHONPATH=src:benchmarks nice -n 10 python benchmarks/bench_search.py --section server
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import finish_report, format_ratio, hardware_note, round_ratios, twin_models

from clipforge.search.build import BuildOptions, build_index
from clipforge.search.index import open_index
from clipforge.search.parts import write_manifest, write_part

OPENCLIPART = Path("/usr/share/openclipart/png")


def image_files(count: int, scratch: Path) -> tuple[list[Path], str]:
    """`count` real PNGs from Debian's openclipart-png when installed, else synthetic 640x480 JPEGs."""
    if OPENCLIPART.is_dir():
        files = sorted(OPENCLIPART.rglob("*.png"))[:count]
        if len(files) == count:
            return files, f"{count} openclipart PNGs"
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        path = scratch / "images" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files, f"{count} synthetic 640x480 JPEGs"


class _Decode(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from clipforge.data.robust import convert_to_rgb, load_image  # noqa: PLC0415

        return self.transform(convert_to_rgb(load_image(self.files[i]))[0])


def _loader_rate(files: list[Path], transform: Callable, forward: Callable, batch: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(_Decode(files, transform), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    with torch.inference_mode():
        for pixels in loader:
            forward(pixels)
    return len(files) / (time.perf_counter() - start)


def _hf_transform(size: int) -> Callable:
    from transformers import CLIPImageProcessor  # noqa: PLC0415

    # OpenAI's pipeline (resize the shorter side, centre crop, CLIP mean / std) at the model's resolution
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def transform(image: Any) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


def _pipelines(name: str, precision: str, files: list[Path], scratch: Path, batch: int, workers: int) -> dict:
    """name -> zero-argument callable returning images/s, for the three implementations at `precision`."""
    import copy  # noqa: PLC0415

    from clip_reference import openclip_clip  # noqa: PLC0415 - tests/, open_clip's model.py by path

    from clipforge.search.embed import EmbedOptions, run_embedding  # noqa: PLC0415
    from clipforge.search.encoder import TorchEncoder  # noqa: PLC0415
    from clipforge.search.sources import list_source  # noqa: PLC0415
    from clipforge.transforms import image_transform  # noqa: PLC0415

    cfg, ours, hf = twin_models(name)
    theirs = openclip_clip(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    folder = scratch / "collection"
    if not folder.exists():
        folder.mkdir()
        for i, path in enumerate(files):
            (folder / f"{i:05d}{path.suffix}").symlink_to(path)
    listing = list_source(str(folder))
    encoder = TorchEncoder(copy.deepcopy(ours), name, torch.device("cpu"), precision)
    runs = [0]

    def clipforge() -> float:
        runs[0] += 1
        opts = EmbedOptions(part_size=len(files), batch_size=batch, workers=workers, progress=False)
        return float(run_embedding(scratch / f"emb-{precision}-{runs[0]}", listing, encoder, opts)["images_per_s"])

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None
    preprocess = image_transform(cfg.vision_cfg.image_size)

    def open_clip() -> float:
        def forward(px: torch.Tensor) -> None:
            if amp is None:
                torch.nn.functional.normalize(theirs.encode_image(px), dim=-1)
            else:
                with amp():
                    torch.nn.functional.normalize(theirs.encode_image(px), dim=-1)
        return _loader_rate(files, preprocess, forward, batch, workers)

    hf_model = copy.deepcopy(hf).eval().to(dtype)

    def transformers() -> float:
        def forward(px: torch.Tensor) -> None:
            out = hf_model.get_image_features(pixel_values=px.to(dtype))
            torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1)
        return _loader_rate(files, _hf_transform(cfg.vision_cfg.image_size), forward, batch, workers)

    return {"clipforge": clipforge, "open_clip": open_clip, "transformers": transformers}


def bench_embedding(name: str = "ViT-B-32", count: int = 192, batch: int = 32, workers: int = 1,
                    threads: int = 2, rounds: int = 2, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """Best-of-`rounds` images/s per (implementation, precision), the clipforge / other ratios of the best
    rates, and the per-round ratios (rounds take turns, so each round's ratio compares runs made back to back)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        files, what = image_files(count, scratch)
        per_round: dict[str, list[float]] = {}
        for precision in precisions:
            pipelines = _pipelines(name, precision, files, scratch, batch, workers)
            for _ in range(rounds):
                for impl, run in pipelines.items():
                    per_round.setdefault(f"{impl} {precision}", []).append(run())
    rates = {key: max(values) for key, values in per_round.items()}
    ratios, spreads = {}, {}
    for p in precisions:
        for other in ("open_clip", "transformers"):
            label = f"clipforge / {other} {p}"
            ratios[label] = rates[f"clipforge {p}"] / rates[f"{other} {p}"]
            spreads[label] = round_ratios([1 / r for r in per_round[f"clipforge {p}"]],
                                          [1 / r for r in per_round[f"{other} {p}"]])
            print(f"{label}: {format_ratio(ratios[label], spreads[label])}", flush=True)
    return {"model": name, "images": what, "batch": batch, "workers": workers, "threads": threads,
            "images_per_s": {k: round(v, 2) for k, v in rates.items()},
            "images_per_s_rounds": {k: [round(v, 2) for v in values] for k, values in per_round.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "ratio_rounds": spreads}


def synthetic_collection(root: Path, rows: int, dim: int, part_rows: int = 100_000, seed: int = 0,
                         centres: int = 2000, noise: float = 0.045, subcentres: int = 0,
                         model: int | None = None) -> Path:
    """Clustered unit image vectors and captions offset from them by a common direction, as parts.

    Flat (`subcentres` 0): `centres` random centres with Gaussian `noise` per coordinate; every image's
    neighbourhood sits inside its cluster, so one probed IVF list finds it. Two-level (`subcentres` > 0): each
    centre has that many random sub-directions (weight 0.8) and an image is centre + one of them + noise: the
    nearest neighbours share the sub-direction, the next ones only the centre, and a centre's images are split
    over several IVF lists, closer to the nested neighbourhoods of real embeddings. The fingerprint names
    `model` (default: the seed): collections of one `model` may share an index."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gap = rng.standard_normal(dim).astype(np.float32)
    gap /= np.linalg.norm(gap)
    subs = None
    if subcentres:  # drawn after the flat model's draws, so flat collections stay as they were
        subs = rng.standard_normal((len(centres), subcentres, dim)).astype(np.float32)
        subs *= 0.8 / np.linalg.norm(subs, axis=2, keepdims=True)
    parts = []
    for number, start in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - start)
        which = rng.integers(0, len(centres), n)
        base = centres[which] if subs is None else centres[which] + subs[which, rng.integers(0, subs.shape[1], n)]
        img = base + rng.standard_normal((n, dim), dtype=np.float32) * noise
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        text = img + 0.6 * gap + rng.standard_normal((n, dim), dtype=np.float32) * 0.03
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        columns = {"key": [str(start + i) for i in range(n)], "path": [None] * n, "caption": [None] * n}
        parts.append(write_part(root, number, img, text, columns))
    header = {"fingerprint": {"synthetic": seed if model is None else model}, "dim": dim, "model": "synthetic",
              "has_text": True, "source": {"kind": "synthetic", "rows": rows}}
    write_manifest(root, parts, header)
    return root


def _latency(index_dir: Path, queries: np.ndarray, repeats: int, captions: str | None = None) -> dict[str, float]:
    """Batch-1 latency on one faiss thread: a server answers concurrent queries on separate threads, and
    OpenMP barriers for a single query only add waiting on a busy machine. `captions`: search the caption
    vectors instead, through the caption index ("index") or by the exact scan ("scan")."""
    import faiss  # noqa: PLC0415

    threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)  # the exact scan's matrix products
    index = open_index(index_dir)
    if captions == "scan":
        index.caption_index = None
    search = index.search if captions is None else index.search_captions
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)][None]
        start = time.perf_counter()
        search(q, 10)
        times.append(time.perf_counter() - start)
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(torch_threads)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _caption_search(index_dir: Path, info: dict, queries: np.ndarray, repeats: int) -> dict[str, Any]:
    """Caption search: the caption index's recall and latency (when built), and the exact scan's latency."""
    out: dict[str, Any] = {}
    captions = info.get("captions")
    if captions:
        out = {"factory": captions["build"]["factory"], "search": captions["search"],
               "build_s": captions["build"]["seconds"], "recall_text": captions["recall"]["text"],
               "recall_image": captions["recall"]["image"], "target_met": captions["recall"]["target_met"],
               "index": _latency(index_dir, queries, repeats, "index")}
    out["scan"] = _latency(index_dir, queries, max(10, repeats // 10), "scan")  # ~0.1-1 s a query at 1M rows
    if captions:
        out["speedup_p50"] = round(out["scan"]["p50_ms"] / out["index"]["p50_ms"], 1)
    return out


def bench_index(sizes: tuple[int, ...] = (100_000, 1_000_000), dim: int = 512, threads: int = 2,
                kinds: tuple[str, ...] = ("flat", "ivfpq"), target_recall: float = 0.9, repeats: int = 200,
                centres: int = 2000, noise: float = 0.045, subcentres: int = 0) -> dict:
    """Build time, bytes/vector, recall per modality and batch-1 latency of each kind at each size."""
    import faiss  # noqa: PLC0415

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            emb = synthetic_collection(Path(tmp) / f"emb{rows}", rows, dim, centres=centres, noise=noise,
                                       subcentres=subcentres)
            pick = np.sort(np.random.default_rng(1).choice(min(rows, 100_000), 64, replace=False))
            queries = np.load(emb / "text_emb" / "text_emb_0.npy")[pick].astype(np.float32)  # captions as queries
            for kind in kinds:
                start = time.perf_counter()
                info = build_index([emb], Path(tmp) / f"{kind}{rows}",
                                   BuildOptions(kind=kind, target_recall=target_recall, queries=300))
                total = time.perf_counter() - start
                results[f"{kind} {rows}"] = {
                    "factory": info["build"]["factory"], "search": info["search"],
                    "build_s": info["build"]["seconds"], "build_and_measure_s": round(total, 1),
                    "bytes_per_vector": info["bytes_per_vector"],
                    "recall_image": info["recall"]["image"], "recall_text": info["recall"]["text"],
                    "target_met": info["recall"]["target_met"],
                    **_latency(Path(tmp) / f"{kind}{rows}", queries, repeats),
                    "captions": _caption_search(Path(tmp) / f"{kind}{rows}", info, queries, repeats)}
                print(f"  {kind} {rows}: {json.dumps(results[f'{kind} {rows}'])}", flush=True)
    shape = f"{centres} centres x {subcentres} sub-directions" if subcentres else f"{centres} centres"
    return {"dim": dim, "vectors": f"synthetic: {shape}, noise {noise} per coordinate; offset captions",
            "centres": centres, "subcentres": subcentres, "noise": noise, "threads": threads, "faiss": faiss.__version__,
            "target_recall": target_recall, "results": results}


COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")


def server_index(root: Path, rows: int, model_spec: str | None, seed: int = 0, arch: str = "RN-Tiny-64") -> Path:
    """An index of `rows` random normalised vectors carrying the fingerprint of `model_spec` (default: `arch`
    with seed-0 random weights); returns its folder."""
    from PIL import Image

    from clipforge.search.encoder import load_encoder

    if model_spec is None:
        from clipforge.checkpoint import save_model
        from clipforge.factory import create_model

        torch.manual_seed(0)
        model_spec = str(save_model(create_model(arch), root / "model.safetensors"))
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


def run_clients(base: str, clients: int, per_client: int, rate: float | None,
                dedup: float | None = None) -> dict[str, Any]:
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
                    params: dict[str, Any] = {"text": text, "k": 10}
                    if dedup is not None:
                        params["dedup"] = dedup
                    ok = http.get("/api/search", params=params).status_code == 200
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


def stage_means(base: str) -> dict[str, float]:
    """Mean milliseconds per query stage over everything the server answered, from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "clipforge_query_stage_seconds_sum":
                sums[sample.labels["stage"]] = sample.value
            elif sample.name == "clipforge_query_stage_seconds_count":
                counts[sample.labels["stage"]] = sample.value
    return {stage: round(1000 * sums[stage] / counts[stage], 3) for stage in sums if counts.get(stage)}


def dedup_cost(base: str, clients: int, per_client: int, rounds: int) -> dict[str, Any]:
    """Closed-loop rounds alternating plain and dedup=0.95 queries: per-round ratio of mean latencies."""
    plain, dedup = [], []
    for _ in range(rounds):
        plain.append(run_clients(base, clients, per_client, None)["mean_ms"])
        dedup.append(run_clients(base, clients, per_client, None, dedup=0.95)["mean_ms"])
    ratio = statistics.median(dedup) / statistics.median(plain)
    rounds_ = round_ratios(plain, dedup)  # per round: dedup mean latency / plain mean latency
    print(f"dedup=0.95 latency / plain: {format_ratio(ratio, rounds_)}", flush=True)
    return {"plain_mean_ms": plain, "dedup_mean_ms": dedup, "latency_ratio": round(ratio, 3),
            "latency_ratio_rounds": rounds_}


def bench_server(rows: int = 100_000, clients: int = 8, per_client: int = 50, rate: float = 20.0,
                 model: str | None = None, port: int = 8765, dedup_rounds: int = 5) -> dict[str, Any]:
    """Build the random index, serve it, and measure closed-loop and open-loop latency and throughput."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        started = time.perf_counter()
        index = server_index(Path(tmp), rows, model)
        build_s = time.perf_counter() - started
        server = start_server(index, port)
        base = f"http://127.0.0.1:{port}"
        try:
            run_clients(base, clients, 5, None)  # warm-up: first forward passes, connections
            closed = run_clients(base, clients, per_client, None)
            opened = run_clients(base, clients, per_client, rate)
            dedup = dedup_cost(base, clients, per_client, dedup_rounds) if dedup_rounds else None
            stages = stage_means(base)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return {"rows": rows, "clients": clients, "index_setup_s": round(build_s, 1), "closed_loop": closed,
            f"open_loop_{rate:g}_qps": opened, "dedup": dedup, "stage_mean_ms": stages,
            "targets": {"p50_ms": 50, "queries_per_s": 20}}


def bench_batch(rows: int = 100_000, queries: int = 256, arch: str = "ViT-B-32", threads: int = 2,
                rounds: int = 3, k: int = 10) -> dict[str, Any]:
    """One query at a time vs `search_batch`, same Searcher, same queries, alternating rounds."""
    from clipforge.search.searcher import Searcher

    torch.set_num_threads(threads)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "moon"]
    texts = [f"a photo of a {colours[i % 8]} {shapes[i // 8 % 8]} on a plain background, number {i}"
             for i in range(queries)]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        searcher = Searcher(server_index(Path(tmp), rows, None, arch=arch), device="cpu")
        searcher.search(text=texts[0], k=k)  # warm-up
        loop_s, batch_s = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            single = [searcher.search(text=t, k=k) for t in texts]
            loop_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            batched = searcher.search_batch(texts, k=k)
            batch_s.append(time.perf_counter() - started)
        flat = flat_knn(searcher, texts, k, rounds)
    agree = sum([h["id"] for h in a["results"]] == [h["id"] for h in b["results"]] for a, b in zip(single, batched))
    ratio = statistics.median(loop_s) / statistics.median(batch_s)
    rounds_ = round_ratios(batch_s, loop_s)
    print(f"search_batch vs one at a time ({queries} queries, {arch}, {rows} rows): {format_ratio(ratio, rounds_)}; "
          f"{queries / statistics.median(batch_s):.1f} vs {queries / statistics.median(loop_s):.1f} queries/s; "
          f"top-{k} ids identical for {agree} of {queries}", flush=True)
    return {"rows": rows, "queries": queries, "model": arch, "k": k, "loop_s": loop_s, "batch_s": batch_s,
            "speedup": round(ratio, 3), "speedup_rounds": rounds_, "identical_top_k": agree, "flat_knn": flat}


def flat_knn(searcher: Any, texts: list[str], k: int, rounds: int) -> dict[str, Any]:
    """faiss's flat search vs `topk_scan` on the searcher's index, for all query vectors at once and for one."""
    from clipforge.search.index import flat_vectors, topk_scan

    faiss_index = searcher.index.faiss_index
    stored = flat_vectors(faiss_index)
    queries = np.ascontiguousarray(searcher.encode_texts(texts), dtype=np.float32)  # [q, d]
    out: dict[str, Any] = {}
    for label, block in (("all", queries), ("one", queries[:1])):
        ours, theirs = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            faiss_index.search(block, k)
            theirs.append(time.perf_counter() - started)
            started = time.perf_counter()
            topk_scan([(0, stored)], block, k)
            ours.append(time.perf_counter() - started)
        ratio = statistics.median(theirs) / statistics.median(ours)
        spread = round_ratios(ours, theirs)
        print(f"topk_scan vs faiss flat search, {len(block)} quer{'ies' if len(block) > 1 else 'y'}: "
              f"{format_ratio(ratio, spread)}; faiss {1000 * statistics.median(theirs) / len(block):.2f} ms a query",
              flush=True)
        out[label] = {"queries": len(block), "faiss_s": theirs, "topk_scan_s": ours, "speedup": round(ratio, 3),
                      "speedup_rounds": spread}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", action="append", choices=["embedding", "index", "server", "batch"],
                        help="what to run (repeatable; default: all four)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.json")
    g = parser.add_argument_group("embedding")
    g.add_argument("--model", default="ViT-B-32")
    g.add_argument("--images", type=int, default=192)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--workers", type=int, default=1, help="loader processes decoding images")
    g.add_argument("--rounds", type=int, default=2)
    g = parser.add_argument_group("index")
    g.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--kinds", nargs="+", default=["flat", "ivfpq"])
    g.add_argument("--target-recall", type=float, default=0.9)
    g.add_argument("--centres", type=int, default=2000, help="cluster centres of the synthetic vectors")
    g.add_argument("--noise", type=float, default=0.045, help="Gaussian noise per coordinate around a centre")
    g.add_argument("--subcentres", type=int, default=0,
                   help="sub-directions per centre (0: flat clusters; > 0: two-level neighbourhoods)")
    g = parser.add_argument_group("server")
    g.add_argument("--server-rows", type=int, default=100_000)
    g.add_argument("--server-model", help="model the server embeds queries with (default: RN-Tiny-64, seed-0 weights)")
    g.add_argument("--clients", type=int, default=8)
    g.add_argument("--requests", type=int, default=50, help="requests per client and measurement")
    g.add_argument("--rate", type=float, default=20.0, help="open-loop offered load, queries/s in total")
    g.add_argument("--port", type=int, default=8765)
    g.add_argument("--dedup-rounds", type=int, default=5, help="plain / dedup=0.95 round pairs (0: skip)")
    g = parser.add_argument_group("batch (also uses --server-rows)")
    g.add_argument("--batch-model", default="ViT-B-32", help="architecture, seed-0 random weights")
    g.add_argument("--batch-queries", type=int, default=256)
    g.add_argument("--batch-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sections = args.section or ["embedding", "index", "server", "batch"]
    report: dict[str, Any] = {"machine": hardware_note(args.threads)}
    print(report["machine"], flush=True)
    if "embedding" in sections:
        report["embedding"] = bench_embedding(args.model, args.images, args.batch, args.workers, args.threads,
                                              args.rounds)
        print(json.dumps(report["embedding"], indent=2), flush=True)
    if "index" in sections:
        report["index"] = bench_index(tuple(args.sizes), args.dim, args.threads, tuple(args.kinds),
                                      args.target_recall, centres=args.centres, noise=args.noise,
                                      subcentres=args.subcentres)
    if "server" in sections:
        report["server"] = bench_server(args.server_rows, args.clients, args.requests, args.rate, args.server_model,
                                        args.port, args.dedup_rounds)
        print(json.dumps(report["server"], indent=2), flush=True)
    if "batch" in sections:
        report["batch"] = bench_batch(args.server_rows, args.batch_queries, args.batch_model, args.threads,
                                      args.batch_rounds)
    finish_report(report, args.threads, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
