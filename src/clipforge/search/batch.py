"""Many queries at once: `clipforge search INDEX --queries FILE`, `Searcher.search_batch`.

Answering queries one by one runs the model once per query and the index once per query. Here every distinct
text of all queries is embedded once, in batches of `TEXT_BATCH`, every distinct image in batches of
`IMAGE_BATCH`, and the index is searched once for all query vectors (one matrix product for a flat index), so a
file of thousands of queries costs little more than its forward passes at a full batch. The answers are those
of `Searcher.search_terms` for each query. A query that cannot be answered (malformed, an empty or over-long text,
an image that cannot be read, terms that cancel out) gets `{"error": ...}` in its place, or stops the batch
(`on_error="raise"`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import SearchError
from .query import (
    QueryTerm,
    calibrated_for,
    check_modality,
    combine,
    own_images,
    parse_query,
)

if TYPE_CHECKING:
    from .searcher import SearchAnswer, Searcher

TEXT_BATCH = 256
IMAGE_BATCH = 32
SEARCH_BATCH = 1024  # query vectors per index search (bounds the [q, k] answer arrays)
CSV_COLUMNS = ("line", "query", "rank", "id", "score", "key", "caption", "path", "no_good_match", "duplicates",
               "error")


def read_queries(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file of queries ('-': standard input)."""
    name = "standard input" if str(path) == "-" else str(path)
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise SearchError(f"--queries {name}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SearchError(f"--queries {name}: line {line} is not UTF-8 text") from None
    queries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not queries:
        raise SearchError(f"--queries {name}: no queries in it (one query per line, in the query language)")
    return queries


def _image_key(value: Any) -> Any:
    """Images named by path are embedded once however many queries use them; bytes and PIL images per term."""
    return ("path", str(value)) if isinstance(value, (str, Path)) else ("object", id(value))


def search_batch(searcher: Searcher, queries: Sequence[str | Sequence[QueryTerm]], k: int = 10,
                 dedup: float | None = None, allow_paths: bool = False,
                 on_error: Literal["record", "raise"] = "record", modality: str = "image",
                 under: str | Sequence[str] | None = None) -> list[SearchAnswer | dict[str, str]]:
    """The answers of `queries` in order: each a query-language string (`allow_paths`: a term naming an image
    file is that image, as on the command line) or parsed terms. A query that cannot be answered gets
    {"error": message} (`on_error="record"`), or the first failure found raises SearchError naming its query
    (`"raise"`; malformed queries are found before any forward pass, bad texts before any image is read).
    `under` searches every query among the images under those folders (`scope.py`)."""
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error: expected 'record' or 'raise', got {on_error!r}")
    k, modality = searcher.check_k(k, searcher.index.scope(under)), check_modality(modality)
    errors: dict[int, str] = {}
    parsed: list[list[QueryTerm]] = []
    for i, query in enumerate(queries):
        try:
            terms = parse_query(query, allow_paths) if isinstance(query, str) else list(query)
            if not terms:
                raise SearchError("query is empty: give a text, an image, or both")
        except SearchError as exc:
            errors[i], terms = str(exc), []
        parsed.append(terms)

    def fail(i: int, message: str) -> None:
        errors.setdefault(i, message)
        if on_error == "raise":
            shown = queries[i] if isinstance(queries[i], str) else " ".join(t.describe() for t in parsed[i])
            raise SearchError(f"query {i + 1} ({str(shown)[:80]!r}): {message}")

    for i in sorted(errors):
        fail(i, errors[i])
    texts = _embed_texts(searcher, parsed, errors, fail)
    images = _embed_images(searcher, parsed, errors, fail)

    vectors: dict[int, np.ndarray] = {}
    for i, terms in enumerate(parsed):
        if i in errors:
            continue
        try:
            rows = [texts[t.value] if t.kind == "text" else images[_image_key(t.value)] if t.kind == "image"
                    else searcher.id_vectors([t.value])[0] if t.kind == "id"
                    else searcher.check_embedding(t.value) for t in terms]
            vectors[i] = combine(np.stack(rows), [t.weight for t in terms])
        except SearchError as exc:
            fail(i, str(exc))

    answers = _search_vectors(searcher, vectors, parsed, k, dedup, modality, under)
    return [answers[i] if i in answers else {"error": errors[i]} for i in range(len(queries))]


def _search_vectors(searcher: Searcher, vectors: dict[int, np.ndarray], parsed: list[list[QueryTerm]], k: int,
                    dedup: float | None, modality: str, under: str | Sequence[str] | None) -> dict[int, SearchAnswer]:
    """The answer of each query vector: one index search for them all, except where a query has its own images
    to leave out (`#N` terms) or dedup walks each ranking on its own."""
    answers: dict[int, SearchAnswer] = {}
    threshold = {i: searcher.threshold if calibrated_for(parsed[i]) and modality == "image" else None
                 for i in vectors}
    together = [i for i in sorted(vectors) if dedup is None and not own_images(parsed[i], modality)]
    for start in range(0, len(together), SEARCH_BATCH):
        chunk = together[start:start + SEARCH_BATCH]
        found = searcher.search_vectors(np.stack([vectors[i] for i in chunk]), k,  # [chunk, d]
                                        [threshold[i] for i in chunk], modality=modality, under=under)
        answers.update(zip(chunk, found))
    for i in sorted(set(vectors) - set(together)):
        answers[i] = searcher.search_vector(vectors[i], k, threshold[i], exclude=own_images(parsed[i], modality),
                                            dedup=dedup, modality=modality, under=under)
    return answers


def _embed_texts(searcher: Searcher, parsed: list[list[QueryTerm]], errors: dict[int, str],
                 fail: Any) -> dict[str, np.ndarray]:
    """{text: its embedding [d]} of every text term of the queries still standing; a bad text fails its queries."""
    users: dict[str, list[int]] = {}
    for i, terms in enumerate(parsed):
        for term in terms:
            if term.kind == "text" and i not in errors:
                users.setdefault(term.value, []).append(i)
    good = []
    for text, who in users.items():
        try:
            searcher.check_text(text)
            good.append(text)
        except SearchError as exc:
            for i in who:
                fail(i, str(exc))
    embedded: dict[str, np.ndarray] = {}
    for start in range(0, len(good), TEXT_BATCH):
        chunk = good[start:start + TEXT_BATCH]
        embedded.update(zip(chunk, searcher.encode_texts(chunk)))
    return embedded


def _embed_images(searcher: Searcher, parsed: list[list[QueryTerm]], errors: dict[int, str],
                  fail: Any) -> dict[Any, np.ndarray]:
    """{image key: its embedding [d]} of every image term of the queries still standing."""
    users: dict[Any, tuple[Any, list[int]]] = {}
    for i, terms in enumerate(parsed):
        for term in terms:
            if term.kind == "image" and i not in errors:
                users.setdefault(_image_key(term.value), (term.value, []))[1].append(i)
    embedded: dict[Any, np.ndarray] = {}
    pending: list[tuple[Any, torch.Tensor]] = []

    def flush() -> None:
        pixels = torch.stack([p for _, p in pending])  # [n, 3, S, S]
        embedded.update(zip([key for key, _ in pending], searcher.encode_pixels(pixels)))
        pending.clear()

    for key, (value, who) in users.items():
        if all(i in errors for i in who):  # its queries failed on a text already
            continue
        try:
            pending.append((key, searcher.pixels(value)))
        except SearchError as exc:
            for i in who:
                fail(i, str(exc))
        if len(pending) == IMAGE_BATCH:
            flush()
    if pending:
        flush()
    return embedded


def batch_records(lines: Sequence[tuple[int, str]], answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON-ready record per query: its line number and text, then its answer or its error."""
    return [{"line": n, "query": text, **answer} for (n, text), answer in zip(lines, answers)]


def format_records(records: Sequence[dict[str, Any]], kind: str) -> str:
    """JSON lines ('jsonl': one record per query) or CSV ('csv': `CSV_COLUMNS`, one row per result, and one row
    per failed query with only `line`, `query` and `error`; `duplicates` holds hidden ids, space-separated)."""
    if kind == "jsonl":
        return "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        if "error" in record:
            writer.writerow([record["line"], record["query"], *[""] * (len(CSV_COLUMNS) - 3), record["error"]])
            continue
        for rank, hit in enumerate(record["results"], 1):
            writer.writerow([record["line"], record["query"], rank, hit["id"], f"{hit['score']:.6f}",
                             hit["key"] or "", hit["caption"] or "", hit["path"] or "",
                             int(record["no_good_match"]), " ".join(map(str, hit.get("duplicates", []))), ""])
    return out.getvalue()


def output_kind(path: str) -> str:
    """'csv' for a .csv path, else 'jsonl'."""
    return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"
