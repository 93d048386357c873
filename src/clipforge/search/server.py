"""`clipforge serve INDEX [NAME=INDEX ...]`: an HTTP JSON API over one or more `Searcher`s, and its web page.

    GET  /                      the search page (static/index.html, app.js, style.css; package data)
    GET  /healthz               {"status": "ok", "images": N} (N over all indices; with several, per index too)
    GET  /api/indices           the served indices by name, the default first, each with its /api/info
    GET  /api/info              the index's model, size, kind, measured recall (of its caption index too, when it
                                has one) and no-good-match threshold
    GET  /api/search?text=…&k=… text search (the query language of `clipforge search`, every term text)
    GET  /api/search?id=N&k=…   images like image N of the index
    POST /api/search            multipart: `image` file and/or `text`, `embedding` (a JSON list), `k`; or a JSON
                                object {"text", "image" (base64), "embedding", "k", "dedup", "index", "under"}
                                (all three take `dedup=T`: near-duplicates within cosine T go under a better hit,
                                `modality=text`: match the stored captions' embeddings instead of the images',
                                and `under=FOLDER`: only the images whose keys lie under that folder)
    GET  /api/image/{id}        the image file of an id, found from the index's metadata only; `size=N`: a WebP
                                preview fitting N x N (thumbnails.py), as the page's grid shows
    POST /api/classify          multipart: `image` file, `labels` a JSON list of texts -> zero-shot probabilities
    GET  /metrics               Prometheus text format: requests, latencies, time per query stage and index

Every route but /healthz, /api/indices and /metrics takes `index=NAME` (a query parameter, or a form field of
the POSTs) choosing the index; without it, the first one given. Ids are per index, so with several indices a
hit's `image_url` names its index. Indices embedded by one model share its loaded copy (`open_searchers`).

An index changed under a running server (`clipforge index add`, `index sync`) is reopened within
`reload_s` seconds (a watcher thread compares index.json's inode, size and mtime): queries already running finish on
the index they started with, later ones see the new one.

Every bad request gets a 4xx answer `{"error": "..."}` and the server goes on. Request bodies are limited
(Content-Length checked first, then the bytes actually received), uploads are decoded with a pixel limit, and
no request ever names a file: images are served by id.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations as live objects.

import base64
import binascii
import json
import re
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from ..allocator import reuse_freed_memory
from .errors import SearchError, require

require("fastapi"), require("python_multipart"), require("uvicorn")  # the `search` extra, or one line naming it

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .dedup import DEFAULT_DEDUP, check_threshold
from .index import VectorIndex
from .metrics import (
    UNAVAILABLE,
    MetricsMiddleware,
    ServerMetrics,
    record_stage,
    server_metrics,
    serving_index,
)
from .query import QueryTerm, check_modality, embedding_term, parse_query
from .searcher import DEFAULT_LABEL_TEMPLATES, SearchAnswer, Searcher
from .thumbnails import MAX_SIZE, MIN_SIZE, ThumbnailCache, make_thumbnail

MAX_K = 200
MAX_LABELS = 100
MAX_UNDER_CHARS, MAX_UNDER_FOLDERS = 1000, 32
JSON_FIELDS = ("text", "image", "embedding", "k", "dedup", "index", "modality", "under")  # of a JSON POST /api/search
_ID = re.compile(r"^[0-9]{1,18}$")
# Index names go into URLs and metric labels unescaped: letters, digits, '.', '_', '-'.
INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_NAME = "default"  # the name of an index served alone through the Python API
RELOAD_S = 2.0  # how often the watcher looks for an index.json replaced by `index add` / `index sync`
STATIC_DIR = Path(str(resources.files("clipforge.search") / "static"))
# What the browser may do with a served image: nothing active (an SVG or HTML file posing as an image cannot
# run script from our origin).
IMAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, judged from Content-Length and from the bytes read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            await _send_json(send, status, self._message() if status == 413 else "bad Content-Length header")
            return
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body, or a Content-Length that lied
                raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._message())

    def _message(self) -> str:
        return f"request body over the limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"


async def _send_json(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def parse_k(value: Any, default: int = 12) -> int:
    if value is None or value == "":
        return default
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_K:
        raise RequestError(400, f"k: expected an integer from 1 to {MAX_K}, got {str(value)[:40]!r}")
    return int(text)


def parse_dedup(value: Any) -> float | None:
    """None (no collapsing) when absent or empty, else a cosine in (-1, 1]."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        return check_threshold(float(text))
    except ValueError:
        raise RequestError(400, f"dedup: expected a cosine similarity in (-1, 1], e.g. {DEFAULT_DEDUP}, "
                           f"got {text[:40]!r}") from None


