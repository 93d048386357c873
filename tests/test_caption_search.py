"""Searching the stored caption embeddings (`modality="text"`, clip-retrieval's text modality): answers against a
float64 ranking of the caption vectors `embed` wrote, across the index's two embedding parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_helpers import assert_ranking, clustered, embedding_folder, exact_top_k
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search.build import BuildOptions, build_index
from clipforge.search.errors import SearchError
from clipforge.search.index import open_index
from clipforge.search.server import create_app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("captions"), count=40)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


@pytest.fixture(scope="module")
def captions(built) -> np.ndarray:
    """The stored caption vectors [n, d] in id order, read from the parts' files."""
    emb = built.index_dir.parent / "emb"
    files = sorted((emb / "text_emb").glob("text_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    assert len(files) == 2  # the index spans two parts: the scan merges across them
    return np.concatenate([np.load(f) for f in files]).astype(np.float64)


def test_text_query_against_captions(searcher, built, captions):
    query = searcher.encode_texts(["a red circle"])[0]
    answer = searcher.search(text="a red circle", k=9, modality="text")
    assert_ranking(answer["results"], exact_top_k(captions, query, 9))
    assert answer["modality"] == "text" and answer["threshold"] is None  # calibrated for images only
    assert answer["results"][0]["caption"] == built.captions[answer["results"][0]["id"]]
    assert "modality" not in searcher.search(text="a red circle", k=3)  # the default: images


def test_image_against_captions_keeps_its_own(searcher, built, captions):
    answer = searcher.search_by_id(5, k=40, modality="text")
    image = built.vectors[5].astype(np.float64)
    assert_ranking(answer["results"], exact_top_k(captions, image, 40))
    assert 5 in [h["id"] for h in answer["results"]]  # its own caption is a fair answer here


def test_batch_and_dedup_with_captions(searcher):
    queries = ["a red circle", "a blue square", "a green star"]
    for query, answer in zip(queries, searcher.search_batch(queries, k=5, modality="text")):
        assert_ranking(answer["results"], [(h["id"], h["score"]) for h in
                                           searcher.search(text=query, k=5, modality="text")["results"]])
    collapsed = searcher.search(text="a red circle", k=5, modality="text", dedup=0.99995)
    plain = searcher.search(text="a red circle", k=40, modality="text")["results"]
    order = [h["id"] for h in plain]
    shown = [h["id"] for h in collapsed["results"]]
    assert shown == sorted(shown, key=order.index)  # in the caption ranking's order
    hidden = [i for h in collapsed["results"] for i in h["duplicates"]]
    assert collapsed["hidden"] == len(hidden) and not set(hidden) & set(shown)


def test_api_and_cli(searcher, built, captions, tmp_path, capsys):
    client = TestClient(create_app(searcher))
    body = client.get("/api/search", params={"text": "a blue square", "k": 6, "modality": "text"}).json()
    assert body["modality"] == "text"
    assert_ranking(body["results"], exact_top_k(captions, searcher.encode_texts(["a blue square"])[0], 6))
    posted = client.post("/api/search", json={"text": "a blue square", "k": 6, "modality": "text"}).json()
    assert [h["id"] for h in posted["results"]] == [h["id"] for h in body["results"]]
    bad = client.get("/api/search", params={"text": "a cat", "modality": "audio"})
    assert bad.status_code == 400 and "modality: expected one of image, text" in bad.json()["error"]
    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), "a blue square", "--modality", "text", "-k", "6",
                 "--output", str(out)]) == 0
    assert "matched against the images' captions" in capsys.readouterr().out
    assert [h["id"] for h in json.loads(out.read_text())["results"]] == [h["id"] for h in body["results"]]


def test_an_index_without_captions_says_so(tmp_path):
    img, _ = clustered(np.random.default_rng(0), 300, 16)
    emb = embedding_folder(tmp_path / "emb", img.astype(np.float32), None, part_rows=100)
    build_index([emb], tmp_path / "index", BuildOptions(kind="flat", queries=50))
    index = open_index(tmp_path / "index")
    assert not index.has_captions
    with pytest.raises(SearchError, match="no caption vectors"):
        index.search_captions(img[:2].astype(np.float32), 3)
