"""The HTTP API of `clipforge serve`: answers, and a 4xx JSON error for every bad input, the server staying up."""

from __future__ import annotations

import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from search_index import build_small_index, running_server

from clipforge.search.server import create_app

LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("serve"), count=60)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    return TestClient(create_app(searcher, max_upload_mb=LIMIT_MB), raise_server_exceptions=True)


def png_bytes(size=(48, 48), colour=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and fragment in body["error"], body


def test_healthz_and_info(client, searcher):
    assert client.get("/healthz").json() == {"status": "ok", "images": 60}
    info = client.get("/api/info").json()
    assert info["images"] == 60 and info["dim"] == searcher.index.dim and info["kind"] == "flat"
    stored = info["threshold"]["score"]  # None where the index could not calibrate one (measure.UNSEPARATED)
    assert (stored is None and searcher.threshold is None) or stored == pytest.approx(searcher.threshold)


def test_get_search_matches_the_searcher(client, searcher):
    body = client.get("/api/search", params={"text": "a red circle", "k": 5}).json()
    direct = searcher.search(text="a red circle", k=5)
    assert [r["id"] for r in body["results"]] == [h["id"] for h in direct["results"]]
    assert [r["score"] for r in body["results"]] == pytest.approx([h["score"] for h in direct["results"]], abs=1e-5)
    first = body["results"][0]
    assert set(first) == {"id", "score", "key", "caption", "image_url"}  # no filesystem path leaves the server
    version = searcher.info["index_file"]["sha256"][:12]  # a compacted index must not reuse cached image URLs
    assert first["image_url"] == f"/api/image/{first['id']}?v={version}"
    assert first["caption"] == direct["results"][0]["caption"]
    assert body["no_good_match"] == direct["no_good_match"] and body["threshold"] == pytest.approx(direct["threshold"])
    algebra = client.get("/api/search", params={"text": "a red circle - 0.5:a blue square", "k": 3}).json()
    from clipforge.search.query import QueryTerm

    expected = searcher.search_terms([QueryTerm("text", "a red circle"), QueryTerm("text", "a blue square", -0.5)], 3)
    assert [r["id"] for r in algebra["results"]] == [h["id"] for h in expected["results"]]


def test_search_by_id_and_image_file(client, built):
    body = client.get("/api/search", params={"id": 4, "k": 5}).json()
    assert len(body["results"]) == 5 and 4 not in [r["id"] for r in body["results"]]
    response = client.get("/api/image/4")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == built.paths[4].read_bytes()
    assert "sandbox" in response.headers["content-security-policy"]


def test_post_search_with_image_and_text(client, searcher, built):
    data = built.paths[9].read_bytes()
    body = client.post("/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "4"}).json()
    direct = searcher.search(image=data, k=4)
    assert [r["id"] for r in body["results"]] == [h["id"] for h in direct["results"]]
    assert body["threshold"] is None  # the threshold judges text-only queries
    mixed = client.post("/api/search", files={"image": ("q.png", data, "image/png")},
                        data={"text": "a red circle", "k": "4"}).json()
    direct = searcher.search(text="a red circle", image=data, k=4)
    assert [r["id"] for r in mixed["results"]] == [h["id"] for h in direct["results"]]


def test_classify(client, built):
    labels = ["a red circle", "a blue square", "a green star"]
    body = client.post("/api/classify", files={"image": ("x.png", built.paths[2].read_bytes(), "image/png")},
                       data={"labels": json.dumps(labels)}).json()
    assert sorted(r["label"] for r in body["labels"]) == sorted(labels)
    assert sum(r["probability"] for r in body["labels"]) == pytest.approx(1.0, abs=1e-5)


def bomb_png() -> bytes:
    return png_bytes(size=(12_000, 10_000), mode="L")  # 120 Mpx of zeros: ~100 KB compressed


BAD_REQUESTS = [
    ("GET", "/api/search", {"params": {"text": ""}}, 400, "query is empty"),
    ("GET", "/api/search", {"params": {"text": "   "}}, 400, "empty"),
    ("GET", "/api/search", {"params": {"text": "word " * 200}}, 400, "tokens long"),
    ("GET", "/api/search", {"params": {"text": "a +"}}, 400, "ends with an operator"),
    ("GET", "/api/search", {"params": {"text": "a - a"}}, 400, "cancel out"),
    ("GET", "/api/search", {}, 400, "text: missing"),
    ("GET", "/api/search", {"params": {"text": "cat", "k": "0"}}, 400, "k: expected"),
    ("GET", "/api/search", {"params": {"text": "cat", "k": "abc"}}, 400, "k: expected"),
    ("GET", "/api/search", {"params": {"text": "cat", "k": "100000"}}, 400, "k: expected"),
    ("GET", "/api/search", {"params": {"text": "cat", "id": "2"}}, 400, "not both"),
    ("GET", "/api/search", {"params": {"id": "-1"}}, 404, "no image with id"),
    ("GET", "/api/search", {"params": {"id": "60"}}, 404, "no image with id"),
    ("GET", "/api/search", {"params": {"id": "9" * 40}}, 404, "no image with id"),
    ("GET", "/api/image/-1", {}, 404, "no image with id"),
    ("GET", "/api/image/60", {}, 404, "no image with id"),
    ("GET", "/api/image/99999999999999999999999999", {}, 404, "no image with id"),
    ("GET", "/api/image/1e3", {}, 404, "no image with id"),
    ("GET", "/api/image/..%2F..%2Fetc%2Fpasswd", {}, 404, ""),
    ("GET", "/api/image/%2e%2e", {}, 404, "no image with id"),
    ("GET", "/static/..%2Fsearcher.py", {}, 404, ""),
    ("GET", "/static/searcher.py", {}, 404, "no static file"),
    ("GET", "/nothing-here", {}, 404, "Not Found"),
    ("POST", "/api/search", {"content": b"text=cat", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, "multipart/form-data"),
    ("POST", "/api/search", {"files": {"image": ("x.png", b"GIF89a not really", "image/png")}}, 400,
     "not a readable image"),
    ("POST", "/api/search", {"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty"),
    ("POST", "/api/search", {"files": {"other": ("x.png", b"abc", "image/png")}}, 400, "unexpected file field"),
    ("POST", "/api/search", {"data": {"k": "3"}, "files": {"image": ("x.png", png_bytes(), "image/png")},
                             "params": {}}, 200, ""),
    ("POST", "/api/search", {"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
     400, ""),
    ("POST", "/api/search", {"files": {"image": ("big.png", b"\0" * int(LIMIT_MB * 2**20 + 10), "image/png")}},
     413, "over the limit"),
    ("POST", "/api/search", {"files": {"image": ("bomb.png", bomb_png(), "image/png")}}, 400, "decompression bomb"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"labels": "[\"a"}},
     400, "malformed JSON"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"labels": "{}"}},
     400, "JSON list"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"labels": "[1, 2]"}},
     400, "JSON list"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", png_bytes(), "image/png")},
                               "data": {"labels": "[\"a cat\", \"a cat\"]"}}, 400, "distinct"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", png_bytes(), "image/png")},
                               "data": {"labels": json.dumps([""])}}, 400, "empty"),
    ("POST", "/api/classify", {"data": {"labels": "[\"a cat\"]"}, "files": {"other": ("a", b"b", "text/plain")}},
     400, "unexpected file field"),
    ("POST", "/api/classify", {"files": {"image": ("x.png", b"<svg/>", "image/svg+xml")},
                               "data": {"labels": "[\"a cat\"]"}}, 400, "not a readable image"),
]


