"""Prometheus metrics of `clipforge serve`, scraped at GET /metrics (prometheus_client, part of the search extra).

    clipforge_http_requests_total{route, method, status}      requests answered (413s of the body limit included)
    clipforge_http_request_duration_seconds{route}            histogram of the time to answer
    clipforge_http_requests_in_flight                         requests being answered now
    clipforge_query_stage_seconds{index, stage}               histogram per stage of a query: encode_text,
                                                              encode_image (with the wait for the model lock),
                                                              knn (faiss, with any exact rescoring), metadata
    clipforge_index_images{index}                             rows in each served index

Labels are bounded: `route` is the matched route's template (`/api/image/{image_id}`, never the requested path)
or `other`, `method` one of the HTTP methods or `other`, `index` one of the names the server was started with
(an unknown name is refused before any query runs), so a client cannot grow the label space.
Each app gets its own registry, so that several apps in one process (tests, workers) count separately; query
stages reach the registry of the app whose request ran them, and the name of the index they ran on, through
context variables, which Starlette carries into the thread pool that runs the endpoints.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import import_module
from typing import Any

from starlette.routing import Match

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNAVAILABLE = "GET /metrics needs prometheus_client: pip install prometheus_client (or the search extra)"
_CURRENT: ContextVar[ServerMetrics | None] = ContextVar("clipforge_server_metrics", default=None)
_INDEX: ContextVar[str] = ContextVar("clipforge_served_index", default="")


class ServerMetrics:
    """The collectors of one server, in a registry of their own."""

    def __init__(self, images: Mapping[str, Callable[[], int]]) -> None:
        prom: Any = import_module("prometheus_client")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("clipforge_http_requests", "HTTP requests answered",
                                     ["route", "method", "status"], registry=self.registry)
        self.latency = prom.Histogram("clipforge_http_request_duration_seconds", "Time to answer an HTTP request",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = prom.Gauge("clipforge_http_requests_in_flight", "HTTP requests being answered",
                                    registry=self.registry)
        self.stages = prom.Histogram("clipforge_query_stage_seconds", "Time per stage of a search query",
                                     ["index", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = prom.Gauge("clipforge_index_images", "Images in a served index", ["index"], registry=self.registry)
        for name, count in images.items():  # read at each scrape: `index sync` changes it under a running server
            sizes.labels(index=name).set_function(count)

    def observe_stage(self, index: str, stage: str, seconds: float) -> None:
        self.stages.labels(index=index, stage=stage).observe(seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method if method in METHODS else "other", status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def record_stage(stage: str, seconds: float) -> None:
    """A Searcher timing listener: records into the metrics of the request being answered, if any."""
    metrics = _CURRENT.get()
    if metrics is not None:
        metrics.observe_stage(_INDEX.get(), stage, seconds)


@contextmanager
def serving_index(name: str) -> Iterator[None]:
    """Query stages run inside are recorded under index `name`."""
    token = _INDEX.set(name)
    try:
        yield
    finally:
        _INDEX.reset(token)


def server_metrics(images: Mapping[str, Callable[[], int]]) -> ServerMetrics | None:
    """Metrics for a server of the named indices (each with a function giving its size), or None where
    prometheus_client is not installed."""
    try:
        return ServerMetrics(images)
    except ImportError:
        return None


def route_template(routes: Sequence[Any], scope: dict[str, Any]) -> str:
    """The template of the route `scope` is for (a method mismatch still names it), else 'other'."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
        if match == Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", "other"))
    return partial or "other"


class MetricsMiddleware:
    """ASGI middleware, outermost: counts and times every HTTP request, whoever answers it."""

    def __init__(self, app: Any, metrics: ServerMetrics, routes: Sequence[Any]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes  # routes: the app's list, filled later

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # 500: the app raised before answering

        async def tracked_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        token = _CURRENT.set(self.metrics)
        try:
            await self.app(scope, receive, tracked_send)
        finally:
            _CURRENT.reset(token)
            self.metrics.in_flight.dec()
            self.metrics.observe_request(route_template(self.routes, scope), str(scope.get("method", "")), status,
                                         time.perf_counter() - start)
