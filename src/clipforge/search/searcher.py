"""`Searcher`: a built index plus the model that embedded it, answering text, image and mixed queries.

    from clipforge import Searcher
    searcher = Searcher("runs/demo-index")
    answer = searcher.search(text="a red circle", k=5)
    answer = searcher.search(text=[("beach", 1.0), ("people", -1.0)], image="photo.jpg")
    for hit in answer["results"]:
        print(hit["score"], hit["key"], hit["caption"], hit["path"])

The model and backend are the ones recorded in index.json (or a model given), and the encoder's fingerprint
must equal the index's: a query embedded by another model, or by the same model through another backend or
precision (torch, ONNX fp32, ONNX int8), would return wrong neighbours silently, so that is refused at start.
Model inference runs under a lock (one forward at a time; torch uses its own threads inside); the faiss
search itself is thread-safe, so a Searcher may be shared by the threads of a server. Searchers given one
`encoders` dict (`open_searchers` does this) load each distinct model once and share it, with its lock.

`dedup=T` collapses near-duplicates (`dedup.collapse`): a hit within cosine T of a better one is listed under it
(`duplicates`) instead of taking a place in the top k. Listeners added with `add_timing_listener` hear how long
each stage of a query took (the server's /metrics).
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from .dedup import check_threshold, collapse
from .errors import SearchError
from .query import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    QueryTerm,
    as_terms,
    calibrated_for,
    check_modality,
    combine,
    embedding_terms,
    open_image,
    own_images,
)
from .scope import Scope

DEFAULT_LABEL_TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image of {}.", "{}.")
# With dedup, candidates are fetched k x DEDUP_FETCH at first, then 4x more until k distinct are found or this
# many were examined: a query that hits a cluster of thousands of copies answers with fewer than k results
# rather than scanning the collection.
DEDUP_FETCH = 4
DEDUP_MAX_CANDIDATES = 8192
STAGES = ("encode_text", "encode_image", "knn", "metadata")  # what timing listeners hear about
# One lock per loaded encoder, however many Searchers share it: a forward pass at a time per model.
_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(encoder: Any) -> threading.Lock:
    """The lock that serialises `encoder`'s forward passes (the same object for every Searcher using it)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(encoder)
        if lock is None:
            lock = _MODEL_LOCKS[encoder] = threading.Lock()
        return lock


class _Hit(TypedDict):
    id: int
    score: float
    key: str | None
    caption: str | None
    path: str | None


class SearchHit(_Hit, total=False):
    duplicates: list[int]  # with dedup: ids hidden under this hit, best first


class _Answer(TypedDict):
    results: list[SearchHit]
    no_good_match: bool
    threshold: float | None