def parse_modality(value: Any) -> str:
    """"image" when absent or empty; a value not in MODALITIES is a SearchError, answered 400."""
    return check_modality("image" if value is None or str(value).strip() == "" else value)


def parse_under(value: Any) -> list[str] | None:
    """`under`: a folder of the collection's keys (or, in JSON, a list of them); None when absent. A path on the
    server is refused: the API never takes file names, and keys name the same folders without them."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise RequestError(400, "under: expected a folder of the collection's keys (e.g. 2019/summer), or a list "
                           "of them")
    if len(values) > MAX_UNDER_FOLDERS:  # each folder is a pass over the metadata columns
        raise RequestError(400, f"under: at most {MAX_UNDER_FOLDERS} folders, got {len(values)}")
    for folder in values:
        if len(folder) > MAX_UNDER_CHARS:
            raise RequestError(400, f"under: a folder of at most {MAX_UNDER_CHARS} characters")
        if folder.strip().startswith("/") or "\\" in folder:
            raise RequestError(400, f"under {folder[:60]!r}: give a folder of the collection's keys (as the results "
                               "show them, e.g. 2019/summer), not a path on the server")
    return values


def parse_size(value: Any) -> int | None:
    """`size` of GET /api/image: a preview's longest side in pixels, MIN_SIZE..MAX_SIZE; None: the file itself."""
    if value is None or str(value).strip() == "":
        return None
    try:
        size = int(str(value).strip())
    except ValueError:
        size = None
    if size is None or not MIN_SIZE <= size <= MAX_SIZE:
        raise RequestError(400, f"size: expected a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got "
                           f"{str(value)[:40]!r}")
    return size


def parse_id(value: Any, index: VectorIndex) -> int:
    """An id of `index` that a search can return: 404 for one out of range or removed (index sync)."""
    text, end = str(value).strip(), index.id_end
    if not _ID.match(text) or int(text) >= end:
        raise RequestError(404, f"no image with id {text[:40]!r} (ids are 0..{end - 1})")
    if int(text) in index.removed:
        raise RequestError(404, f"image {text} was removed from the index (index sync)")
    return int(text)


def parse_labels(value: Any) -> list[str]:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, 'labels: expected a JSON list of texts, e.g. ["a cat", "a dog"]')
    try:
        labels = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"labels: malformed JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise RequestError(400, 'labels: expected a non-empty JSON list of texts, e.g. ["a cat", "a dog"]')
    if len(labels) > MAX_LABELS:
        raise RequestError(400, f"labels: at most {MAX_LABELS}, got {len(labels)}")
    return labels


