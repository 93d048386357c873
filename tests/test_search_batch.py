"""Batched search (`Searcher.search_batch`, `clipforge search --queries`): the answers of queries asked one by one,
each distinct text and image embedded once, in batches, and one index search for all of them."""

from __future__ import annotations

import csv
import io
import json

import pytest
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search import batch
from clipforge.search.errors import SearchError
from clipforge.search.query import parse_query

TOL = 1e-5  # batched and single forward passes may round differently in the last bits


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("batch"), count=40)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


def assert_same_ranking(got: dict, want: dict) -> None:
    """Equal answers, allowing hits whose scores agree within TOL to trade places (or places at the k-th cut)."""
    got_scores, want_scores = [h["score"] for h in got["results"]], [h["score"] for h in want["results"]]
    assert got_scores == pytest.approx(want_scores, abs=TOL)
    for g, w in zip(got["results"], want["results"]):
        if g["id"] != w["id"]:
            near = [h["id"] for h in got["results"] if abs(h["score"] - w["score"]) <= 2 * TOL]
            assert w["id"] in near or abs(w["score"] - got_scores[-1]) <= 2 * TOL, (g, w)
    assert got["no_good_match"] == want["no_good_match"] and got["threshold"] == want["threshold"]
    for key in ("dedup", "hidden"):
        assert got.get(key) == want.get(key)


def queries_for(built) -> list[str]:
    return ["a red circle", "a blue square", "a red circle",  # a repeated text
            f"{built.paths[3]}", f"a green star + 0.5:{built.paths[7]}", f"a small triangle - {built.paths[3]}",
            "2:a yellow circle - 0.5:a blue square", "circle"]


def test_batch_equals_one_query_at_a_time(searcher, built):
    queries = queries_for(built)
    answers = searcher.search_batch(queries, k=7, allow_paths=True)
    assert len(answers) == len(queries)
    for query, answer in zip(queries, answers):
        assert_same_ranking(answer, searcher.search_terms(parse_query(query), 7))
    # k past the index size answers with every image
    assert len(searcher.search_batch(["a red circle"], k=500)[0]["results"]) == 40


def test_batch_with_dedup_equals_one_query_at_a_time(searcher, built):
    queries = queries_for(built)
    for query, answer in zip(queries, searcher.search_batch(queries, k=5, dedup=0.99995, allow_paths=True)):
        want = searcher.search_terms(parse_query(query), 5, 0.99995)
        assert_same_ranking(answer, want)
        assert [h["duplicates"] for h in answer["results"]] == [h["duplicates"] for h in want["results"]] or \
            answer["results"][-1]["score"] == pytest.approx(want["results"][-1]["score"], abs=TOL)


def test_each_text_and_image_embedded_once_in_batches_and_one_index_search(searcher, built, monkeypatch):
    monkeypatch.setattr(batch, "TEXT_BATCH", 3)
    calls: dict[str, int] = {}

    def count(stage: str, seconds: float) -> None:
        calls[stage] = calls.get(stage, 0) + 1

    searcher.add_timing_listener(count)
    try:
        # 6 distinct texts (red circle and blue square come twice), 2 distinct image paths (paths[3] twice)
        queries = queries_for(built)
        searcher.search_batch(queries, k=3, allow_paths=True)
    finally:
        searcher._listeners.remove(count)
    assert calls["encode_text"] == 2  # 6 texts in batches of 3 (one at a time would be 9 forward passes)
    assert calls["encode_image"] == 1 and calls["knn"] == 1 and calls["metadata"] == len(queries)


def test_a_bad_query_gets_its_error_and_the_others_their_answers(searcher, built):
    queries = ["a red circle", "word " * 100, f"a cat + {built.paths[0].parent}/missing.png", "a +", "cat - cat",
               "a blue square"]
    answers = searcher.search_batch(queries, k=4, allow_paths=True)
    assert "tokens long" in answers[1]["error"]
    assert "missing.png" in answers[2]["error"] and "no such image file" in answers[2]["error"]
    assert "ends with an operator" in answers[3]["error"]
    assert "cancel out" in answers[4]["error"]
    for i in (0, 5):
        assert_same_ranking(answers[i], searcher.search_terms(parse_query(queries[i], allow_paths=False), 4))
    # "raise" stops at the first failure found: malformed queries before any forward pass, then texts
    with pytest.raises(SearchError, match=r"query 4 \('a \+'\): query: it ends with an operator"):
        searcher.search_batch(queries, k=4, on_error="raise")
    with pytest.raises(SearchError, match=r"query 2 \('word word.*tokens long"):
        searcher.search_batch(queries[:3], k=4, on_error="raise", allow_paths=True)