class SearchAnswer(_Answer, total=False):
    modality: str  # "text" when the captions' embeddings were searched
    under: list[str]  # with a scope: the folders searched (scope.normalize_under)
    dedup: float  # with dedup: the cosine threshold
    hidden: int  # with dedup: candidates hidden (under a hit, or as copies of the query image)


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of `text` including the start/end tokens, before any truncation."""
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
    if inner is not None:
        return len(inner(text)["input_ids"])
    return len(tokenizer.encode(text)) + 2


def resolve_model_path(spec: str, index_dir: Path, embeddings_dir: str | None) -> str:
    """A model path as recorded (absolute, or relative to the working directory, the index or the embeddings)."""
    for base in (Path.cwd(), index_dir, Path(embeddings_dir) if embeddings_dir else None):
        if base is not None and (base / spec).exists():
            return str(base / spec)
    return spec  # an architecture name, or a path that is gone (the encoder's loader names it)


def _threshold_of(info: dict[str, Any]) -> float | None:
    """The calibrated no-good-match score of an index.json; None where none was (measure.UNSEPARATED)."""
    score = (info.get("threshold") or {}).get("score")
    return float(score) if score is not None else None


def encoder_key(spec: str | Path | torch.nn.Module, backend: str, device: str | torch.device | None) -> tuple:
    """What makes two query encoders the same: the model (the file it resolves to, or the module object), the
    backend and the requested device."""
    if isinstance(spec, torch.nn.Module):
        model: Any = ("module", id(spec))
    else:
        path = Path(str(spec))
        model = ("path", str(path.resolve())) if path.exists() else ("name", str(spec))
    return model, backend, None if device is None else str(device)


def load_query_encoder(spec: str | Path | torch.nn.Module, device: str | torch.device | None,
                       backend: str = "torch") -> Any:
    """The encoder `embed` uses (same backend, preprocessing and tokenizer), for a model given or named by a
    path/name (an export folder for the onnx backends)."""
    from .encoder import TorchEncoder, load_encoder, resolve_device

    if isinstance(spec, torch.nn.Module):
        return TorchEncoder(spec, type(spec).__name__, resolve_device(None if device is None else str(device)))
    try:
        return load_encoder(str(spec), backend, device=None if device is None else str(device))
    except FileNotFoundError:
        raise SearchError(f"model {spec}: no such file, run directory or architecture name") from None


def _id_set(exclude: int | Sequence[int] | None) -> frozenset[int]:
    if exclude is None:
        return frozenset()
    return frozenset([int(exclude)] if isinstance(exclude, (int, np.integer)) else (int(i) for i in exclude))


class Searcher:
    """Search an index built by `clipforge index build` with text, images, or weighted mixtures of both."""

    def __init__(self, index_dir: str | Path, model: str | Path | torch.nn.Module | None = None,
                 device: str | torch.device | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 mmap: bool = False, backend: str | None = None, encoders: dict[tuple, Any] | None = None) -> None:
        """`encoders`: a cache shared by Searchers (keyed by `encoder_key`), so that indices embedded by one
        model load it once; the encoder is still checked against each index's fingerprint."""
        from .fingerprint import backend_of, check_fingerprint
        from .index import open_index

        self.index = open_index(index_dir, mmap=mmap)
        self.info: dict[str, Any] = self.index.info
        self._mmap = mmap
        recorded_backend = backend_of(self.index.fingerprint)  # index.json's "backend" repeats it for readers
        if backend is not None and backend != recorded_backend:
            raise SearchError(f"--backend {backend}: index {index_dir} was embedded with --backend "
                              f"{recorded_backend}; query it with that backend (the default), or embed and "
                              f"index again with --backend {backend}")
        if model is None:
            recorded = self.info.get("model")
            if not recorded:
                raise SearchError(f"{index_dir}/index.json records no model; pass one (--model PATH)")
            model = resolve_model_path(str(recorded), Path(index_dir), self.info.get("embeddings_dir"))
        key = encoder_key(model, recorded_backend, device)
        if encoders is not None and key in encoders:
            self.encoder = encoders[key]
        else:
            self.encoder = load_query_encoder(model, device, recorded_backend)
            if encoders is not None:
                encoders[key] = self.encoder
        self.backend: str = recorded_backend
        check_fingerprint(self.index.fingerprint, self.encoder.fingerprint, where=f"index {index_dir}")
        self.model = self.encoder.model
        self.context_length = int(getattr(self.model, "context_length", 77))
        self.max_pixels = max_pixels
        self._lock = model_lock(self.encoder)  # one forward pass at a time; the index search needs no lock
        self.threshold: float | None = _threshold_of(self.info)
        self._listeners: list[Callable[[str, float], None]] = []

    def __len__(self) -> int:
        return len(self.index)

    def reopened(self) -> Searcher:
        """A Searcher over this index as its index.json now stands (after `index add` or `index sync`), sharing
        this one's encoder, model lock and timing listeners; this one is left as it was, so a query running on
        it finishes on the index it started with."""
        from .fingerprint import check_fingerprint
        from .index import open_index

        fresh = copy.copy(self)
        fresh.index = open_index(self.index.index_dir, mmap=self._mmap)
        check_fingerprint(fresh.index.fingerprint, self.encoder.fingerprint, where=f"index {self.index.index_dir}")
        fresh.info = fresh.index.info
        fresh.threshold = _threshold_of(fresh.info)
        return fresh

    def add_timing_listener(self, listener: Callable[[str, float], None]) -> None:
        """Call `listener(stage, seconds)` after each stage of each query (stages: `STAGES`; encode times
        include waiting for the model lock). Adding the same listener again has no effect."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        if not self._listeners:
            yield
            return
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        for listener in self._listeners:
            listener(stage, elapsed)

    def check_text(self, text: str) -> str:
        """The text, stripped; SearchError when it is empty or longer than the model's context."""
        if not isinstance(text, str) or not text.strip():
            raise SearchError("text query is empty")
        count = token_count(self.encoder.tokenizer, text)
        if count > self.context_length:
            raise SearchError(f"text query is {count} tokens long; this model reads at most {self.context_length} "
                              "(shorten it)")
        return text.strip()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised text embeddings [n, d] (float32)."""
        texts = [self.check_text(t) for t in texts]
        with self._timed("encode_text"), self._lock:
            return self.encoder.encode_text(texts)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Normalised image embeddings [n, d] (float32) of paths, bytes or PIL images."""
        with self._timed("encode_image"):
            return self._encode_pixels(torch.stack([self.pixels(i) for i in images]))

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """The model's input [3, S, S] for an image (SearchError when it cannot be read or is too large)."""
        return self.encoder.preprocess(open_image(image, self.max_pixels))

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Normalised image embeddings [n, d] of preprocessed images [n, 3, S, S] (`pixels`)."""
        with self._timed("encode_image"):
            return self._encode_pixels(pixels)

    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        with self._lock:
            return self.encoder.encode_image(pixels)

    def query_vector(self, terms: Sequence[QueryTerm]) -> np.ndarray:
        """The normalised weighted sum of the terms' embeddings [d]."""
        if not terms:
            raise SearchError("query is empty: give a text, an image, or both")
        texts = [t for t in terms if t.kind == "text"]
        images = [t for t in terms if t.kind == "image"]
        given = [t for t in terms if t.kind == "embedding"]
        indexed = [t for t in terms if t.kind == "id"]
        vectors, weights = [], []
        if texts:
            vectors.append(self.encode_texts([t.value for t in texts]))
            weights += [t.weight for t in texts]
        if images:
            vectors.append(self.encode_images([t.value for t in images]))
            weights += [t.weight for t in images]
        if given:
            vectors.append(np.stack([self.check_embedding(t.value) for t in given]))
            weights += [t.weight for t in given]
        if indexed:
            vectors.append(self.id_vectors([t.value for t in indexed]))
            weights += [t.weight for t in indexed]
        return combine(np.concatenate(vectors), weights)

    def id_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored image embeddings of images of this index [n, d], normalised (query terms `#N`)."""
        vectors = np.stack([self.index.image_vector(int(i)) for i in ids])  # each id checked, named if bad
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def check_embedding(self, vector: np.ndarray) -> np.ndarray:
        """A given query vector [d], if its length is the index's; SearchError otherwise."""
        if vector.shape != (self.index.dim,):
            raise SearchError(f"embedding: {vector.size} numbers, this index holds {self.index.dim}-d vectors "
                              f"(embed the query with its model: {Path(str(self.info.get('model') or '?')).name})")
        return vector

    def search_vector(self, vector: np.ndarray, k: int = 10, threshold: float | None = None,
                      exclude: int | Sequence[int] | None = None, dedup: float | None = None, *,
                      modality: str = "image", under: str | Sequence[str] | None = None) -> SearchAnswer:
        """Top-k hits of a normalised query vector [d]; `no_good_match` when the best score is under
        `threshold` (None: not judged). `exclude` drops ids (the query's own images, whose copies `dedup`
        hides too). `dedup`: a cosine; hits that close to a better hit are listed under it, not in the top k.
        `modality` "text" ranks the images by their stored caption embeddings instead (`MODALITIES`). `under`:
        only the images under these folders (keys or absolute paths: `scope.py`)."""
        scope = self.index.scope(under)
        k, modality = self.check_k(k, scope), check_modality(modality)
        if dedup is not None:
            try:
                dedup = check_threshold(dedup)
            except ValueError as exc:
                raise SearchError(str(exc)) from None
        if dedup is None:
            return self.search_vectors(vector[None, :], k, [threshold], exclude, modality=modality, under=under)[0]
        keep, duplicates, hidden = self._distinct(vector, k, exclude, dedup, modality, scope)
        answer = self._answer(keep, threshold, modality, scope)
        for hit in answer["results"]:
            hit["duplicates"] = duplicates[hit["id"]]
        answer["dedup"], answer["hidden"] = dedup, hidden
        return answer

    def search_vectors(self, vectors: np.ndarray, k: int, thresholds: Sequence[float | None],
                       exclude: int | Sequence[int] | None = None, *, modality: str = "image",
                       under: str | Sequence[str] | None = None) -> list[SearchAnswer]:
        """`search_vector` (without dedup) for many normalised query vectors [q, d] in one index search: the
        answer of row i is judged by `thresholds[i]`."""
        scope = self.index.scope(under)
        k, modality = self.check_k(k, scope), check_modality(modality)
        return [self._answer(found[:k], threshold, modality, scope)
                for found, threshold in zip(self._candidates(vectors, k, exclude, modality, scope), thresholds)]

    def check_k(self, k: Any, scope: Scope | None = None) -> int:
        """k as an int no larger than the index (or the scope); SearchError unless a positive integer."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k: expected a positive integer, got {k!r}")
        return min(int(k), len(scope) if scope is not None else len(self.index))

    def _answer(self, keep: list[tuple[float, int]], threshold: float | None, modality: str = "image",
                scope: Scope | None = None) -> SearchAnswer:
        hits = self.hits([i for _, i in keep], [s for s, _ in keep])
        best = hits[0]["score"] if hits else float("-inf")
        answer: SearchAnswer = {"results": hits, "no_good_match": threshold is not None and best < threshold,
                                "threshold": threshold}
        if modality != "image":
            answer["modality"] = modality
        if scope is not None:
            answer["under"] = list(scope.folders)
        return answer

    def _candidates(self, vectors: np.ndarray, fetch: int, exclude: int | Sequence[int] | None,
                    modality: str = "image", scope: Scope | None = None) -> list[list[tuple[float, int]]]:
        """Per query row of `vectors` [q, d]: (score, id) of the best `fetch` ids, best first and equal scores by
        id (faiss leaves their order open: byte-identical copies would swap places between runs), without
        `exclude` and faiss's -1 padding."""
        search = self.index.search if modality == "image" else self.index.search_captions
        rows, dropped = len(scope) if scope is not None else len(self.index), _id_set(exclude)
        with self._timed("knn"):
            scores, ids = search(vectors, min(fetch + len(dropped), rows), scope)  # [q, fetch]
        return [sorted(((float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0 and i not in dropped),
                       key=lambda hit: (-hit[0], hit[1])) for row_scores, row_ids in zip(scores, ids)]

    def _distinct(self, vector: np.ndarray, k: int, exclude: int | Sequence[int] | None, dedup: float,
                  modality: str = "image",
                  scope: Scope | None = None) -> tuple[list[tuple[float, int]], dict[int, list[int]], int]:
        """Up to k near-duplicate-free hits, the ids hidden under each, and how many were hidden in all."""
        dropped = _id_set(exclude)
        seed = self.index.image_vectors(sorted(dropped)) if dropped else None  # [m, d]
        most = min(len(scope) if scope is not None else len(self.index), DEDUP_MAX_CANDIDATES)
        fetch = min(k * DEDUP_FETCH, most)
        while True:
            candidates = self._candidates(vector[None, :], fetch, exclude, modality, scope)[0]
            outcome = collapse(self.index.image_vectors([i for _, i in candidates]), dedup, k, seed)
            if outcome.complete or fetch >= most:
                break
            fetch = min(fetch * 4, most)
        keep = [candidates[p] for p in outcome.shown]
        duplicates = {candidates[p][1]: [candidates[q][1] for q in outcome.hidden_under[p]] for p in outcome.shown}
        return keep, duplicates, outcome.hidden

    def search_terms(self, terms: Sequence[QueryTerm], k: int = 10, dedup: float | None = None, *,
                     modality: str = "image", under: str | Sequence[str] | None = None) -> SearchAnswer:
        """Search with parsed terms. The no-good-match threshold is calibrated on caption -> image scores, so it
        judges text-only queries of the image modality; for the others the answer's threshold is None."""
        judged = calibrated_for(terms) and modality == "image"
        return self.search_vector(self.query_vector(terms), k, self.threshold if judged else None,
                                  exclude=own_images(terms, modality), dedup=dedup, modality=modality, under=under)

    def search(self, text: Any = None, image: Any = None, k: int = 10, dedup: float | None = None,
               embedding: Any = None, modality: str = "image", under: str | Sequence[str] | None = None,
               ids: Any = None) -> SearchAnswer:
        """Search by text, image or both. Each may be one value, a list, or a list of (value, weight) pairs
        (negative weights push away); texts may also be a {text: weight} dict. Images are paths, bytes or
        PIL images; `embedding` adds query vectors computed elsewhere by the index's model ([d], [n, d] or
        (vector, weight) pairs). Returns {"results": [{id, score, key, caption, path}], "no_good_match", "threshold"};
        with `dedup` (a cosine, e.g. 0.95) near-duplicates of a better hit go into its "duplicates" list;
        `modality="text"` matches the query against the stored captions' embeddings instead of the images';
        `under` (a folder, or a list) searches only the images under it: a key prefix such as "2019/summer" or
        an absolute path (`scope.py`); `ids` adds images of this index by id, as the query language's `#N`
        (`ids=[(42, 1.0), (17, -0.5)]`: like 42, unlike 17; those weighted positively are left out of the answer)."""
        terms = as_terms(text, "text") + as_terms(image, "image") + embedding_terms(embedding) + as_terms(ids, "id")
        return self.search_terms(terms, k, dedup, modality=modality, under=under)

    def search_by_id(self, id_: int, k: int = 10, dedup: float | None = None, modality: str = "image",
                     under: str | Sequence[str] | None = None) -> SearchAnswer:
        """Images most like image `id_` of the index (itself, and with `dedup` its copies, left out); with
        `modality="text"`, the images whose captions best describe it (its own caption included); `under`
        as in `search` (image `id_` itself may lie anywhere)."""
        vector = self.index.image_vector(id_)
        exclude = int(id_) if check_modality(modality) == "image" else None
        return self.search_vector(vector / max(float(np.linalg.norm(vector)), 1e-12), k, None, exclude=exclude,
                                  dedup=dedup, modality=modality, under=under)

    def search_batch(self, queries: Sequence[str | Sequence[QueryTerm]], k: int = 10, dedup: float | None = None,
                     allow_paths: bool = False, on_error: str = "record", modality: str = "image",
                     under: str | Sequence[str] | None = None) -> list[Any]:
        """Answers of many queries (query-language strings or parsed terms), embedded in batches and searched
        in one index call: `batch.search_batch`. A failed query's place holds {"error": message} (or, with
        on_error="raise", the first failure raises SearchError)."""
        from .batch import search_batch

        return search_batch(self, queries, k, dedup, allow_paths, on_error, modality,  # type: ignore[arg-type]
                            under)

    def filter(self, text: Any = None, image: Any = None, min_score: float | None = None,
               limit: int | None = None, under: str | Sequence[str] | None = None) -> list[SearchHit]:
        """Every image scoring at least `min_score` against the query (the `search` query forms), best first:
        an exact scan of the stored embeddings (`filter.matching`). `min_score` defaults to the index's
        calibrated no-good-match threshold for text-only queries and is required otherwise; `under` as in
        `search`."""
        return self.filter_terms(as_terms(text, "text") + as_terms(image, "image"), min_score, limit, under)

    def filter_terms(self, terms: Sequence[QueryTerm], min_score: float | None = None,
                     limit: int | None = None, under: str | Sequence[str] | None = None) -> list[SearchHit]:
        from .filter import matching

        ids, scores = matching(self.index, self.query_vector(terms), self.filter_score(terms, min_score), limit,
                               self.index.scope(under))
        return self.hits(ids.tolist(), scores.tolist())

    def filter_score(self, terms: Sequence[QueryTerm], min_score: float | None) -> float:
        """The score a filter cuts at: `min_score`, or the calibrated threshold where it judges the query."""
        if min_score is not None:
            if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not -1 <= min_score <= 1:
                raise SearchError(f"min_score: expected a cosine similarity in [-1, 1], got {min_score!r}")
            return float(min_score)
        if not calibrated_for(terms):
            raise SearchError("min_score: required for a query with an image or a negative term (the index's "
                              "threshold is calibrated on caption -> image scores only)")
        if self.threshold is None:
            reason = (self.info.get("threshold") or {}).get("reason") or "none was calibrated"
            raise SearchError(f"min_score: required: this index has no no-good-match threshold ({reason})")
        return self.threshold

    def hits(self, ids: Sequence[int], scores: Sequence[float]) -> list[SearchHit]:
        """Search hits (id, score, key, caption, path) of ids and their scores."""
        with self._timed("metadata"):
            records = self.index.metadata(list(ids)) if len(ids) else []
        hits: list[SearchHit] = []
        for score, meta in zip(scores, records):
            path = meta.get("path") or (f"{meta['shard']}:{meta['member']}" if meta.get("shard") else None)
            hits.append({"id": int(meta["id"]), "score": float(score), "key": meta.get("key"),
                         "caption": meta.get("caption"), "path": None if path is None else str(path)})
        return hits

    @torch.no_grad()
    def classify(self, image: ImageInput, labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_LABEL_TEMPLATES) -> list[dict[str, Any]]:
        """Zero-shot: [{"label", "probability"}] sorted by probability. Softmax over the labels of the scaled
        cosine similarities to each label's prompt ensemble (a sigmoid per label for models with a logit bias)."""
        labels = [self.check_text(label) for label in labels]
        if not labels or len(set(labels)) != len(labels):
            raise SearchError("labels: expected a non-empty list of distinct texts")
        prompts = [template.format(label) for label in labels for template in templates]
        per_prompt = torch.from_numpy(self.encode_texts(prompts)).view(len(labels), len(templates), -1)  # [C, T, D]
        classes = torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)  # [C, D]
        image_vec = torch.from_numpy(self.encode_images([image]))  # [1, D]
        logits = self.encoder.logit_scale * image_vec @ classes.t()  # [1, C]
        if self.encoder.logit_bias is not None:
            probs = torch.sigmoid(logits + self.encoder.logit_bias)[0]
        else:
            probs = logits.softmax(dim=-1)[0]
        order = probs.argsort(descending=True).tolist()
        return [{"label": labels[i], "probability": float(probs[i])} for i in order]


def open_searchers(indices: Mapping[str, str | Path], model: str | Path | torch.nn.Module | None = None,
                   device: str | torch.device | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   mmap: bool = False, backend: str | None = None) -> dict[str, Searcher]:
    """A Searcher per named index directory, in the given order; indices embedded by the same model (and
    backend) share one loaded encoder. `model`, when given, embeds the queries of every index."""
    encoders: dict[tuple, Any] = {}
    searchers: dict[str, Searcher] = {}
    for name, index_dir in indices.items():
        searchers[name] = Searcher(index_dir, model, device, max_pixels, mmap, backend, encoders)
    return searchers