@pytest.mark.parametrize("method, path, kwargs, status, fragment", BAD_REQUESTS,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_rest) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_4xx_json_and_the_server_stays_up(client, method, path, kwargs, status, fragment):
    response = client.request(method, path, **kwargs)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, fragment)
    assert client.get("/healthz").status_code == 200


def test_declared_content_length_over_limit_is_refused_before_reading(client):
    response = client.post("/api/search", content=b"x" * 10,
                           headers={"content-type": "multipart/form-data; boundary=x", "content-length": "999999999"})
    assert_error(response, 413, "over the limit")


def test_an_unexpected_error_is_a_json_500_and_the_server_goes_on(searcher, monkeypatch):
    app_client = TestClient(create_app(searcher), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(searcher, "search_terms", broken)
    response = app_client.get("/api/search", params={"text": "a red circle"})
    assert response.status_code == 500 and response.json() == {
        "error": "internal error (RuntimeError); the server goes on"}
    monkeypatch.undo()
    assert app_client.get("/healthz").status_code == 200
    assert app_client.get("/api/search", params={"text": "a red circle"}).status_code == 200


def test_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "clipforge" in page.text and "/static/app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


# --- a real server on a socket ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(searcher):
    with running_server(create_app(searcher, max_upload_mb=LIMIT_MB)) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        yield base, (host, int(port))


def raw_request(address, data: bytes) -> bytes:
    """Send `data` and read the answer; a server may answer and close before taking all of a refused body."""
    with socket.create_connection(address, timeout=20) as conn:
        try:
            conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_live_server_answers_and_binds_loopback(live_server, searcher):
    import httpx

    base, (host, _) = live_server
    assert host == "127.0.0.1"
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        body = http.get("/api/search", params={"text": "a green star", "k": 3}).json()
        assert [r["id"] for r in body["results"]] == [h["id"] for h in searcher.search(text="a green star", k=3)["results"]]


def test_live_server_concurrent_queries_agree_with_serial(live_server):
    import httpx

    base, _ = live_server
    texts = ["a red circle", "a blue square", "a green star", "a yellow triangle"] * 6
    with httpx.Client(base_url=base, timeout=60) as http:
        serial = [http.get("/api/search", params={"text": t, "k": 5}).json() for t in texts]

        def one(text):
            return http.get("/api/search", params={"text": text, "k": 5}).json()

        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(one, texts))
    assert concurrent == serial


