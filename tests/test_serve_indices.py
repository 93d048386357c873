"""`clipforge serve` with several indices: routing by name, one loaded model per distinct model, per-index metrics.

Every answer is checked against a Searcher opened on its own for that index (its own model load), so a request
routed to the wrong index, or a shared encoder that changed an answer, shows as a difference.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from search_index import build_small_index, running_server

from clipforge.cli import main
from clipforge.cli_common import UserError
from clipforge.search.cli_search import index_names
from clipforge.search.server import create_app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """shapes: a 40-image index of one model; more: 30 images of another model; again: shapes' embeddings
    indexed a second time (same model, so its encoder is shared with shapes)."""
    shapes = build_small_index(tmp_path_factory.mktemp("shapes"), count=40, seed=0)
    more = build_small_index(tmp_path_factory.mktemp("more"), count=30, seed=1)
    again = shapes.index_dir.parent / "again"
    assert main(["index", "build", str(shapes.index_dir.parent / "emb"), "--index", str(again), "--kind", "flat",
                 "--queries", "20"]) == 0
    return {"shapes": shapes, "more": more, "again": again}


@pytest.fixture(scope="module")
def searchers(built):
    from clipforge import open_searchers

    return open_searchers({"shapes": built["shapes"].index_dir, "more": built["more"].index_dir,
                           "again": built["again"]})


@pytest.fixture(scope="module")
def alone(built):
    """Each index opened by itself: the reference answers."""
    from clipforge import Searcher

    return {"shapes": Searcher(built["shapes"].index_dir), "more": Searcher(built["more"].index_dir)}


@pytest.fixture(scope="module")
def client(searchers):
    return TestClient(create_app(searchers), raise_server_exceptions=True)


class Ranking:
    """The ids of an answer in order, and their scores (the API rounds them to 5 decimals)."""

    def __init__(self, answer: dict) -> None:
        self.ids = [h["id"] for h in answer["results"]]
        self.scores = [h["score"] for h in answer["results"]]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ranking) and self.ids == other.ids and self.scores == pytest.approx(
            other.scores, abs=1e-5)

    def __repr__(self) -> str:
        return f"Ranking({list(zip(self.ids, self.scores))})"


def test_one_encoder_per_model(searchers):
    shapes, more, again = searchers["shapes"], searchers["more"], searchers["again"]
    assert shapes.encoder is again.encoder and shapes._lock is again._lock
    assert more.encoder is not shapes.encoder and more._lock is not shapes._lock
    assert more.encoder.fingerprint != shapes.encoder.fingerprint  # two models indeed
    assert list(searchers) == ["shapes", "more", "again"]


def test_each_name_routes_to_its_index(client, alone, built):
    for name in ("shapes", "more"):
        body = client.get("/api/search", params={"text": "a red circle", "k": 6, "index": name}).json()
        assert Ranking(body) == Ranking(alone[name].search(text="a red circle", k=6))
        first = body["results"][0]
        version = alone[name].info["index_file"]["sha256"][:12]
        assert first["image_url"] == f"/api/image/{first['id']}?index={name}&v={version}"
        image = client.get(first["image_url"])
        assert image.status_code == 200 and image.content == built[name].paths[first["id"]].read_bytes()
        by_id = client.get("/api/search", params={"id": 3, "k": 5, "index": name}).json()
        assert Ranking(by_id) == Ranking(alone[name].search_by_id(3, k=5))
    # no name: the first index given
    assert Ranking(client.get("/api/search", params={"text": "a blue square", "k": 4}).json()) == \
        Ranking(alone["shapes"].search(text="a blue square", k=4))
    # the same embeddings indexed twice answer alike
    assert Ranking(client.get("/api/search", params={"text": "a blue square", "k": 4, "index": "again"}).json()) == \
        Ranking(alone["shapes"].search(text="a blue square", k=4))


def test_posts_take_the_index_field(client, alone, built):
    upload = built["more"].paths[7].read_bytes()
    body = client.post("/api/search", files={"image": ("q.png", upload, "image/png")},
                       data={"k": "5", "index": "more", "text": "a green star"}).json()
    assert Ranking(body) == Ranking(alone["more"].search(text="a green star", image=upload, k=5))
    labels = ["a red circle", "a blue square", "a green star"]
    answer = client.post("/api/classify", files={"image": ("q.png", upload, "image/png")},
                         data={"labels": '["a red circle", "a blue square", "a green star"]', "index": "more"})
    expected = alone["more"].classify(upload, labels)
    assert [r["label"] for r in answer.json()["labels"]] == [r["label"] for r in expected]
    assert [r["probability"] for r in answer.json()["labels"]] == pytest.approx(
        [r["probability"] for r in expected], abs=1e-5)


def test_listing_info_and_health(client, built):
    listing = client.get("/api/indices").json()
    assert listing["default"] == "shapes"
    assert [(i["name"], i["images"]) for i in listing["indices"]] == [("shapes", 40), ("more", 30), ("again", 40)]
    info = client.get("/api/info", params={"index": "more"}).json()
    assert info["name"] == "more" and info["images"] == 30
    assert client.get("/api/info").json()["name"] == "shapes"
    assert client.get("/healthz").json() == {"status": "ok", "images": 110,
                                             "indices": {"shapes": 40, "more": 30, "again": 40}}


@pytest.mark.parametrize("method, path, kwargs", [
    ("get", "/api/search", {"params": {"text": "a red circle", "index": "nope"}}),
    ("get", "/api/search", {"params": {"id": "1", "index": "../shapes"}}),
    ("get", "/api/info", {"params": {"index": "SHAPES"}}),
    ("get", "/api/image/1", {"params": {"index": "nope"}}),
    # files={"k": (None, "3")}: a multipart body of text fields only
    ("post", "/api/search", {"data": {"text": "a red circle", "index": "nope"}, "files": {"k": (None, "3")}}),
    ("post", "/api/classify", {"data": {"labels": '["a"]', "index": "nope"}, "files": {"k": (None, "3")}}),
])
def test_an_unknown_index_is_a_404_naming_the_served_ones(client, method, path, kwargs):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 404, response.text
    assert "no index named" in response.json()["error"] and "shapes, more, again" in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_an_id_is_checked_against_its_own_index(client):
    assert client.get("/api/image/35", params={"index": "shapes"}).status_code == 200
    response = client.get("/api/image/35", params={"index": "more"})  # more has ids 0..29
    assert response.status_code == 404 and "ids are 0..29" in response.json()["error"]


def test_metrics_per_index(searchers):
    from prometheus_client.parser import text_string_to_metric_families

    app_client = TestClient(create_app(searchers))
    for name, count in (("shapes", 2), ("more", 1)):
        for _ in range(count):
            assert app_client.get("/api/search", params={"text": "a red circle", "index": name}).status_code == 200
    assert app_client.get("/api/search", params={"id": 2, "index": "again"}).status_code == 200
    assert app_client.get("/api/search", params={"text": "x", "index": "nope"}).status_code == 404
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(app_client.get("/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    stages = {(dict(k)["index"], dict(k)["stage"]): v for k, v in samples["clipforge_query_stage_seconds_count"].items()}
    assert stages == {("shapes", "encode_text"): 2, ("shapes", "knn"): 2, ("shapes", "metadata"): 2,
                      ("more", "encode_text"): 1, ("more", "knn"): 1, ("more", "metadata"): 1,
                      ("again", "knn"): 1, ("again", "metadata"): 1}
    assert {dict(k)["index"]: v for k, v in samples["clipforge_index_images"].items()} == \
        {"shapes": 40, "more": 30, "again": 40}


def test_concurrent_queries_on_a_shared_model_agree_with_serial(searchers, alone):
    """Two indices on one model and one on another, queried from 8 threads of a live server at once."""
    queries = [(name, text) for name in ("shapes", "more", "again")
               for text in ("a red circle", "a blue square", "a green star", "a small yellow triangle")] * 2
    reference = {"shapes": alone["shapes"], "more": alone["more"], "again": alone["shapes"]}
    with running_server(create_app(searchers)) as base:
        def ask(query):
            name, text = query
            return httpx.get(f"{base}/api/search", params={"text": text, "k": 5, "index": name}, timeout=60).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, queries))
    for (name, text), answer in zip(queries, answers):
        assert Ranking(answer) == Ranking(reference[name].search(text=text, k=5)), (name, text)


def test_index_names_from_the_command_line(tmp_path):
    assert index_names(["runs/shapes-index", "b=runs/other", "runs/x/"]) == {
        "shapes-index": "runs/shapes-index", "b": "runs/other", "x": "runs/x/"}
    with pytest.raises(UserError, match="given twice"):
        index_names(["a/idx", "b/idx"])
    with pytest.raises(UserError, match=r"index name 'my idx'.*name it: NAME="):
        index_names(["runs/my idx"])
    with pytest.raises(UserError, match="directory is missing"):
        index_names(["a="])
    with pytest.raises(UserError, match="index name ''"):
        index_names(["=runs/a"])


def test_serve_refuses_bad_names_before_loading(capsys):
    assert main(["serve", "a=/does/not/exist", "a=/nor/this"]) != 0
    assert "given twice" in capsys.readouterr().err