def test_python_queries_take_parsed_terms_and_images_as_bytes(searcher, built, monkeypatch):
    from clipforge.search.query import QueryTerm

    data = built.paths[5].read_bytes()
    answers = searcher.search_batch([[QueryTerm("image", data, 1.0)], [QueryTerm("text", "a red circle", 1.0)]], k=3)
    assert_same_ranking(answers[0], searcher.search(image=data, k=3))
    assert_same_ranking(answers[1], searcher.search(text="a red circle", k=3))
    # without allow_paths a text naming a file stays a text; with it, the file is the query image
    monkeypatch.chdir(built.paths[5].parent)
    name = built.paths[5].name
    assert_same_ranking(searcher.search_batch([name], k=3)[0], searcher.search(text=name, k=3))
    assert_same_ranking(searcher.search_batch([name], k=3, allow_paths=True)[0], searcher.search(image=name, k=3))


def test_cli_queries_file_to_jsonl_and_csv(searcher, built, tmp_path, capsys):
    queries = queries_for(built)
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join([queries[0], "", queries[4], "word " * 100, queries[6]]) + "\n")
    out = tmp_path / "hits.jsonl"
    assert main(["search", str(built.index_dir), "--queries", str(qfile), "-k", "4", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "3 of 4 queries answered" in err and "line 4:" in err and "tokens long" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4, 5]
    assert "error" in records[2] and "results" not in records[2]
    for record in (records[0], records[1], records[3]):
        assert_same_ranking(record, searcher.search_terms(parse_query(record["query"]), 4))
        assert set(record["results"][0]) == {"id", "score", "key", "caption", "path"}

    good = tmp_path / "good.txt"
    good.write_text(f"{queries[0]}\n{queries[1]}\n")
    table = tmp_path / "hits.csv"
    assert main(["search", str(built.index_dir), "--queries", str(good), "-k", "3", "--output", str(table)]) == 0
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert tuple(rows[0]) == batch.CSV_COLUMNS and len(rows) == 6
    want = searcher.search(text=queries[1], k=3)["results"]
    assert [(int(r["rank"]), r["key"]) for r in rows[3:]] == [(n, h["key"]) for n, h in enumerate(want, 1)] or \
        [float(r["score"]) for r in rows[3:]] == pytest.approx([h["score"] for h in want], abs=TOL)

    capsys.readouterr()
    assert main(["search", str(built.index_dir), "--queries", str(good), "-k", "2"]) == 0  # JSON lines on stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in printed] == [1, 2] and all(len(r["results"]) == 2 for r in printed)


def test_cli_refuses_bad_queries_files(built, tmp_path, capsys):
    index = str(built.index_dir)
    assert main(["search", index, "--queries", str(tmp_path / "none.txt")]) != 0
    assert "cannot read it" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a red circle\ncaf\xe9 au lait\n")
    assert main(["search", index, "--queries", str(latin)]) != 0
    assert "line 2 is not UTF-8" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["search", index, "--queries", str(blank)]) != 0
    assert "no queries in it" in capsys.readouterr().err
    assert main(["search", index, "a cat", "--queries", str(latin)]) != 0
    assert "give no query words" in capsys.readouterr().err


def test_flat_block_search_matches_an_exact_ranking(monkeypatch):
    """The block path of flat indices (from FLAT_BATCH_QUERIES queries up) against float64 products, with
    blocks small enough that the running top-k merges across row blocks and query blocks."""
    import faiss
    import numpy as np

    from clipforge.search import index as index_module

    monkeypatch.setattr(index_module, "FLAT_BLOCK_ROWS", 700)
    monkeypatch.setattr(index_module, "FLAT_BLOCK_QUERIES", 16)
    rng = np.random.default_rng(0)
    stored = rng.standard_normal((5000, 32)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    flat = faiss.index_factory(32, "Flat", faiss.METRIC_INNER_PRODUCT)
    flat.add(stored)
    view = index_module.flat_vectors(flat)
    assert view is not None and np.array_equal(view, stored)
    exact = queries.astype(np.float64) @ stored.astype(np.float64).T  # [40, 5000]
    want = np.argsort(-exact, axis=1, kind="stable")[:, :9]
    scores, ids = index_module.search_faiss(flat, [], queries, 9)
    assert np.array_equal(ids, want)
    assert np.allclose(scores, np.take_along_axis(exact, want, axis=1), atol=1e-5)
    few_scores, few_ids = index_module.search_faiss(flat, [], queries[:3], 9)  # under the threshold: faiss
    assert np.array_equal(few_ids, want[:3]) and np.allclose(few_scores, scores[:3], atol=1e-5)
    # k past the rows: every row once, then faiss's padding
    small = faiss.index_factory(32, "Flat", faiss.METRIC_INNER_PRODUCT)
    small.add(stored[:20])
    padded_scores, padded_ids = index_module.search_faiss(small, [], queries, 25)
    assert all(sorted(row[:20]) == list(range(20)) for row in padded_ids.tolist())
    assert (padded_ids[:, 20:] == -1).all() and np.isneginf(padded_scores[:, 20:]).all()
    assert index_module.flat_vectors(faiss.index_factory(32, "HNSW8", faiss.METRIC_INNER_PRODUCT)) is None
    assert index_module.flat_vectors(faiss.IndexFlatL2(32)) is None