def test_live_server_refuses_a_chunked_upload_over_the_limit(live_server):
    _, address = live_server
    boundary = b"zz"
    body = (b"--zz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + b"\0" * int(LIMIT_MB * 2**20 * 2) + b"\r\n--zz--\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 16384]), body[i:i + 16384])
                       for i in range(0, len(body), 16384)) + b"0\r\n\r\n"
    head = (b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = raw_request(address, head + chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the limit" in answer


def test_live_server_raw_path_traversal(live_server):
    _, address = live_server
    for target in (b"/api/image/../../etc/passwd", b"/api/image/..%2F..%2Fetc%2Fpasswd", b"/static/../server.py",
                   b"/api/image/%00"):
        answer = raw_request(address, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status = answer.split(b"\r\n", 1)[0]
        assert status.split()[1].startswith(b"4"), (target, answer[:300])
        assert b"root:" not in answer and b"import " not in answer
    answer = raw_request(address, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


# --- /metrics ----------------------------------------------------------------------------------------------


def scrape(app_client) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = app_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_what_was_asked(searcher, client, built):
    app_client = TestClient(create_app(searcher, max_upload_mb=LIMIT_MB))
    assert app_client.get("/api/search", params={"text": "a red circle", "k": 3}).status_code == 200
    assert app_client.get("/api/search", params={"text": "a blue square - a red circle"}).status_code == 200
    assert app_client.get("/api/search", params={"id": 4}).status_code == 200  # no model forward
    assert app_client.get("/api/search", params={"text": "cat", "k": "0"}).status_code == 400  # refused first
    assert app_client.get("/api/image/4").status_code == 200
    assert app_client.get("/nothing-here").status_code == 404
    assert app_client.delete("/api/search").status_code == 405
    assert app_client.post("/api/search", content=b"x" * 10, headers={
        "content-type": "multipart/form-data; boundary=x", "content-length": "999999999"}).status_code == 413
    assert app_client.post("/api/search", files={"image": ("q.png", built.paths[9].read_bytes(), "image/png")},
                           data={"k": "2"}).status_code == 200
    assert client.get("/api/search", params={"text": "a green star"}).status_code == 200  # another app's request
    samples = scrape(app_client)

    requests = {dict(labels)["route"] + " " + dict(labels)["method"] + " " + dict(labels)["status"]: value
                for labels, value in samples["clipforge_http_requests_total"].items()}
    assert requests == {"/api/search GET 200": 3, "/api/search GET 400": 1, "/api/image/{image_id} GET 200": 1,
                        "other GET 404": 1, "/api/search DELETE 405": 1, "/api/search POST 413": 1,
                        "/api/search POST 200": 1}
    latency = {dict(labels)["route"]: value for labels, value in
               samples["clipforge_http_request_duration_seconds_count"].items()}
    assert latency == {"/api/search": 7, "/api/image/{image_id}": 1, "other": 1}
    stages = {(dict(labels)["index"], dict(labels)["stage"]): value
              for labels, value in samples["clipforge_query_stage_seconds_count"].items()}
    # two text queries (the second embeds its two texts in one call), one upload; four searches reach the index
    assert stages == {("default", "encode_text"): 2, ("default", "encode_image"): 1, ("default", "knn"): 4,
                      ("default", "metadata"): 4}
    assert samples["clipforge_index_images"][(("index", "default"),)] == 60
    assert samples["clipforge_http_requests_in_flight"][()] == 1  # the scrape itself
    assert scrape(app_client)["clipforge_http_requests_total"][
        (("method", "GET"), ("route", "/metrics"), ("status", "200"))] == 1  # the first scrape, counted once done


def test_metrics_without_prometheus_client(searcher, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # any import of it now raises ImportError
    app_client = TestClient(create_app(searcher))
    monkeypatch.undo()
    assert_error(app_client.get("/metrics"), 404, "needs prometheus_client")
    assert app_client.get("/api/search", params={"text": "a red circle"}).status_code == 200
