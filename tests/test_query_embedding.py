"""Query vectors given as numbers (`Searcher.search(embedding=)`, the API's `embedding`, `--embedding F.npy`) and
the JSON form of POST /api/search; answers checked against an exact float64 ranking of the stored vectors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_helpers import assert_ranking, exact_top_k
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search.errors import SearchError
from clipforge.search.query import embedding_term
from clipforge.search.server import create_app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("vectors"), count=40)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    return TestClient(create_app(searcher))


def query_vector(rng: np.random.Generator, built) -> np.ndarray:
    return (built.vectors[7] + 0.05 * rng.standard_normal(built.vectors.shape[1])).astype(np.float32)


def test_search_by_a_given_vector_matches_the_exact_ranking(searcher, built):
    vector = query_vector(np.random.default_rng(0), built)
    answer = searcher.search(embedding=vector, k=8)
    assert_ranking(answer["results"], exact_top_k(built.vectors, vector, 8))
    assert answer["threshold"] is None  # the calibrated threshold judges text-only queries
    # mixed with a text: the weighted sum of the two unit vectors
    text = searcher.encode_texts(["a red circle"])[0]
    mixed = searcher.search(text="a red circle", embedding=[(vector, -0.5)], k=8)
    assert_ranking(mixed["results"], exact_top_k(built.vectors, text - 0.5 * vector / np.linalg.norm(vector), 8))
    # several at once: [n, d]
    both = searcher.search(embedding=np.stack([vector, built.vectors[3]]), k=5)
    want = vector / np.linalg.norm(vector) + built.vectors[3] / np.linalg.norm(built.vectors[3])
    assert_ranking(both["results"], exact_top_k(built.vectors, want, 5))


@pytest.mark.parametrize("value, fragment", [
    (np.ones(7), "7 numbers, this index holds"),
    (np.full(128, np.nan), "NaN"),
    (np.zeros(128), "all zeros"),
    (np.ones((2, 3, 4)), "expected one vector"),
    ("abc", "flat list of numbers"),
])
def test_a_bad_vector_is_refused_in_one_line(searcher, value, fragment):
    with pytest.raises(SearchError, match=fragment):
        searcher.search(embedding=value, k=3)


def test_batch_takes_vector_terms(searcher, built):
    vector = query_vector(np.random.default_rng(1), built)
    answers = searcher.search_batch([[embedding_term(vector)], [embedding_term(np.ones(5))]], k=4)
    assert_ranking(answers[0]["results"], exact_top_k(built.vectors, vector, 4))
    assert "5 numbers" in answers[1]["error"]


def test_api_json_and_multipart_embedding(client, searcher, built):
    vector = query_vector(np.random.default_rng(2), built)
    body = client.post("/api/search", json={"embedding": vector.tolist(), "k": 6}).json()
    assert_ranking(body["results"], exact_top_k(built.vectors, vector, 6))
    form = client.post("/api/search", files={"embedding": (None, json.dumps(vector.tolist())), "k": (None, "6")})
    assert [h["id"] for h in form.json()["results"]] == [h["id"] for h in body["results"]]
    # JSON with text and a base64 image answers as the multipart upload does
    data = built.paths[4].read_bytes()
    as_json = client.post("/api/search", json={"text": "a red circle", "image": base64.b64encode(data).decode(),
                                               "k": 5, "dedup": 0.99995}).json()
    as_form = client.post("/api/search", files={"image": ("q.png", data, "image/png")},
                          data={"text": "a red circle", "k": "5", "dedup": "0.99995"}).json()
    assert as_json == as_form and as_json["dedup"] == 0.99995


@pytest.mark.parametrize("kwargs, fragment", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "malformed JSON body"),
    ({"json": [1, 2]}, "expected a JSON object"),
    ({"json": {"text": "a cat", "color": "red"}}, "unknown field 'color'"),
    ({"json": {"image": "not base64!"}}, "image: not valid base64"),
    ({"json": {"text": 5}}, "text: expected a string"),
    ({"json": {"embedding": [1, 2, 3]}}, "3 numbers, this index holds"),
    ({"json": {"embedding": "[1, 2"}}, "embedding: malformed JSON"),
    ({"json": {"embedding": [1, "a"]}}, "expected a JSON list of numbers"),
    ({"json": {"embedding": [True] * 128}}, "expected a JSON list of numbers"),
    ({"json": {"k": 5}}, "give an image, a text, an embedding"),
    ({"json": {"text": "a cat", "k": 0}}, "k: expected"),
    ({"json": {"text": "a cat", "index": "other"}}, "no index named 'other'"),
])
def test_bad_json_requests_get_4xx_and_the_server_stays_up(client, kwargs, fragment):
    response = client.post("/api/search", **kwargs)
    assert 400 <= response.status_code < 500 and fragment in response.json()["error"], response.text
    assert client.get("/healthz").status_code == 200


def test_cli_embedding_file(searcher, built, tmp_path, capsys):
    vector = query_vector(np.random.default_rng(3), built)
    np.save(tmp_path / "q.npy", vector[None, :])  # [1, d] is taken as one vector
    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), "--embedding", str(tmp_path / "q.npy"), "-k", "5",
                 "--output", str(out)]) == 0
    assert_ranking(json.loads(out.read_text())["results"], exact_top_k(built.vectors, vector, 5))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["search", str(built.index_dir), "--embedding", str(tmp_path / "objects.npy")]) != 0
    assert "not a readable .npy array" in capsys.readouterr().err  # never unpickled
