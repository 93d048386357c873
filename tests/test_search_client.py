"""`SearchClient` against a live `clipforge serve` (uvicorn on 127.0.0.1) of two indices: every answer equals
what the served Searcher gives in-process, errors carry the server's status and message."""

from __future__ import annotations

import socket

import pytest
from search_index import build_small_index, running_server

from clipforge.search.client import SearchClient, SearchClientError
from clipforge.search.server import create_app, public_answer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from clipforge import open_searchers

    first = build_small_index(tmp_path_factory.mktemp("client-a"), count=30, seed=0)
    second = build_small_index(tmp_path_factory.mktemp("client-b"), count=20, seed=1)
    searchers = open_searchers({"a": first.index_dir, "b": second.index_dir})
    _VERSIONS.update({name: s.info["index_file"]["sha256"][:12] for name, s in searchers.items()})
    with running_server(create_app(searchers)) as base:
        yield base, searchers, {"a": first, "b": second}


def api(answer: dict, name: str | None = None) -> dict:
    """The JSON the server makes of a Searcher answer (image URLs name the index, two being served, and its
    version)."""
    version = _VERSIONS[name or "a"]
    return public_answer(answer, lambda i: f"/api/image/{i}?index={name or 'a'}&v={version}")


_VERSIONS: dict[str, str] = {}  # index name -> the first 12 hex of its faiss file's sha256 (set by `served`)


def test_search_forms_equal_the_served_searchers(served):
    base, searchers, built = served
    client = SearchClient(base)
    assert client.search(text="a red circle", k=5) == api(searchers["a"].search(text="a red circle", k=5))
    photo = built["b"].paths[3]
    assert client.search(image=photo, text="a blue square", k=4, index="b", dedup=0.99995) == \
        api(searchers["b"].search(image=photo, text="a blue square", k=4, dedup=0.99995), "b")
    vector = built["a"].vectors[2].tolist()
    assert client.search(embedding=vector, k=3) == api(searchers["a"].search(embedding=vector, k=3))
    assert client.search(text="a green star", k=3, modality="text") == \
        api(searchers["a"].search(text="a green star", k=3, modality="text"))
    assert client.search_by_id(4, k=6, index="b") == api(searchers["b"].search_by_id(4, k=6), "b")
    on_b = SearchClient(base, index="b")  # a client bound to one index
    assert on_b.search(text="a red circle", k=2) == api(searchers["b"].search(text="a red circle", k=2), "b")


def test_search_many_in_order_with_errors_in_place(served):
    base, searchers, _ = served
    texts = ["a red circle", "word " * 100, "a blue square", "a green star"] * 3
    answers = SearchClient(base).search_many(texts, k=4, workers=4)
    for text, answer in zip(texts, answers):
        if text.startswith("word"):
            assert "tokens long" in answer["error"]
        else:
            assert answer == api(searchers["a"].search(text=text, k=4))


def test_image_classify_listing(served):
    base, searchers, built = served
    client = SearchClient(base)
    assert client.image(7, index="b") == built["b"].paths[7].read_bytes()
    labels = ["a red circle", "a blue square"]
    got = client.classify(built["a"].paths[1], labels)
    want = searchers["a"].classify(built["a"].paths[1], labels)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["probability"] for r in got] == pytest.approx([r["probability"] for r in want], abs=1e-6)
    assert [i["name"] for i in client.indices()["indices"]] == ["a", "b"]
    assert client.info(index="b")["images"] == 20


def test_errors_carry_status_and_message(served, tmp_path):
    base, _, _ = served
    client = SearchClient(base)
    with pytest.raises(SearchClientError, match="HTTP 404: index: no index named 'c'") as caught:
        client.search(text="a cat", index="c")
    assert caught.value.status == 404
    with pytest.raises(SearchClientError, match="HTTP 400: k: expected"):
        client.search(text="a cat", k=0)
    with pytest.raises(SearchClientError, match="HTTP 404: no image with id"):
        client.image(999)
    with pytest.raises(SearchClientError, match="cannot read the image file"):
        client.search(image=tmp_path / "none.png")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SearchClientError, match="no answer") as caught:
        SearchClient(f"http://127.0.0.1:{port}", timeout=5).search(text="a cat")
    assert caught.value.status == 0
    with pytest.raises(ValueError, match="expected http"):
        SearchClient("127.0.0.1:8000")
