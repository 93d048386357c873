"""Building, extending and checking an index over one or more embedding directories (faiss)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write, atomic_write_text, sha256_file
from .errors import SearchError, require
from .fingerprint import backend_of, check_fingerprint
from .index import (
    INDEX_FORMAT,
    INFO_FILE,
    apply_search_params,
    caption_skip,
    index_chunks,
    load_index_info,
    open_caption_index,
    read_faiss,
    resolve_source,
    search_faiss,
    stored_rows,
    uncaptioned_ids,
    vector_chunks,
)
from .measure import drop_self, exact_topk, no_match_threshold, query_recalls, tune
from .parts import EmbeddingSet, open_embeddings
from .removed import Removed

__all__ = ["BuildOptions", "add_to_index", "build_index", "choose_kind", "parse_memory"]

KINDS = ("auto", "flat", "ivfpq", "hnsw")
FLAT_MAX_SCAN = 2.6e8  # rows x dim a flat query may scan (~1 GB of float32, ~0.1 s on one core) before IVF-PQ
ID_BYTES = 8  # IVF lists store an int64 id per vector
MAX_RERANK = 64  # ivfpq: default deepest exact rescoring tuning may choose (k x 64 float16 rows read per query)
# `index sync` re-measures recall and the threshold (an exact scan per held-out query, and for IVF/HNSW a
# re-tuning: minutes at 1M rows) once the rows added and removed since the last measurement pass this fraction
# of the live rows; smaller changes keep the measured numbers, as a database refreshes its statistics
REMEASURE_FRACTION = 0.05


@dataclass(frozen=True)
class BuildOptions:
    kind: str = "auto"
    memory: int | None = None  # bytes the index may take in RAM (auto picks within it)
    target_recall: float = 0.95
    queries: int = 500  # held-out query rows per modality
    k: int = 10
    seed: int = 0
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    train_on: str = "image"  # ivfpq: "image" or "mixed" (image + caption vectors); see training_sample
    rerank: int = 4  # ivfpq: rescore k x rerank candidates with the stored vectors (0: PQ scores as they are)
    rerank_max: int = MAX_RERANK  # ivfpq: the deepest rescoring tuning may double `rerank` to (= rerank: pinned)
    caption_index: bool = True  # over captioned rows: a second index, of the caption vectors


def parse_memory(text: str) -> int:
    """'4G', '512M', '100k' or bytes -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().rstrip("b")
    try:
        return int(float(value[:-1]) * units[value[-1]]) if value and value[-1] in units else int(value)
    except (ValueError, IndexError):
        raise SearchError(f"--memory: expected a size like 4G, 512M or a number of bytes, got {text!r}") from None


