"""`clipforge index`: exact search equals brute force, approximate indices meet their stored recall on
re-measure, incremental add, the no-match threshold, duplicates, integrity errors, concurrency."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from search_helpers import clustered, embedding_folder, unit  # noqa: E402

from clipforge.cli import main  # noqa: E402
from clipforge.search import SearchError, open_index  # noqa: E402
from clipforge.search.build import BuildOptions, add_to_index, build_index, choose_kind  # noqa: E402
from clipforge.search.check import check_index, find_duplicates  # noqa: E402
from clipforge.search.measure import UNSEPARATED, exact_topk, no_match_threshold, recall_at_k, tune  # noqa: E402

DIM = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("index")
    img, text = clustered(np.random.default_rng(0), 6000, DIM)
    return embedding_folder(root / "emb", img, text, part_rows=1500), img, text


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T  # [n, rows]
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_flat_search_equals_brute_force(data, tmp_path):
    emb, img, _ = data
    info = build_index([emb], tmp_path / "flat", BuildOptions(kind="flat"))
    assert info["recall"]["image"] == 1.0 and info["recall"]["text"] == 1.0
    index = open_index(tmp_path / "flat")
    stored = img.astype(np.float16)  # the index holds what embed stored
    queries = unit(np.random.default_rng(1).standard_normal((50, DIM))).astype(np.float32)
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = brute_force(stored, queries, 10)
    assert np.array_equal(ids, ref_ids)
    assert np.allclose(scores, ref_scores, atol=1e-5)  # float32 dot products of unit vectors
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_fewer_results_than_k_are_padded_and_bad_queries_refused(tmp_path):
    img, text = clustered(np.random.default_rng(2), 5, DIM)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=3)
    build_index([emb], tmp_path / "i", BuildOptions(kind="flat"))
    index = open_index(tmp_path / "i")
    scores, ids = index.search(img[:2].astype(np.float32), 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all() and (ids[:, :5] >= 0).all()
    for bad, match in [(np.zeros((1, DIM + 1), np.float32), "shape"), (np.full((1, DIM), np.nan), "NaN")]:
        with pytest.raises(SearchError, match=match):
            index.search(bad, 3)
    with pytest.raises(SearchError, match="positive"):
        index.search(img[:1], 0)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_index_meets_its_stored_recall_on_a_fresh_sample(data, tmp_path, kind):
    emb, _, _ = data
    info = build_index([emb], tmp_path / kind, BuildOptions(kind=kind, target_recall=0.9, queries=300))
    assert info["kind"] == kind and set(info["recall"]) >= {"image", "text"}
    assert min(info["recall"]["image"], info["recall"]["text"]) >= 0.9  # tuned to the target
    if kind == "ivfpq":
        assert info["build"]["trained_on"] == "image" and "nprobe" in info["search"]
        assert info["bytes_per_vector"] < 4 * DIM  # compressed: codes + ids, not float32 vectors
    report = check_index(tmp_path / kind, seed=7)
    assert report["ok"], report
    for modality in ("image", "text"):
        r = report["recall"][modality]
        assert r["measured"] >= r["stored"] - r["tolerance"]


def test_recall_is_measured_against_exact_search(data, tmp_path):
    """The stored recall is what an independent numpy computation gives for the same held-out queries."""
    from clipforge.search.build import query_sets

    emb, img, text = data
    opts = BuildOptions(kind="ivfpq", target_recall=0.5, queries=200, nlist=64)
    info = build_index([emb], tmp_path / "i", opts)
    index = open_index(tmp_path / "i")
    sets = query_sets(index.sources, opts)
    stored = img.astype(np.float16).astype(np.float64)
    ids, _ = sets["text"]
    truth = brute_force(stored, text.astype(np.float16)[ids], 10)[1]
    found = index.search(text.astype(np.float16)[ids].astype(np.float32), 10)[1]
    by_hand = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert abs(by_hand - info["recall"]["text"]) < 1e-4


def test_tune_takes_the_first_value_reaching_the_target_else_where_recall_saturates():
    curve = {1: {"image": 0.50, "text": 0.40}, 2: {"image": 0.86, "text": 0.80},
             4: {"image": 0.90, "text": 0.849}, 8: {"image": 0.93, "text": 0.85}, 16: {"image": 0.95, "text": 0.851}}
    asked = []

    def recall_with(value: int) -> dict[str, float]:
        asked.append(value)
        return curve[value]

    assert tune(list(curve), recall_with, 0.8) == (2, curve[2], True) and asked == [1, 2]  # stops at the first
    # 0.9 is never reached on text: the worst modality's best is 0.851, and 4 is the first within 0.005 of it
    assert tune(list(curve), recall_with, 0.9) == (4, curve[4], False)


def test_ivfpq_rescores_deeper_when_no_nprobe_reaches_the_target(data, tmp_path):
    """2-byte PQ codes rank candidates too coarsely for 0.95 with the default rescoring of the top 40 even when
    every list is scanned (checked here by brute force); tuning doubles the depth until the target is met."""
    from clipforge.search.index import search_faiss

    emb, img, text = data
    info = build_index([emb], tmp_path / "i", BuildOptions(kind="ivfpq", pq_m=2, target_recall=0.95, queries=300))
    assert info["build"]["factory"].endswith("PQ2x8")
    assert info["recall"]["target_met"] and min(info["recall"]["image"], info["recall"]["text"]) >= 0.95
    assert 4 < info["search"]["rerank"] <= 64 and info["search"]["nprobe"] < info["build"]["nlist"]
    index = open_index(tmp_path / "i")
    queries = text.astype(np.float16)[:200].astype(np.float32)  # captions, whose images stay in the index
    truth = brute_force(img.astype(np.float16), queries, 10)[1]

    def recall(nprobe: int, rerank: int) -> float:
        index.faiss_index.nprobe = nprobe
        found = search_faiss(index.faiss_index, index.sources, queries, 10, rerank)[1]
        return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))

    assert recall(info["build"]["nlist"], 4) < 0.95  # the default depth cannot get there at any nprobe
    assert recall(info["search"]["nprobe"], info["search"]["rerank"]) >= 0.93  # the tuned pair, new queries
    report = check_index(tmp_path / "i", seed=7)
    assert report["ok"], report


def test_rerank_max_bounds_the_depth_tuning_may_choose(data, tmp_path, capsys):
    """The 2-byte codes above need deeper rescoring than 4 for 0.95: pinned at 4 (--rerank-max 4) the target is
    not met and said so; capped at 8, tuning stops there whatever it reaches."""
    emb, _, _ = data
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "pinned"), "--kind", "ivfpq", "--pq-m", "2",
                 "--rerank-max", "4", "--target-recall", "0.95", "--queries", "300"]) == 0
    info = json.loads((tmp_path / "pinned" / "index.json").read_text())
    assert info["search"]["rerank"] == 4 and info["recall"]["target_met"] is False
    assert "target 0.95 not reached" in capsys.readouterr().out
    capped = build_index([emb], tmp_path / "capped", BuildOptions(kind="ivfpq", pq_m=2, target_recall=0.95,
                                                                   queries=300, rerank_max=8))
    assert capped["search"]["rerank"] <= 8
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "bad"), "--rerank", "8",
                 "--rerank-max", "4"]) == 2
    assert "expected 0 <= --rerank <= --rerank-max" in capsys.readouterr().err


def test_an_unreachable_target_is_recorded_and_said_without_scanning_every_list(data, tmp_path, capsys):
    emb, _, _ = data
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "i"), "--kind", "ivfpq", "--pq-m", "2",
                 "--rerank", "0", "--target-recall", "0.95", "--queries", "300"]) == 0
    info = json.loads((tmp_path / "i" / "index.json").read_text())
    assert info["recall"]["target_met"] is False and "rerank" not in info["search"]  # 0 keeps rescoring off
    assert min(info["recall"]["image"], info["recall"]["text"]) < 0.95
    assert info["search"]["nprobe"] < info["build"]["nlist"]  # PQ limits recall long before every list is read
    assert "target 0.95 not reached" in capsys.readouterr().out


def test_modality_gap_training_on_images_alone_serves_text_queries_better(data, tmp_path):
    """The measurement behind the default `train_on="image"`: with the same lists probed and PQ scores as
    they are, text->image recall is higher when IVF/PQ were trained on the (image) database vectors than on a
    mix of image and caption vectors, whose caption half lands where no database vector lies."""
    from clipforge.search.build import ground_truth, measure_recall, query_sets
    from clipforge.search.index import apply_search_params, search_faiss

    emb, _, _ = data
    for train_on, expected in (("mixed", "image+text"), ("image", "image")):
        opts = BuildOptions(kind="ivfpq", target_recall=0.9, nlist=64, rerank=0, train_on=train_on)
        assert build_index([emb], tmp_path / train_on, opts)["build"]["trained_on"] == expected
    sources = open_index(tmp_path / "image").sources
    sets = query_sets(sources, BuildOptions(queries=500, seed=9))
    truth = ground_truth(sources, sets, 10)
    recall = {}
    for name in ("mixed", "image"):
        index = open_index(tmp_path / name)
        apply_search_params(index.faiss_index, {"nprobe": 8})
        recall[name] = measure_recall(lambda q, k, i=index: search_faiss(i.faiss_index, sources, q, k), sets, truth, 10)
    assert recall["image"]["text"] > recall["mixed"]["text"] + 0.02, recall


def test_add_appends_without_rebuilding(data, tmp_path):
    emb, img, _ = data
    extra_img, extra_text = clustered(np.random.default_rng(5), 500, DIM)
    extra = embedding_folder(tmp_path / "extra", extra_img, extra_text, part_rows=200)
    for kind in ("flat", "ivfpq"):
        build_index([emb], tmp_path / kind, BuildOptions(kind=kind, target_recall=0.8))
        before = json.loads((tmp_path / kind / "index.json").read_text())
        info = add_to_index(tmp_path / kind, [extra])
        assert info["rows"] == len(img) + len(extra_img) and info["build"] == before["build"]
        index = open_index(tmp_path / kind)
        assert index.metadata([len(img)])[0]["key"] == "k0"  # the new folder's first row follows the old rows
        assert np.array_equal(index.image_vector(len(img) + 3), extra_img[3].astype(np.float16).astype(np.float32))
        if kind == "flat":
            both = np.concatenate([img, extra_img]).astype(np.float16)
            queries = extra_img[:20].astype(np.float32)
            assert np.array_equal(index.search(queries, 5)[1], brute_force(both, queries, 5)[1])
        with pytest.raises(SearchError, match="already in the index"):
            add_to_index(tmp_path / kind, [extra])
    other = embedding_folder(tmp_path / "other", extra_img, None, 200, fingerprint={"model": "another"})
    with pytest.raises(SearchError, match="fingerprint mismatch"):
        add_to_index(tmp_path / "flat", [other])


def test_no_match_threshold_on_hand_made_scores():
    positive = np.array([0.9, 0.8, 0.7, 0.35])
    negative = np.array([0.3, 0.4, 0.2, 0.1])
    t = no_match_threshold(positive, negative)
    # at 0.35: 4 positives and one negative (0.4) pass: P = 4/5, R = 1, F1 = 8/9; at 0.7: P = 1, R = 3/4,
    # F1 = 6/7; at 0.4: P = R = 3/4; every other cut is worse
    assert t["score"] == 0.35 and t["precision"] == 0.8 and t["recall"] == 1.0
    assert abs(t["margin_mean"] - np.mean(positive - negative)) < 1e-12


def test_no_threshold_when_the_best_cut_accepts_every_unmatched_query():
    positive = np.array([0.9, 0.8])
    negative = np.array([0.95, 0.85])
    t = no_match_threshold(positive, negative)
    # cuts: 0.95 -> P = 0; 0.9 -> P = R = 1/2, F1 1/2; 0.85 -> P = 1/3, R = 1/2, F1 2/5; 0.8 accepts all four:
    # P = 1/2, R = 1, F1 = 2/3, the best, and it rejects no unmatched query: no threshold
    assert t["score"] is None and t["reason"] == UNSEPARATED
    assert t["precision"] == 0.5 and t["recall"] == 1.0 and t["pairs"] == 2
    # one unmatched query below the best cut is enough for a threshold
    assert no_match_threshold(np.array([0.9, 0.8]), np.array([0.95, 0.1]))["score"] == 0.8


def test_index_summary_names_a_missing_threshold_and_why():
    from clipforge.search.cli_embed import _summary

    info = {"kind": "flat", "build": {"factory": "Flat"}, "rows": 10, "dim": 4, "bytes_per_vector": 16,
            "search": {}, "recall": {"metric": "10-recall@10", "text": 1.0},
            "threshold": {"score": None, "reason": UNSEPARATED}}
    assert _summary(info).endswith(f"; no no-match threshold: {UNSEPARATED}")
    info["threshold"] = {"score": 0.25, "precision": 0.8, "recall": 1.0}
    assert _summary(info).endswith("; no-match threshold 0.250 (precision 0.800, recall 1.000)")


def test_threshold_separates_matched_from_unmatched_queries(data, tmp_path):
    emb, img, _ = data
    info = build_index([emb], tmp_path / "i", BuildOptions(kind="flat"))
    t = info["threshold"]
    assert t["pairs"] == 500 and 0 < t["score"] < 1
    # recompute its precision and recall by hand over the same held-out captions
    index = open_index(tmp_path / "i")
    from clipforge.search.build import query_sets

    ids, queries = query_sets(index.sources, BuildOptions())["text"]
    stored = img.astype(np.float16).astype(np.float64)
    sims = queries.astype(np.float64) @ stored.T
    positive = sims[np.arange(len(ids)), ids]
    sims[np.arange(len(ids)), ids] = -np.inf
    negative = sims.max(axis=1)
    accepted_pos, accepted_neg = (positive >= t["score"]).sum(), (negative >= t["score"]).sum()
    assert abs(t["recall"] - accepted_pos / len(ids)) < 1e-9
    assert abs(t["precision"] - accepted_pos / (accepted_pos + accepted_neg)) < 1e-9
    report = check_index(tmp_path / "i", seed=3)
    assert abs(report["threshold"]["measured"]["recall"] - t["recall"]) < 0.1


def test_duplicates_finds_the_planted_groups(tmp_path):
    rng = np.random.default_rng(3)
    img = unit(rng.standard_normal((400, DIM)))
    img[10] = unit((img[3] + 0.01 * rng.standard_normal(DIM))[None])[0]
    img[250] = unit((img[3] + 0.01 * rng.standard_normal(DIM))[None])[0]
    img[77] = unit((img[200] + 0.01 * rng.standard_normal(DIM))[None])[0]
    img[250] *= 0.9  # a stored vector that is not unit: judged by its cosine (0.99), not its dot product (0.89)
    emb = embedding_folder(tmp_path / "emb", img, None, part_rows=128)
    build_index([emb], tmp_path / "i", BuildOptions(kind="flat"))
    result = find_duplicates(tmp_path / "i", threshold=0.98)
    assert [[m["id"] for m in g] for g in result["groups"]] == [[3, 10, 250], [77, 200]]
    assert result["pairs"] == 4  # 3-10, 3-250, 10-250, 77-200, each found from both ends, counted once
    assert find_duplicates(tmp_path / "i", threshold=0.98, batch=50) == result  # batches across part boundaries
    assert main(["index", "duplicates", str(tmp_path / "i"), "--threshold", "0.98",
                 "--output", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["groups"] == result["groups"]


def test_concurrent_searches_match_serial_ones(data, tmp_path):
    emb, img, _ = data
    build_index([emb], tmp_path / "i", BuildOptions(kind="ivfpq", target_recall=0.8))
    index = open_index(tmp_path / "i")
    queries = img[:64].astype(np.float32)
    expected = [index.search(queries[i:i + 1], 10) for i in range(64)]
    results: dict[int, tuple] = {}

    def worker(start: int) -> None:
        for i in range(start, 64, 8):
            results[i] = index.search(queries[i:i + 1], 10)
            index.metadata(results[i][1][0][:3])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(64):
        assert np.array_equal(results[i][1], expected[i][1]) and np.array_equal(results[i][0], expected[i][0])


def test_corrupt_truncated_and_missing_files_give_one_line(data, tmp_path, capsys):
    emb, _, _ = data
    info = build_index([emb], tmp_path / "i", BuildOptions(kind="flat"))
    path = tmp_path / "i" / info["index_file"]["name"]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(SearchError, match="truncated"):
        open_index(tmp_path / "i")
    path.write_bytes(b"\0" * len(good))
    with pytest.raises(SearchError, match="corrupt index file"):
        open_index(tmp_path / "i")
    assert main(["index", "check", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error:") and "\n" not in err
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped: check's sha256 sees it
    with pytest.raises(SearchError, match="sha256"):
        check_index(tmp_path / "i")
    (tmp_path / "i" / "index.json").write_text("{not json")
    with pytest.raises(SearchError, match="corrupt JSON"):
        open_index(tmp_path / "i")
    with pytest.raises(SearchError, match="no such index"):
        open_index(tmp_path / "nothing")


def test_corrupt_embedding_part_refused_with_one_line(tmp_path, capsys):
    img, text = clustered(np.random.default_rng(4), 300, DIM)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=100)
    part = emb / "img_emb" / "img_emb_1.npy"
    part.write_bytes(part.read_bytes()[:200])
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip()
    assert "img_emb_1.npy" in err and "truncated" in err and "\n" not in err


def test_empty_collection_is_a_clear_error(tmp_path):
    emb = embedding_folder(tmp_path / "emb", np.zeros((0, DIM), np.float32), None, part_rows=10)
    with pytest.raises(SearchError, match="empty collection"):
        build_index([emb], tmp_path / "i")


def test_auto_picks_flat_then_ivfpq_within_memory():
    assert choose_kind(100_000, 512, None) == "flat"
    assert choose_kind(1_000_000, 512, None) == "ivfpq"
    assert choose_kind(100_000, 512, 100 << 20) == "ivfpq"  # 205 MB of float32 does not fit 100 MB


def test_exact_topk_and_recall_helpers_on_toy_input():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], np.float32)
    scores, ids = exact_topk([(0, vectors[:2]), (2, vectors[2:])], np.array([[1.0, 0.0]], np.float32), 3)
    assert ids.tolist() == [[0, 3, 2]] and np.allclose(scores, [[1.0, 0.8, 0.6]])
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)


def test_exact_topk_matches_a_full_sort_with_ties_across_chunks():
    """Many exact ties (vectors drawn from 3 values per coordinate, repeated rows), chunks smaller and larger
    than k: the result is the full sort of every score, by score descending and then id ascending."""
    rng = np.random.default_rng(3)
    vectors = rng.choice([-1.0, 0.0, 1.0], size=(700, 4)).astype(np.float32)
    vectors[350:] = vectors[:350]  # every row also appears 350 ids later
    queries = rng.choice([-1.0, 0.0, 1.0], size=(40, 4)).astype(np.float32)
    bounds = [0, 5, 12, 300, 301, 700]  # chunks of 5, 7, 288, 1 and 399 rows
    chunks = [(a, vectors[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    scores, ids = exact_topk(chunks, queries, 10)
    full = queries @ vectors.T  # [40, 700]; small integers, exact in float32
    columns = np.arange(700)
    for row in range(40):
        want = np.lexsort((columns, -full[row]))[:10]
        assert ids[row].tolist() == want.tolist()
        assert scores[row].tolist() == full[row, want].tolist()
    short_scores, short_ids = exact_topk([(0, vectors[:3])], queries[:1], 5)  # fewer rows than k: padded
    assert short_ids[0, 3:].tolist() == [-1, -1] and np.isneginf(short_scores[0, 3:]).all()


def test_missing_faiss_names_the_extra(monkeypatch):
    import builtins

    from clipforge.search.errors import require

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.delitem(__import__("sys").modules, "faiss", raising=False)
    with pytest.raises(SearchError, match=r'pip install -e "\.\[search\]"'):
        require("faiss")


def test_memory_mapped_ivf_index_gives_the_same_answers(data, tmp_path):
    emb, img, _ = data
    build_index([emb], tmp_path / "i", BuildOptions(kind="ivfpq", target_recall=0.8))
    queries = img[:20].astype(np.float32)
    in_ram = open_index(tmp_path / "i").search(queries, 10)
    mapped = open_index(tmp_path / "i", mmap=True).search(queries, 10)
    assert np.array_equal(in_ram[1], mapped[1]) and np.array_equal(in_ram[0], mapped[0])
