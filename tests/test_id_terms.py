"""Images of the index as query terms (`#42`): `"a red circle" + #5 - 0.5:#9` against a float64 ranking of the
stored vectors built by hand from the same terms, `#5` alone against `search_by_id(5)`, its copies hidden by dedup,
batches against one-at-a-time answers, through the CLI and the API; unknown ids refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_helpers import assert_ranking, exact_top_k
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search.errors import SearchError
from clipforge.search.query import QueryTerm, parse_query
from clipforge.search.server import create_app


def test_parsing():
    assert parse_query("beach + #42 - 0.5:#17") == [QueryTerm("text", "beach", 1.0), QueryTerm("id", 42, 1.0),
                                                     QueryTerm("id", 17, -0.5)]
    for text in ["#1 hit song", "#", "#-3", "#4a", "##4"]:  # only a bare #DIGITS names an image
        assert parse_query(text) == [QueryTerm("text", text, 1.0)]
    assert parse_query("#7", allow_paths=False)[0] == QueryTerm("id", 7, 1.0)  # the server's parsing too
    assert QueryTerm("id", 7, -0.5).describe() == "-0.5×image #7"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("idterms"), count=40, copies={5: 2})


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_mixed_terms_against_a_hand_built_query(built, searcher):
    vectors = built.vectors.astype(np.float64)
    text = searcher.encode_texts(["a red circle"])[0].astype(np.float64)
    query = unit(unit(text) + unit(vectors[7]) - 0.5 * unit(vectors[9]))
    want = [hit for hit in exact_top_k(vectors, query, 9) if hit[0] != 7][:8]  # its own image left out, not #9
    answer = searcher.search_terms(parse_query("a red circle + #7 - 0.5:#9"), k=8)
    assert_ranking(answer["results"], want)
    python = searcher.search(text="a red circle", ids=[(7, 1.0), (9, -0.5)], k=8)  # the Python API's form
    assert_ranking(python["results"], want)
    assert answer["threshold"] is None  # an image term: not judged by the caption-calibrated threshold


def test_an_image_alone_is_search_by_id(built, searcher):
    alone = searcher.search(ids=3, k=6)
    assert [h["id"] for h in alone["results"]] == [h["id"] for h in searcher.search_by_id(3, k=6)["results"]]
    copies = [i for i, path in enumerate(built.paths) if path.name.startswith("img_00005")]
    assert len(copies) == 3  # image 5 and its two byte-identical copies
    collapsed = searcher.search(ids=copies[0], k=5, dedup=0.9999)
    assert not {h["id"] for h in collapsed["results"]} & set(copies) and collapsed["hidden"] >= 2
    stored = built.vectors[copies].astype(np.float64)
    assert (stored @ unit(stored[0]) >= 0.9999 * np.linalg.norm(stored, axis=1)).all()  # why they were hidden


def test_batches_and_errors(built, searcher):
    queries = ["#3", "a red circle + #7", "a blue square", "#999"]
    answers = searcher.search_batch(queries, k=4)
    for query, answer in zip(queries[:3], answers):
        one = searcher.search_terms(parse_query(query), k=4)
        assert_ranking(answer["results"], [(h["id"], h["score"]) for h in one["results"]])
    assert "id 999 does not exist" in answers[3]["error"]
    with pytest.raises(SearchError, match="id 999 does not exist"):
        searcher.search(text="beach", ids=[999])
    with pytest.raises(SearchError, match="ids: expected ids of the index"):
        searcher.search(ids=["7"])


def test_cli_and_api(built, searcher, tmp_path, capsys):
    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), "#3", "-k", "5", "--output", str(out)]) == 0
    by_id = [h["id"] for h in searcher.search_by_id(3, k=5)["results"]]
    assert [h["id"] for h in json.loads(out.read_text())["results"]] == by_id
    assert "+1×image #3" in capsys.readouterr().out
    assert main(["search", str(built.index_dir), "beach", "+", "#999"]) == 2
    assert "id 999 does not exist" in capsys.readouterr().err
    client = TestClient(create_app(searcher))
    answer = client.get("/api/search", params={"text": "#3", "k": 5})
    assert answer.status_code == 200 and [h["id"] for h in answer.json()["results"]] == by_id
    bad = client.get("/api/search", params={"text": "beach + #999"})
    assert bad.status_code == 400 and "id 999 does not exist" in bad.json()["error"]
    assert client.get("/healthz").status_code == 200