def check_index_name(name: str) -> str:
    if not isinstance(name, str) or not INDEX_NAME.match(name):
        raise ValueError(f"index name {str(name)[:70]!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def info_stamp(index_dir: Path) -> tuple[int, int, int] | None:
    """index.json's (inode, size, mtime): every commit replaces the file by a rename, so the inode changes."""
    try:
        st = (index_dir / "index.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ServedIndices:
    """The named searchers of a server, in order; the first is the default."""

    def __init__(self, searchers: Searcher | Mapping[str, Searcher]) -> None:
        self.searchers = {DEFAULT_NAME: searchers} if isinstance(searchers, Searcher) else dict(searchers)
        if not self.searchers:
            raise ValueError("no index to serve")
        for name in self.searchers:
            check_index_name(name)
        self.default = next(iter(self.searchers))
        self.several = len(self.searchers) > 1
        self._stamps = {name: info_stamp(s.index.index_dir) for name, s in self.searchers.items()}
        self._failed: dict[str, Any] = {}  # name -> the stamp that failed to open (not retried until it changes)
        self._reload_lock = threading.Lock()

    def reload_changed(self) -> list[str]:
        """Reopen the indices whose index.json was replaced since they were opened; returns their names. One
        that does not open (damaged, or a model that no longer matches) keeps serving as it was, with a warning."""
        reopened = []
        with self._reload_lock:
            for name, searcher in list(self.searchers.items()):
                stamp = info_stamp(searcher.index.index_dir)
                if stamp is None or stamp == self._stamps[name] or stamp == self._failed.get(name):
                    continue
                try:
                    fresh = searcher.reopened()
                except Exception as exc:  # noqa: BLE001 - whatever a damaged index raises, the old one keeps serving
                    self._failed[name] = stamp
                    print(f"clipforge serve: index {name} changed but was not reloaded: {exc}", file=sys.stderr)
                    continue
                self.searchers[name] = fresh  # a request holding the old searcher finishes on it
                self._stamps[name] = stamp
                reopened.append(name)
        return reopened

    def pick(self, name: str | None) -> tuple[str, Searcher]:
        """(name, searcher) of `name`, the default one when absent; 404 for a name not served."""
        if name is None or name == "":
            return self.default, self.searchers[self.default]
        if name not in self.searchers:
            raise RequestError(404, f"index: no index named {name[:70]!r} (this server has "
                               f"{', '.join(self.searchers)})")
        return name, self.searchers[name]

    def image_url(self, name: str, id_: int) -> str:
        """The URL of an image, carrying the index version (its faiss file's hash): browsers keep images for an
        hour, and `index compact` gives ids to other images, so a new version must not reuse old URLs."""
        version = index_version(self.searchers[name])
        return f"/api/image/{id_}?" + (f"index={name}&" if self.several else "") + f"v={version}"


def watch_indices(served: ServedIndices, interval_s: float) -> threading.Thread | None:
    """A daemon thread calling `served.reload_changed()` every `interval_s` seconds for as long as `served` is
    alive (it holds only a weak reference); None for an interval of 0 (no reloading)."""
    if interval_s <= 0:
        return None
    ref = weakref.ref(served)

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            target = ref()
            if target is None:
                return
            target.reload_changed()
            del target

    thread = threading.Thread(target=loop, name="clipforge-index-watch", daemon=True)
    thread.start()
    return thread


def in_index(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with its query stages recorded under index `name` (metrics)."""
    with serving_index(name):
        return fn(*args)


def public_answer(answer: SearchAnswer, image_url: Callable[[int], str] = lambda i: f"/api/image/{i}"
                  ) -> dict[str, Any]:
    """The JSON of a search answer: no filesystem paths, an image URL per hit."""
    results = []
    for hit in answer["results"]:
        row = {"id": hit["id"], "score": round(hit["score"], 5), "key": hit["key"], "caption": hit["caption"],
               "image_url": image_url(hit["id"])}
        if "duplicates" in hit:
            row["duplicates"] = hit["duplicates"]
        results.append(row)
    out = {"results": results, "no_good_match": answer["no_good_match"], "threshold": answer["threshold"]}
    if "modality" in answer:
        out["modality"] = answer["modality"]
    if "under" in answer:
        out["under"] = answer["under"]
    if "dedup" in answer:
        out["dedup"], out["hidden"] = answer["dedup"], answer.get("hidden", 0)
    return out


def index_summary(searcher: Searcher, dedup: float = DEFAULT_DEDUP) -> dict[str, Any]:
    info = searcher.info
    threshold = info.get("threshold") or {}
    return {"images": len(searcher), "dim": searcher.index.dim, "kind": info.get("kind"),
            "model": Path(str(info.get("model") or "")).name or None, "backend": searcher.backend,
            "recall": info.get("recall"), "caption_recall": (info.get("captions") or {}).get("recall"),
            "threshold": {k: threshold[k] for k in ("score", "precision", "recall") if k in threshold} or None,
            "max_k": MAX_K, "dedup": dedup, "version": index_version(searcher)}


def index_version(searcher: Searcher) -> str:
    """The index's version: the first 12 hex digits of its faiss file's sha256, new after every `index add`,
    `sync` and `compact` (image URLs carry it; a client holding ids can compare it to notice renumbering)."""
    return str(searcher.info["index_file"]["sha256"])[:12]


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error becomes {"error": "..."} with a 4xx status (FastAPI's own 404/405/422 included)."""

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc))

    @app.exception_handler(SearchError)
    async def _search_error(_: Request, exc: SearchError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, not bad input: still JSON
        return error_response(500, f"internal error ({type(exc).__name__}); the server goes on")


def parse_embedding(value: Any) -> QueryTerm:
    """A query vector from a JSON list of numbers (or its text, from a form field)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestError(400, f"embedding: malformed JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise RequestError(400, "embedding: expected a JSON list of numbers, e.g. [0.01, -0.2, ...]")
    return embedding_term(value)  # its SearchError (NaN, zeros) is answered 400


async def read_json(request: Request) -> tuple[bytes | None, dict[str, Any]]:
    """(the base64 `image`'s bytes or None, the other fields) of a JSON search request."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(400, f"malformed JSON body{where}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"expected a JSON object with some of: {', '.join(JSON_FIELDS)}")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r} (expected: {', '.join(JSON_FIELDS)})")
    for name in ("text", "image", "index", "modality"):  # (`under` may be a list: parse_under checks it)
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(400, f"{name}: expected a string" + (" (base64 of the image file)" if name == "image"
                                                                     else ""))
    image = None
    if body.get("image"):
        try:
            image = base64.b64decode(body.pop("image"), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image: not valid base64") from None
    fields = {name: value for name, value in body.items() if value is not None and name != "image"}
    return image, fields


async def read_form(request: Request, max_bytes: int) -> tuple[bytes | None, dict[str, str]]:
    """(the `image` upload's bytes or None, the text fields) of a multipart request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(415, "expected a multipart/form-data body (fields: image, text, embedding, k, dedup, "
                           "under, modality, labels, index), or for POST /api/search a JSON object")
    try:
        form = await request.form(max_files=1, max_fields=9, max_part_size=max_bytes)
    except HTTPException as exc:  # malformed multipart, too many parts
        raise RequestError(400, f"bad multipart body ({exc.detail})") from None
    fields, image = {}, None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "image":
                raise RequestError(400, f"unexpected file field {name!r} (the upload goes in 'image')")
            image = await value.read()
        else:
            fields[name] = value
    if image is not None and not image:
        raise RequestError(400, "image: the uploaded file is empty")
    return image, fields


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in (".js", ".css", ".svg")}
        if name not in files:  # only the shipped files, by exact name
            raise RequestError(404, f"no static file {name[:60]!r}")
        return FileResponse(files[name], headers=PAGE_HEADERS)


def add_search_routes(app: FastAPI, served: ServedIndices, max_bytes: int, dedup: float) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        sizes = {name: len(searcher) for name, searcher in served.searchers.items()}
        answer: dict[str, Any] = {"status": "ok", "images": sum(sizes.values())}
        if served.several:
            answer["indices"] = sizes
        return answer

    @app.get("/api/indices")
    def indices() -> dict[str, Any]:
        return {"default": served.default,
                "indices": [{"name": name, **index_summary(searcher, dedup)}
                            for name, searcher in served.searchers.items()]}

    @app.get("/api/info")
    def info(index: str | None = None) -> dict[str, Any]:
        name, searcher = served.pick(index)
        return {"name": name, **index_summary(searcher, dedup)}

    @app.get("/api/search")
    def search_get(text: str | None = None, k: str | None = None, id: str | None = None,
                   dedup: str | None = None, index: str | None = None, modality: str | None = None,
                   under: str | None = None) -> dict[str, Any]:
        name, searcher = served.pick(index)
        count, threshold, against = parse_k(k), parse_dedup(dedup), parse_modality(modality)
        folders = parse_under(under)
        if id is not None and text is not None:
            raise RequestError(400, "give either text or id, not both")
        if id is not None:
            answer = in_index(name, partial(searcher.search_by_id, modality=against, under=folders),
                              parse_id(id, searcher.index), count, threshold)
        elif text is None:
            raise RequestError(400, "text: missing (GET /api/search?text=a+red+circle&k=12)")
        else:
            answer = in_index(name, partial(searcher.search_terms, modality=against, under=folders),
                              parse_query(text, allow_paths=False), count, threshold)
        return public_answer(answer, lambda i: served.image_url(name, i))

    @app.post("/api/search")
    async def search_post(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            image, fields = await read_json(request)
        else:
            image, fields = await read_form(request, max_bytes)
        name, searcher = served.pick(fields.get("index"))
        count, threshold = parse_k(fields.get("k")), parse_dedup(fields.get("dedup"))
        against, folders = parse_modality(fields.get("modality")), parse_under(fields.get("under"))
        text = fields.get("text", "").strip()
        given = fields.get("embedding")
        if image is None and not text and given in (None, ""):
            raise RequestError(400, "give an image, a text, an embedding, or a mix of them")
        terms = parse_query(text, allow_paths=False) if text else []
        if image is not None:
            terms.append(QueryTerm("image", image, 1.0))
        if given not in (None, ""):
            terms.append(parse_embedding(given))
        answer = await run_in_threadpool(in_index, name, partial(searcher.search_terms, modality=against,
                                                                 under=folders), terms, count, threshold)
        return public_answer(answer, lambda i: served.image_url(name, i))


def add_image_routes(app: FastAPI, served: ServedIndices, max_bytes: int, templates: tuple[str, ...]) -> None:
    previews = app.state.previews = ThumbnailCache()

    @app.get("/api/image/{image_id}")
    def image(image_id: str, index: str | None = None, size: str | None = None) -> Response:
        _, searcher = served.pick(index)
        id_, side = parse_id(image_id, searcher.index), parse_size(size)
        key = (str(searcher.index.index_dir), searcher.info["index_file"]["name"], id_, side)
        cached = previews.get(key) if side is not None else None
        if cached is not None:
            return Response(content=cached, media_type="image/webp", headers=IMAGE_HEADERS)
        try:
            data, mime = searcher.index.read_image_bytes(id_)
            if not mime.startswith("image/"):
                raise SearchError(f"id {image_id}: its file is not an image")
            if side is not None:
                data, mime = make_thumbnail(data, side, searcher.max_pixels, f"id {id_}"), "image/webp"
                previews.put(key, data)
        except SearchError as exc:  # the file named by the metadata is gone, unreadable or not an image
            raise RequestError(404, str(exc)) from None
        return Response(content=data, media_type=mime, headers=IMAGE_HEADERS)

    @app.post("/api/classify")
    async def classify(request: Request) -> dict[str, Any]:
        image, fields = await read_form(request, max_bytes)
        name, searcher = served.pick(fields.get("index"))
        labels = parse_labels(fields.get("labels"))
        if image is None:
            raise RequestError(400, "image: missing (multipart file field 'image')")
        ranked = await run_in_threadpool(in_index, name, searcher.classify, image, labels, templates)
        return {"labels": ranked}


def add_metrics_route(app: FastAPI, metrics: ServerMetrics | None) -> None:
    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        if metrics is None:
            raise RequestError(404, UNAVAILABLE)
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)


def create_app(searchers: Searcher | Mapping[str, Searcher], max_upload_mb: float = 10.0,
               templates: tuple[str, ...] = DEFAULT_LABEL_TEMPLATES, dedup: float = DEFAULT_DEDUP,
               reload_s: float = RELOAD_S) -> FastAPI:
    """The FastAPI application serving one Searcher, or several by name (the first is the default; see
    `open_searchers`). Sync endpoints run in the thread pool; each model's forward passes are serialised by its
    lock, faiss searches run concurrently. `dedup` is the threshold the page's "hide near-duplicates" toggle
    sends (API requests give their own). Indices whose index.json changes are reopened within `reload_s`
    seconds (0: never)."""
    dedup = check_threshold(dedup)
    if not reload_s >= 0:
        raise SearchError(f"reload interval: expected seconds >= 0, got {reload_s!r}")
    served = ServedIndices(searchers)
    app = FastAPI(title="clipforge search", docs_url=None, redoc_url=None)  # docs pages would load from a CDN
    max_bytes = int(max_upload_mb * 2**20)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    metrics = server_metrics({name: partial(lambda n: len(served.searchers[n]), name) for name in served.searchers})
    if metrics is not None:  # outermost (added last), so the body limit's own 413s are counted too
        app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
        for searcher in served.searchers.values():
            searcher.add_timing_listener(record_stage)  # once per searcher, however many apps serve it
    add_error_handlers(app)
    add_page_routes(app)
    add_search_routes(app, served, max_bytes, dedup)
    add_image_routes(app, served, max_bytes, templates)
    add_metrics_route(app, metrics)
    app.state.served = served
    app.state.watcher = watch_indices(served, reload_s)
    return app


def serve(searchers: Searcher | Mapping[str, Searcher], host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10.0, templates: tuple[str, ...] = DEFAULT_LABEL_TEMPLATES,
          dedup: float = DEFAULT_DEDUP, reload_s: float = RELOAD_S) -> None:
    """Run the server until interrupted."""
    import uvicorn

    reuse_freed_memory()
    app = create_app(searchers, max_upload_mb, templates, dedup, reload_s)
    served = ServedIndices(searchers)
    shown = f"[{host}]" if ":" in host else host
    images = sum(len(s) for s in served.searchers.values())
    where = f" in {len(served.searchers)} indices ({', '.join(served.searchers)})" if served.several else ""
    print(f"Serving {images} images{where} at http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Listening on {host}: anyone who can reach this machine can query the index and read its images.")
    uvicorn.run(app, host=host, port=port, log_level="warning")
