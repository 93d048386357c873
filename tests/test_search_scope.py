"""Searching under a folder (`under=`, `--under`): which rows a folder holds, and answers against a float64 ranking
of the stored vectors of those rows only, on every index kind and both search paths (exact scan of a small
scope, the faiss index through a bitmap selector for a large one), through the CLI, the Searcher and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_helpers import (
    assert_ranking,
    clustered,
    embedding_folder,
    exact_top_k,
    unit,
)
from search_index import build_small_index

import clipforge.search.index as index_module
from clipforge.cli import main
from clipforge.search.build import BuildOptions, add_to_index, build_index
from clipforge.search.errors import SearchError
from clipforge.search.index import open_index
from clipforge.search.scope import normalize_under
from clipforge.search.server import create_app

DIM = 32
ROWS = 3000
# Folder of row i: four top folders, the first split in two, and a sibling whose name extends the first's
# (`a/...` must not take `ab/...`).
FOLDERS = ("a/x", "a/y", "ab", "b", "c/d/e")


def _key(i: int) -> str:
    return f"{FOLDERS[i % len(FOLDERS)]}/img{i}"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope")
    img, text = clustered(np.random.default_rng(0), ROWS, DIM)
    emb = embedding_folder(root / "emb", img, text, part_rows=700, keys=[_key(i) for i in range(ROWS)])
    stored_img = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("*.npy"),
                                                             key=lambda p: int(p.stem.split("_")[-1]))])
    stored_text = np.concatenate([np.load(p) for p in sorted((emb / "text_emb").glob("*.npy"),
                                                              key=lambda p: int(p.stem.split("_")[-1]))])
    return root, emb, stored_img.astype(np.float64), stored_text.astype(np.float64)


def _rows_under(folders: tuple[str, ...], removed: set[int] = frozenset()) -> set[int]:
    return {i for i in range(ROWS) if i not in removed
            and any(_key(i) == f or _key(i).startswith(f + "/") for f in folders)}


def test_folder_names_and_their_rows(collection, tmp_path):
    _, emb, _, _ = collection
    build_index([emb], tmp_path / "i", BuildOptions(kind="flat", queries=50))
    index = open_index(tmp_path / "i")
    assert set(index.scope("a").ids.tolist()) == _rows_under(("a/x", "a/y"))  # both subfolders, not `ab`
    assert set(index.scope("ab").ids.tolist()) == _rows_under(("ab",))
    assert set(index.scope(["a/y", "c"]).ids.tolist()) == _rows_under(("a/y", "c/d/e"))
    assert index.scope("a/").ids.tolist() == index.scope("./a").ids.tolist() == index.scope("a").ids.tolist()
    assert index.scope("/nowhere/a").ids.tolist() == index.scope("a").ids.tolist()  # the files' absolute paths
    assert index.scope("c/d/e/img4").ids.tolist() == [4]  # a key itself
    # scopes read (and keep) the key and path columns alone: captions stay on disk until a result needs them
    assert not any(source._tables for source in index.sources)
    assert all(set(t.column_names) == {"key", "path"} for s in index.sources for t in s._narrow.values())
    index.metadata([0, 2999])  # the first and last parts' whole tables, as serving results reads them
    assert set(index.scope(["b", "ab"]).ids.tolist()) == _rows_under(("ab", "b"))  # those parts from the cache
    assert index.scope(None) is None
    with pytest.raises(SearchError, match=r"under a/z: no image of the index lies under it \(keys look like 'a/x/"):
        index.scope("a/z")
    with pytest.raises(SearchError, match="under /a: no image"):
        index.scope("/a")  # an absolute path matches paths, never keys
    for bad in ["", "  ", "../a", "..", 3, ["a", None]]:
        with pytest.raises(SearchError, match="under"):
            normalize_under(bad)
    add_to_index(tmp_path / "i", [], remove=np.arange(0, ROWS, 2))  # removed rows leave every scope
    index = open_index(tmp_path / "i")
    assert set(index.scope("a").ids.tolist()) == _rows_under(("a/x", "a/y"), set(range(0, ROWS, 2)))


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize("path", ["scan", "selector"])
def test_scoped_search_ranks_the_folder_only(collection, tmp_path, monkeypatch, kind, path):
    """Against a float64 ranking of the folder's stored float16 vectors: exact on the scan path and on a flat
    index's selector path; on IVF-PQ / HNSW through a selector, every hit inside the folder with the recall the
    index was tuned to (0.9) less a margin for the sample."""
    _, emb, img, text = collection
    build_index([emb], tmp_path / kind, BuildOptions(kind=kind, target_recall=0.9, queries=200))
    if path == "selector":
        monkeypatch.setattr(index_module, "SCAN_ROWS", 0)
    index = open_index(tmp_path / kind)
    scope = index.scope(["a", "c/d/e"])
    inside = np.array(sorted(_rows_under(("a/x", "a/y", "c/d/e"))))
    assert scope.ids.tolist() == inside.tolist()
    queries = unit(np.random.default_rng(3).standard_normal((20, DIM))).astype(np.float32)
    exact = path == "scan" or kind == "flat"
    for batch in (queries, queries[:1]):  # 20 queries take the flat index's block scan, one query faiss
        scores, ids = index.search(batch, 10, scope)
        assert set(ids.ravel().tolist()) <= set(inside.tolist())
        hits = 0
        for row, query in enumerate(batch):
            want = [(int(inside[i]), s) for i, s in exact_top_k(img[inside], query, 10)]
            got = [{"id": int(i), "score": float(s)} for i, s in zip(ids[row], scores[row])]
            if exact:
                assert_ranking(got, want)
            hits += len({h["id"] for h in got} & {i for i, _ in want})
        if not exact and len(batch) > 1:
            assert hits / (10 * len(batch)) >= 0.8
    captions, found = index.search_captions(queries[:3], 5, scope)  # always exact
    for row, query in enumerate(queries[:3]):
        want = [(int(inside[i]), s) for i, s in exact_top_k(text[inside], query, 5)]
        assert_ranking([{"id": int(i), "score": float(s)} for i, s in zip(found[row], captions[row])], want)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("scoped"), count=60, subfolders=3)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


def _reference(built, searcher, query: str, folders: tuple[str, ...], k: int) -> list[tuple[int, float]]:
    keys = [m["key"] for m in searcher.index.metadata(range(len(built.vectors)))]
    inside = np.array([i for i, key in enumerate(keys) if key.split("/")[0] in folders])
    vector = searcher.query_vector(searcher_terms(query))
    return [(int(inside[i]), s) for i, s in exact_top_k(built.vectors[inside].astype(np.float64), vector, k)]


def searcher_terms(text: str):
    from clipforge.search.query import parse_query

    return parse_query(text)


def test_cli_search_and_filter_under_a_folder(built, searcher, tmp_path, capsys):
    query = "a red circle"
    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), query, "--under", "g1", "-k", "5", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(20 of 60 images, under g1)" in printed
    answer = json.loads(out.read_text())
    assert answer["under"] == ["g1"] and all(h["key"].startswith("g1/") for h in answer["results"])
    assert_ranking(answer["results"], _reference(built, searcher, query, ("g1",), 5))
    folder = built.paths[0].parent.parent / "g2"  # a directory on disk: matched by the files' paths
    assert main(["search", str(built.index_dir), query, "--under", str(folder), "--under", "g0",
                 "--output", str(out)]) == 0
    assert_ranking(json.loads(out.read_text())["results"], _reference(built, searcher, query, ("g0", "g2"), 10))
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\na blue square\n")
    assert main(["search", str(built.index_dir), "--queries", str(queries), "--under", "g1", "-k", "4",
                 "--output", str(tmp_path / "many.jsonl")]) == 0
    for line, text in zip((tmp_path / "many.jsonl").read_text().splitlines(), ["a red circle", "a blue square"]):
        one = searcher.search(text, k=4, under="g1")["results"]  # batched text embedding rounds differently
        assert_ranking(json.loads(line)["results"], [(h["id"], h["score"]) for h in one])
    manifest = tmp_path / "m.csv"
    assert main(["filter", str(built.index_dir), query, "--min-score", "-1", "--under", "g2",
                 "--manifest", str(manifest)]) == 0
    rows = manifest.read_text().splitlines()[1:]
    assert len(rows) == 20 and all("/g2/" in row for row in rows)
    capsys.readouterr()
    assert main(["search", str(built.index_dir), query, "--under", "g9"]) == 2
    assert "under g9: no image of the index lies under it" in capsys.readouterr().err


def test_searcher_dedup_by_id_and_captions_under_a_folder(built, searcher):
    keys = {m["id"]: m["key"] for m in searcher.index.metadata(range(len(built.vectors)))}
    answer = searcher.search("a red circle", k=25, under="g0")
    assert len(answer["results"]) == 20  # k beyond the folder: all of it, no padding
    collapsed = searcher.search("a red circle", k=5, under="g0", dedup=0.999)
    assert all(keys[h["id"]].startswith("g0/") for h in collapsed["results"]) and collapsed["under"] == ["g0"]
    outside = next(i for i, key in keys.items() if key.startswith("g1/"))
    like = searcher.search_by_id(outside, k=5, under="g0")  # the query image may lie elsewhere
    vector = built.vectors[outside].astype(np.float64)
    inside = np.array([i for i, key in keys.items() if key.startswith("g0/")])
    assert_ranking(like["results"], [(int(inside[i]), s) for i, s in exact_top_k(built.vectors[inside], vector, 5)])
    described = searcher.search("a red circle", k=3, under="g2", modality="text")
    assert described["modality"] == "text" and all(keys[h["id"]].startswith("g2/") for h in described["results"])
    batch = searcher.search_batch(["a red circle", "a blue square"], k=3, under="g2")
    for answer, text in zip(batch, ["a red circle", "a blue square"]):
        assert_ranking(answer["results"], [(h["id"], h["score"]) for h in searcher.search(text, k=3,
                                                                                          under="g2")["results"]])


def test_api_under_a_folder(built, searcher):
    client = TestClient(create_app(searcher))
    want = searcher.search("a red circle", k=4, under="g1")
    got = client.get("/api/search", params={"text": "a red circle", "k": 4, "under": "g1"})
    assert got.status_code == 200 and got.json()["under"] == ["g1"]
    assert [h["id"] for h in got.json()["results"]] == [h["id"] for h in want["results"]]
    posted = client.post("/api/search", json={"text": "a red circle", "k": 4, "under": ["g1"]})
    assert [h["id"] for h in posted.json()["results"]] == [h["id"] for h in want["results"]]
    form = client.post("/api/search", files={"text": (None, "a red circle"), "k": (None, "4"), "under": (None, "g1")})
    assert [h["id"] for h in form.json()["results"]] == [h["id"] for h in want["results"]]
    by_id = client.get("/api/search", params={"id": 0, "k": 3, "under": "g2"})
    assert by_id.status_code == 200 and all(h["key"].startswith("g2/") for h in by_id.json()["results"])
    for params, status, message in [
        ({"under": "/etc"}, 400, "not a path on the server"),
        ({"under": str(built.paths[0].parent)}, 400, "not a path on the server"),
        ({"under": "g9"}, 400, "no image of the index lies under it"),
        ({"under": "../g1"}, 400, "not a folder inside the collection"),
        ({"under": "g1" * 600}, 400, "at most 1000 characters"),
    ]:
        answer = client.get("/api/search", params={"text": "a red circle", **params})
        assert answer.status_code == status and message in answer.json()["error"], answer.json()
        assert client.get("/healthz").status_code == 200
    bad = client.post("/api/search", json={"text": "a red circle", "under": [1]})
    assert bad.status_code == 400 and "under" in bad.json()["error"]
    many = client.post("/api/search", json={"text": "a red circle", "under": [f"g{i}" for i in range(33)]})
    assert many.status_code == 400 and "at most 32 folders, got 33" in many.json()["error"]


def test_client_under_a_folder(built, searcher):
    from search_index import running_server

    from clipforge.search.client import SearchClient, SearchClientError

    with running_server(create_app(searcher)) as base:
        client = SearchClient(base)
        want = searcher.search("a red circle", k=4, under="g1")["results"]
        assert [h["id"] for h in client.search(text="a red circle", k=4, under="g1")["results"]] == \
            [h["id"] for h in want]
        by_id = client.search_by_id(0, k=3, under="g2")
        want = searcher.search_by_id(0, 3, under="g2")["results"]
        assert [h["id"] for h in by_id["results"]] == [h["id"] for h in want]
        many = client.search_many(["a red circle", "a blue square"], k=3, under=["g0", "g2"])
        assert all(h["key"].split("/")[0] in ("g0", "g2") for answer in many for h in answer["results"])
        with pytest.raises(SearchClientError, match="HTTP 400: under g9: no image of the index lies under it"):
            client.search(text="a red circle", under="g9")


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_a_selective_scope_widens_the_search(collection, tmp_path, monkeypatch, kind):
    """Through a selector letting 1 row in 20 through, an IVF / HNSW search tuned for all rows would find about
    1 / 20 as many of the rows it may return; HNSW's efSearch is widened by 2 x 20 (removed.selector_params,
    SCOPE_DEPTH), IVF probes lists by the folder's rows in them (ivf_probe; its fixed widening, nprobe x 40, is
    what faiss_params still gives), so the answer keeps the recall the index was tuned to (0.9) less a margin for
    the sample, and k places filled."""
    import faiss

    from clipforge.search.scope import Scope

    _, emb, img, _ = collection
    build_index([emb], tmp_path / kind, BuildOptions(kind=kind, target_recall=0.9, queries=200))
    monkeypatch.setattr(index_module, "SCAN_ROWS", 0)  # the selector path, as for a folder over 65,536 rows
    index = open_index(tmp_path / kind)
    allowed = np.zeros(ROWS, dtype=bool)
    allowed[::20] = True
    scope = Scope(allowed, ("every 20th row",))
    params = scope.faiss_params(index.faiss_index)
    if kind == "hnsw":
        assert params.efSearch == min(40 * faiss.downcast_index(index.faiss_index).hnsw.efSearch, 4096)
    else:
        ivf = faiss.extract_index_ivf(index.faiss_index)
        assert params.nprobe == min(40 * ivf.nprobe, ivf.nlist)
    inside = np.flatnonzero(allowed)
    queries = unit(np.random.default_rng(5).standard_normal((20, DIM))).astype(np.float32)
    _, ids = index.search(queries, 10, scope)
    assert (ids >= 0).all() and set(ids.ravel().tolist()) <= set(inside.tolist())
    hits = sum(len(set(ids[row].tolist()) & {int(inside[i]) for i, _ in exact_top_k(img[inside], query, 10)})
               for row, query in enumerate(queries))
    assert hits / (10 * len(queries)) >= 0.8