def pq_m_for(dim: int, budget_per_vector: float) -> int:
    """The largest PQ code size (bytes, a divisor of dim, at most dim/2 and 64) fitting the per-vector budget."""
    sizes = [m for m in range(1, min(64, dim // 2) + 1) if dim % m == 0] or [1]
    fitting = [m for m in sizes if m + ID_BYTES <= budget_per_vector]
    return max(fitting) if fitting else min(sizes)


def nlist_for(rows: int) -> int:
    """About 4 sqrt(rows) lists, with at least 39 training points per list (faiss's minimum), a power of 2."""
    return 2 ** max(0, int(math.log2(max(1.0, min(4 * math.sqrt(rows), rows / 39)))))


def choose_kind(rows: int, dim: int, memory: int | None) -> str:
    """Exact search while a query's scan stays short and the float32 vectors fit the budget, then IVF-PQ."""
    flat_bytes = rows * dim * 4
    if rows * dim <= FLAT_MAX_SCAN and (memory is None or flat_bytes <= memory):
        return "flat"
    return "ivfpq"


def factory_string(kind: str, rows: int, dim: int, opts: BuildOptions) -> tuple[str, dict[str, Any]]:
    if kind == "flat":
        return "Flat", {}
    if kind == "hnsw":
        return f"HNSW{opts.hnsw_m}", {"M": opts.hnsw_m}
    nlist = opts.nlist or nlist_for(rows)
    budget = (opts.memory / rows) if opts.memory else float(dim // 4 + ID_BYTES)  # default: 1 byte per 4 dims
    m = opts.pq_m or pq_m_for(dim, budget)
    if dim % m:
        raise SearchError(f"--pq-m {m} does not divide the embedding dimension {dim}")
    if rows < 39 * nlist or rows < 256:
        raise SearchError(f"ivfpq needs at least max(256, 39 x nlist={nlist}) vectors to train, have {rows}; "
                          "use --kind flat")
    return f"IVF{nlist},PQ{m}x8", {"nlist": nlist, "pq_m": m, "pq_bits": 8}


def open_sources(paths: list[Path], fingerprint: dict[str, Any] | None = None,
                 expected_from: str | None = None) -> list[EmbeddingSet]:
    """The embedding folders `paths`, each checked against `fingerprint` (that of `expected_from`; default: the
    first folder's): one index never mixes models, backends or precisions."""
    sources = [open_embeddings(p) for p in paths]
    expected = fingerprint or sources[0].fingerprint
    for embeddings in sources:
        check_fingerprint(expected, embeddings.fingerprint, where=expected_from or str(sources[0].root),
                          other=str(embeddings.root))
    return sources


def training_sample(sources: list[EmbeddingSet], count: int, rng: np.random.Generator,
                    train_on: str = "image") -> tuple[np.ndarray, str]:
    """Training vectors for IVF/PQ: image rows, or (`train_on="mixed"`, when captions exist) half image and
    half caption rows, or (`train_on="text"`, for a caption index) caption rows.

    Images are the default, from measurement (tests/test_index.py, bench_search.py): text queries lie away
    from the images (the modality gap), and quantisers trained on a mix spend lists and codewords on a region
    that holds no database vector, so text->image recall at equal nprobe came out lower, not higher. What
    recovers text recall is tuning nprobe on text queries too and rescoring candidates exactly (rerank).
    """
    total = sum(len(s) for s in sources)
    if train_on == "text":
        return _caption_rows(sources, total, count, rng), "text"
    mixed = train_on == "mixed" and all(s.has_text for s in sources)
    n_img = min(total, count - count // 2 if mixed else count)
    img = stored_rows(sources, np.sort(rng.choice(total, n_img, replace=False)), "img")
    if not mixed:
        return img, "image"
    return np.concatenate([img, _caption_rows(sources, total, count // 2, rng)]), "image+text"


def _caption_rows(sources: list[EmbeddingSet], total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Caption vectors [<= count, dim] of rows drawn at random among those whose image has a caption."""
    missing = uncaptioned_ids(sources)
    pool: int | np.ndarray = np.setdiff1d(np.arange(total), missing) if missing.size else total
    size = total - missing.size
    return stored_rows(sources, np.sort(rng.choice(pool, min(size, count), replace=False)), "text")


def query_sets(sources: list[EmbeddingSet], opts: BuildOptions,
               removed: Removed | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Held-out query rows (seeded, among the rows not removed): {'image': (ids, vectors), 'text': (ids,
    vectors) when captions exist}."""
    total = sum(len(s) for s in sources)
    rng = np.random.default_rng(opts.seed + 1)
    pool: int | np.ndarray = removed.live() if removed else total
    ids = np.sort(rng.choice(pool, min(opts.queries, total - len(removed or ())), replace=False))
    sets = {"image": (ids, stored_rows(sources, ids, "img"))}
    if all(s.has_text for s in sources):
        captioned = np.setdiff1d(ids, uncaptioned_ids(sources))  # an image without a caption has no text query
        if captioned.size:
            sets["text"] = (captioned, stored_rows(sources, captioned, "text"))
    return sets


def ground_truth(sources: list[EmbeddingSet], sets: dict[str, tuple[np.ndarray, np.ndarray]], k: int,
                 removed: Removed | None = None) -> dict:
    """Exact top-k ids per modality, plus for text the exact (positive, best-negative) pair scores."""
    truth: dict[str, Any] = {}
    for modality, (ids, vectors) in sets.items():
        scores, found = exact_topk(vector_chunks(sources), vectors, k + 1, removed)
        truth[modality] = drop_self(found, ids, k) if modality == "image" else found[:, :k]
        if modality == "text":
            truth["pairs"] = pair_scores(sources, ids, vectors, scores, found)
    return truth


def pair_scores(sources: list[EmbeddingSet], ids: np.ndarray, text: np.ndarray, scores: np.ndarray,
                found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each caption's similarity to its own image and its best similarity to any other image."""
    positive = np.einsum("nd,nd->n", text, stored_rows(sources, ids, "img"))  # [n]
    others = np.where(found != ids[:, None], scores, -np.inf)  # the own image masked out
    return positive, others.max(axis=1)


def caption_truth(sources: list[EmbeddingSet], sets: dict[str, tuple[np.ndarray, np.ndarray]], k: int,
                  removed: Removed | None = None) -> dict[str, np.ndarray]:
    """Exact top-k caption ids per query modality (`query_sets`' held-out rows): a caption query's own row is
    dropped, as an image query's is from the image index; an image query keeps its own caption. Images without
    a caption are never an answer."""
    truth = {}
    skip = caption_skip(sources, removed, sum(len(s) for s in sources))
    for modality, (ids, vectors) in sets.items():
        _, found = exact_topk(vector_chunks(sources, "text"), vectors, k + 1, skip)
        truth[modality] = drop_self(found, ids, k) if modality == "text" else found[:, :k]
    return truth


def query_hits(search: Callable[[np.ndarray, int], tuple], sets: dict, truth: dict, k: int,
               own: str = "image") -> dict[str, np.ndarray]:
    """Per query modality, each query's k-recall@k [n] of `search(queries, k)` against the exact `truth`. Queries
    of modality `own` are rows of the index searched (images in the image index, captions in the caption one)."""
    hits = {}
    for modality, (ids, vectors) in sets.items():
        if modality == own:  # one more, as the query's own row is dropped from the answer
            found = drop_self(search(vectors, k + 1)[1], ids, k)
        else:
            found = search(vectors, k)[1]
        hits[modality] = query_recalls(found, truth[modality])
    return hits


def measure_recall(search: Callable[[np.ndarray, int], tuple], sets: dict, truth: dict, k: int,
                   own: str = "image") -> dict[str, float]:
    """10-recall@10 (for k=10) per query modality: the mean of `query_hits`."""
    return {modality: round(float(h.mean()), 4) for modality, h in query_hits(search, sets, truth, k, own).items()}


def tune_search(index: Any, sources: list[EmbeddingSet], kind: str, params: dict, sets: dict, truth: dict,
                opts: BuildOptions, removed: Removed | None = None, role: str = "img") -> tuple[dict, dict, bool]:
    """The cheapest nprobe / efSearch reaching `target_recall` on every modality, the recall it gives, and
    whether the target was met.

    IVF-PQ: when no nprobe reaches the target with `opts.rerank`, PQ's ranking of the candidates is the limit
    (more lists only bring more vectors whose approximate scores misplace them), so the rescoring depth doubles,
    up to `opts.rerank_max`, until a scan of every list would reach the target; nprobe is then tuned at that
    depth. `role` "text": `index` holds the caption vectors (own queries: the held-out captions)."""
    rerank = opts.rerank if kind == "ivfpq" and opts.rerank > 1 else 0
    own = "text" if role == "text" else "image"

    def search(queries: np.ndarray, k: int) -> tuple:
        return search_faiss(index, sources, queries, k, rerank, removed, role)  # the depth in force when called

    if kind == "flat":
        return {}, measure_recall(search, sets, truth, opts.k, own), True
    name = "nprobe" if kind == "ivfpq" else "efSearch"
    limit = params["nlist"] if kind == "ivfpq" else 2048
    candidates = [2**i for i in range(int(math.log2(limit)) + 1)] if kind == "ivfpq" else \
        [v for v in (16, 32, 64, 128, 256, 512, 1024, 2048) if v >= opts.k]

    def recall_with(value: int) -> dict[str, float]:
        apply_search_params(index, {name: value})
        return measure_recall(search, sets, truth, opts.k, own)

    value, recall, met = tune(candidates, recall_with, opts.target_recall)
    if not met and rerank:
        while rerank < opts.rerank_max:
            rerank = min(opts.rerank_max, rerank * 2)
            if min(recall_with(candidates[-1]).values()) >= opts.target_recall:
                break
        value, recall, met = tune(candidates, recall_with, opts.target_recall)
    apply_search_params(index, {name: value})
    return {name: value, **({"rerank": rerank} if rerank else {})}, recall, met


def _write_faiss(index_dir: Path, index: Any, prefix: str) -> dict[str, Any]:
    """PREFIX-<sha>.faiss written atomically; its index.json entry {name, bytes, sha256}."""
    faiss = require("faiss")
    data = faiss.serialize_index(index).tobytes()  # type: ignore[attr-defined]
    digest = __import__("hashlib").sha256(data).hexdigest()
    name = f"{prefix}-{digest[:16]}.faiss"
    atomic_write(index_dir / name, lambda tmp: tmp.write_bytes(data))
    return {"name": name, "bytes": len(data), "sha256": digest}


def write_index(index_dir: Path, index: Any, info: dict[str, Any], captions: Any = None) -> dict[str, Any]:
    """index-<sha>.faiss (and captions-<sha>.faiss with a caption index), then index.json naming them (the commit
    point), then older index files removed."""
    info["index_file"] = _write_faiss(index_dir, index, "index")
    info["bytes_per_vector"] = round(info["index_file"]["bytes"] / max(1, index.ntotal), 2)
    if captions is not None:
        info["captions"]["index_file"] = _write_faiss(index_dir, captions, "captions")
    else:
        info.pop("captions", None)
    atomic_write_text(index_dir / INFO_FILE, json.dumps(info, indent=1, sort_keys=True))
    current = {info["index_file"]["name"], *([info["captions"]["index_file"]["name"]] if captions is not None else [])}
    for stale in [*index_dir.glob("index-*.faiss"), *index_dir.glob("captions-*.faiss")]:
        if stale.name not in current:
            stale.unlink()
    return info


def _recall_record(opts: BuildOptions, sets: dict, live: int, recall: dict, met: bool) -> dict[str, Any]:
    return {"k": opts.k, "metric": f"{opts.k}-recall@{opts.k}", "queries": len(sets["image"][0]),
            "target": opts.target_recall, "target_met": met, "seed": opts.seed, "rows": live, **recall}


def finish(index_dir: Path, index: Any, sources: list[EmbeddingSet], info: dict, opts: BuildOptions,
           removed: Removed | None = None, measure: bool = True, captions: Any = None) -> dict:
    """Measure (recall per modality, tuned search params, threshold; the same for the `captions` index, whose
    build record `info["captions"]` holds) over the rows not `removed` and write index (+ caption index) +
    index.json (which records `removed`); with `measure` False the stored measurements are kept."""
    live = int(index.ntotal) - len(removed or ())
    if measure:
        sets = query_sets(sources, opts, removed)
        truth = ground_truth(sources, sets, opts.k, removed)
        search, recall, met = tune_search(index, sources, info["kind"], info["build"], sets, truth, opts, removed)
        info.update(search=search, unmeasured_changes=0, recall=_recall_record(opts, sets, live, recall, met))
        info["threshold"] = no_match_threshold(*truth["pairs"]) if "pairs" in truth else None
        if captions is not None:
            record = info["captions"]
            skip = caption_skip(sources, removed, int(index.ntotal))
            search, recall, met = tune_search(captions, sources, record["kind"], record["build"], sets,
                                              caption_truth(sources, sets, opts.k, removed), opts, skip, "text")
            record.update(search=search, recall=_recall_record(opts, sets, live, recall, met))
    info["rows"] = int(index.ntotal)
    info["sources"] = [{"path": os.path.relpath(s.root.resolve(), index_dir.resolve()), "rows": len(s),
                        "manifest_sha256": sha256_file(s.root / "manifest.json")} for s in sources]
    info.pop("removed", None)
    if removed:
        info["removed"] = removed.ids.tolist()
    info["live_rows"] = live
    return write_index(index_dir, index, info, captions)


def _new_faiss(sources: list[EmbeddingSet], dim: int, factory: str, params: dict[str, Any], opts: BuildOptions,
               role: str) -> tuple[Any, str | None]:
    """An index from `factory`, trained (IVF-PQ) on a sample of the `role` vectors ("img": as `train_on` says;
    "text": captions), holding every row's `role` vector; and what it was trained on."""
    faiss = require("faiss")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # type: ignore[attr-defined]
    trained_on = None
    if not index.is_trained:
        rows = sum(len(s) for s in sources)
        # 40 points per list (faiss warns below 39) and at least 39 x 256 for the PQ codebooks
        count = min(rows, max(39 * 256, 40 * params.get("nlist", 1)))
        sample, trained_on = training_sample(sources, count, np.random.default_rng(opts.seed),
                                             "text" if role == "text" else opts.train_on)
        # polysemous codes (on by default in IndexIVFPQ) only speed up Hamming-filtered search, which we do
        # not use, and their annealing dominates training time
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False  # type: ignore
        index.train(sample)
    for _, vectors in index_chunks(sources, role):
        index.add(vectors)
    return index, trained_on


def build_index(embeddings_dirs: list[str | Path], index_dir: str | Path, opts: BuildOptions | None = None) -> dict:
    """Build an index over the embedding directories; returns the index.json it wrote."""
    require("faiss")  # a clear error before any work when faiss is missing
    opts = opts or BuildOptions()
    if opts.kind not in KINDS:
        raise SearchError(f"--kind: expected one of {', '.join(KINDS)}, got {opts.kind!r}")
    if opts.train_on not in ("image", "mixed"):
        raise SearchError(f"--train-on: expected image or mixed, got {opts.train_on!r}")
    if opts.rerank < 0 or (opts.rerank > 1 and opts.rerank_max < opts.rerank):
        raise SearchError(f"--rerank {opts.rerank} / --rerank-max {opts.rerank_max}: expected 0 <= --rerank <= "
                          "--rerank-max (equal pins the depth)")
    sources = open_sources([Path(p) for p in embeddings_dirs])
    rows, dim = sum(len(s) for s in sources), sources[0].dim
    if rows == 0:
        raise SearchError(f"{', '.join(str(s.root) for s in sources)}: empty collection (0 embedded images)")
    kind = choose_kind(rows, dim, opts.memory) if opts.kind == "auto" else opts.kind
    factory, params = factory_string(kind, rows, dim, opts)
    started = time.perf_counter()
    index, trained_on = _new_faiss(sources, dim, factory, params, opts, "img")
    build = {**params, "factory": factory, "trained_on": trained_on, "seconds": 0.0,
             "options": {k: v for k, v in asdict(opts).items() if v is not None}}
    info = {"format": INDEX_FORMAT, "version": 1, "kind": kind, "build": build, "dim": dim,
            "fingerprint": sources[0].fingerprint, "model": sources[0].manifest.get("model"),
            "backend": backend_of(sources[0].fingerprint)}
    build["seconds"] = round(time.perf_counter() - started, 3)
    captions = None
    # a flat caption index holds a float32 copy of the captions in RAM: 12x faster than scanning the stored
    # float16 parts (bench_search.py, 100k x 512), within --memory if one was given
    fits = kind != "flat" or opts.memory is None or 2 * rows * dim * 4 <= opts.memory
    if opts.caption_index and fits and all(s.has_text for s in sources):
        started = time.perf_counter()
        captions, trained_on = _new_faiss(sources, dim, factory, params, opts, "text")
        info["captions"] = {"kind": kind, "build": {**params, "factory": factory, "trained_on": trained_on,
                                                    "seconds": round(time.perf_counter() - started, 3)}}
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    return finish(Path(index_dir), index, sources, info, opts, captions=captions)


def index_has_captions(index_dir: str | Path) -> bool:
    """Whether every embedding folder of a built index holds caption vectors (what caption search needs), from the
    folders' manifests alone (`VectorIndex.has_captions` without opening the faiss files)."""
    info = load_index_info(Path(index_dir))
    return all(open_embeddings(resolve_source(Path(index_dir), s["path"])).has_text for s in info["sources"])


def add_to_index(index_dir: str | Path, embeddings_dirs: list[str | Path], opts: BuildOptions | None = None,
                 remove: np.ndarray | list[int] | None = None, extra_info: dict[str, Any] | None = None,
                 measure: bool | None = True) -> dict:
    """Append new embedding directories to a built index (IVF: into the trained lists) and mark the ids
    `remove` as removed (kept with those removed before), then re-measure; index.json (with `extra_info`
    merged in) is the one commit. `measure=None` re-measures only once the rows added and removed since the
    last measurement pass REMEASURE_FRACTION of the live rows (what `index sync` does)."""
    index_dir = Path(index_dir)
    info = load_index_info(index_dir)
    old = [open_embeddings(resolve_source(index_dir, s["path"])) for s in info["sources"]]
    new = open_sources([Path(p) for p in embeddings_dirs], info["fingerprint"], f"index {index_dir}") \
        if embeddings_dirs else []
    known = {s.root.resolve() for s in old}
    for embeddings in new:
        if embeddings.root.resolve() in known:
            raise SearchError(f"{embeddings.root}: already in the index {index_dir}")
    index = read_faiss(index_dir / info["index_file"]["name"], int(info["index_file"]["bytes"]))
    for _, vectors in vector_chunks(new):
        index.add(vectors)
    # the caption index takes the new rows' captions; a folder without any ends caption search (has_captions)
    # and so the caption index with it
    captions = open_caption_index(index_dir, info) if all(s.has_text for s in new) else None
    if captions is not None:
        for _, vectors in index_chunks(new, "text"):
            captions.add(vectors)
    base = opts or BuildOptions(**{k: v for k, v in info["build"].get("options", {}).items()
                                   if k in BuildOptions.__dataclass_fields__})
    info["added"] = info.get("added", 0) + sum(len(s) for s in new)
    total = sum(len(s) for s in old + new)
    removed = Removed(np.concatenate([np.asarray(info.get("removed", []), dtype=np.int64),
                                      np.asarray(remove if remove is not None else [], dtype=np.int64)]),
                      total, f"index {index_dir}: removed ids")
    if len(removed) == total:
        raise SearchError(f"index {index_dir}: every row would be removed; build a new index instead")
    info.update(extra_info or {})
    if measure is None:
        pending = int(info.get("unmeasured_changes", 0)) + sum(len(s) for s in new) \
            + len(removed) - len(info.get("removed", []))
        measure = "rows" not in info.get("recall", {}) or pending > REMEASURE_FRACTION * (total - len(removed))
        if not measure:
            info["unmeasured_changes"] = pending
    return finish(index_dir, index, old + new, info, base, removed, measure, captions)
