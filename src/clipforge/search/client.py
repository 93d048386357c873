"""A Python client of `clipforge serve` (as clip-retrieval's ClipClient is of its back end), standard library only.

    from clipforge.search.client import SearchClient
    client = SearchClient("http://127.0.0.1:8000")
    answer = client.search(text="a red circle", k=5)
    answer = client.search(image="photo.jpg", text="at night", dedup=0.95, index="photos")
    answers = client.search_many(["a cat", "a dog", "beach - people"], k=10)   # concurrent requests
    data = client.image(answer["results"][0]["id"])

Answers are the API's JSON (README, "Serve"), so code written against `Searcher` reads them the same way (no
`path`: the server never says where its files are). An error answer raises `SearchClientError` carrying the
HTTP status and the server's one-line message; a server that cannot be reached raises it with status 0.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class SearchClientError(Exception):
    """An error answer of the server (`status` 4xx/5xx), or no answer at all (`status` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message = status, message


def _image_bytes(image: str | Path | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    try:
        return Path(image).read_bytes()
    except OSError as exc:
        raise SearchClientError(0, f"{image}: cannot read the image file ({exc.strerror})") from None


class SearchClient:
    """Talks to one server; `index` names the served index to ask (None: the server's default)."""

    def __init__(self, url: str, index: str | None = None, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url: expected http(s)://host:port, got {url!r}")
        self.url, self.index, self.timeout = url.rstrip("/"), index, timeout

    def _request(self, path: str, params: dict[str, Any] | None = None, body: dict[str, Any] | None = None,
                 raw: bool = False) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}" + (f"?{query}" if query else ""), data=data,
                                         headers={"Content-Type": "application/json"} if data else {},
                                         method="POST" if data else "GET")
        payload = self._send(request)
        return payload if raw else json.loads(payload)

    def _send(self, request: urllib.request.Request) -> bytes:
        """The answer's body; SearchClientError for an error answer (with the server's message) or none."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # http(s) only: checked in __init__
                return response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (json.JSONDecodeError, AttributeError):
                message = str(exc.reason)
            raise SearchClientError(exc.code, str(message)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SearchClientError(0, f"{self.url}: no answer ({reason})") from None

    def _index(self, index: str | None) -> str | None:
        return index if index is not None else self.index

    def indices(self) -> dict[str, Any]:
        """{"default", "indices": [{"name", "images", "dim", "kind", "model", ...}]}."""
        return self._request("/api/indices")

    def info(self, index: str | None = None) -> dict[str, Any]:
        return self._request("/api/info", {"index": self._index(index)})

    def search(self, text: str | None = None, image: str | Path | bytes | None = None,
               embedding: Sequence[float] | None = None, k: int = 10, dedup: float | None = None,
               modality: str = "image", index: str | None = None,
               under: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Search by a text (the query language), an image (a path or bytes), a vector, or a mix of them;
        `under`: only the images under a folder of the collection's keys (or several)."""
        body: dict[str, Any] = {"k": k, "modality": modality, "index": self._index(index), "dedup": dedup,
                                "under": under if under is None or isinstance(under, str) else list(under)}
        if text is not None:
            body["text"] = text
        if image is not None:
            body["image"] = base64.b64encode(_image_bytes(image)).decode()
        if embedding is not None:
            body["embedding"] = [float(x) for x in embedding]
        return self._request("/api/search", body={k_: v for k_, v in body.items() if v is not None})

    def search_by_id(self, id_: int, k: int = 10, dedup: float | None = None, modality: str = "image",
                     index: str | None = None, under: str | None = None) -> dict[str, Any]:
        return self._request("/api/search", {"id": id_, "k": k, "dedup": dedup, "modality": modality,
                                             "index": self._index(index), "under": under})

    def search_many(self, texts: Sequence[str], k: int = 10, dedup: float | None = None, modality: str = "image",
                    index: str | None = None, workers: int = 4,
                    under: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Text queries sent `workers` at a time, answers in order; a failed one holds {"error": message}."""
        def one(text: str) -> dict[str, Any]:
            try:
                return self.search(text=text, k=k, dedup=dedup, modality=modality, index=index, under=under)
            except SearchClientError as exc:
                if exc.status == 0:
                    raise
                return {"error": exc.message}

        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(one, texts))

    def image(self, id_: int, index: str | None = None) -> bytes:
        """The image file of an id."""
        return self._request(f"/api/image/{int(id_)}", {"index": self._index(index)}, raw=True)

    def classify(self, image: str | Path | bytes, labels: Sequence[str], index: str | None = None
                 ) -> list[dict[str, Any]]:
        """Zero-shot probabilities of `labels` for an image: [{"label", "probability"}], most probable first."""
        boundary = f"clipforge-{uuid.uuid4().hex}"  # never inside the image's bytes, in practice
        parts = [("labels", json.dumps(list(labels)).encode(), None)]
        if self._index(index) is not None:
            parts.append(("index", str(self._index(index)).encode(), None))
        parts.append(("image", _image_bytes(image), "image"))
        chunks = []
        for name, value, filename in parts:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
        data = b"".join(chunks) + f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{self.url}/api/classify", data=data, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(self._send(request))["labels"]
