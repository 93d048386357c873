"""The caption index (`captions-*.faiss`): an index over a captioned collection indexes the caption vectors too
(the same kind: flat, IVF-PQ or HNSW), so `modality="text"` search no longer scans every stored caption. Answers
are checked against float64 numpy rankings of the stored caption vectors, through build, add (with removals),
compaction, folder scopes and check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from search_helpers import clustered, embedding_folder

from clipforge.cli import main
from clipforge.search import index as index_module
from clipforge.search.build import BuildOptions, add_to_index, build_index
from clipforge.search.check import check_index
from clipforge.search.compact import compact_index
from clipforge.search.errors import SearchError
from clipforge.search.index import open_index

ROWS, DIM, K = 4000, 32, 10
EXTRA = 600  # rows of the same collection embedded later (index add)


def stored(emb_dirs, role: str) -> np.ndarray:
    """The vectors [n, d] embed wrote (float16 files) for `role` ("img" / "text"), in id order, as float64."""
    out = []
    for emb in emb_dirs:
        files = sorted((emb / f"{role}_emb").glob(f"{role}_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
        out.extend(np.load(f) for f in files)
    return np.concatenate(out).astype(np.float64)


def exact(vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Ids [n, k] of the exact top-k rows by float64 inner product, rows outside `allowed` left out."""
    scores = queries.astype(np.float64) @ vectors.T  # [n, rows]
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-index")
    img, text = clustered(np.random.default_rng(0), ROWS + EXTRA, DIM)
    emb = embedding_folder(root / "emb", img[:ROWS].astype(np.float32), text[:ROWS].astype(np.float32),
                           part_rows=1500)
    later = embedding_folder(root / "later", img[ROWS:].astype(np.float32), text[ROWS:].astype(np.float32),
                             part_rows=EXTRA, key_prefix="new")
    return root, emb, later


@pytest.fixture(scope="module", params=["ivfpq", "hnsw", "flat"])
def built(request, collection):
    root, emb, _ = collection
    index_dir = root / request.param
    info = build_index([emb], index_dir, BuildOptions(kind=request.param, queries=200))
    return index_dir, info, emb


def test_built_beside_the_image_index_and_searched(built):
    index_dir, info, emb = built
    captions = info["captions"]
    assert captions["kind"] == info["kind"] and captions["build"]["trained_on"] in ("text", None)
    assert (index_dir / captions["index_file"]["name"]).is_file()
    assert captions["recall"]["target_met"] and min(captions["recall"]["text"], captions["recall"]["image"]) >= 0.95
    index = open_index(index_dir)
    assert index.caption_index is not None and index.caption_index.ntotal == ROWS
    text, img = stored([emb], "text"), stored([emb], "img")
    queries = np.concatenate([text[:60], img[100:160]]).astype(np.float32)  # captions in the index, and images
    scores, ids = index.search_captions(queries, K)
    assert recall(ids, exact(text, queries, K)) >= 0.93
    # every answer scored with its stored caption vector: exact cosines (IVF-PQ rescored; HNSW stores floats)
    np.testing.assert_allclose(scores, np.einsum("nkd,nd->nk", text[ids], queries), atol=1e-5)
    # the exact scan (an index without a caption index) as reference for the same calls
    scan = open_index(index_dir)
    scan.caption_index = None
    assert recall(ids, scan.search_captions(queries, K)[1]) >= 0.93


def test_flat_is_exact_and_opting_out_or_a_tight_memory_budget_keeps_the_scan(collection):
    root, emb, _ = collection
    text = stored([emb], "text")
    queries = text[:20].astype(np.float32)
    flat = build_index([emb], root / "flat", BuildOptions(kind="flat", queries=100))
    assert flat["captions"]["kind"] == "flat" and flat["captions"]["recall"]["text"] == 1.0
    index = open_index(root / "flat")
    assert index.caption_index.ntotal == ROWS
    assert (index.search_captions(queries, K)[1] == exact(text, queries, K)).mean() >= 0.99
    plain = build_index([emb], root / "no-captions", BuildOptions(kind="hnsw", queries=100, caption_index=False))
    tight = build_index([emb], root / "tight", BuildOptions(kind="flat", queries=100, memory=ROWS * DIM * 4 + 1))
    for info, index_dir in ((plain, root / "no-captions"), (tight, root / "tight")):
        assert "captions" not in info and not list(index_dir.glob("captions-*.faiss"))
        index = open_index(index_dir)
        assert index.caption_index is None and index.has_captions
        assert (index.search_captions(queries, K)[1] == exact(text, queries, K)).mean() >= 0.99


def test_add_with_removals_and_compaction(collection, tmp_path):
    _, emb, emb2 = collection
    index_dir = tmp_path / "index"
    build_index([emb], index_dir, BuildOptions(kind="ivfpq", queries=200))
    gone = np.arange(0, ROWS, 7)
    info = add_to_index(index_dir, [emb2], remove=gone)
    assert len(list(index_dir.glob("captions-*.faiss"))) == 1 == len(list(index_dir.glob("index-*.faiss")))
    assert info["captions"]["recall"]["rows"] == ROWS + EXTRA - len(gone)
    index = open_index(index_dir)
    text = stored([emb, emb2], "text")
    live = np.ones(len(text), dtype=bool)
    live[gone] = False
    queries = np.concatenate([text[ROWS:ROWS + 40], text[:40]]).astype(np.float32)  # new captions, old ones
    _, ids = index.search_captions(queries, K)
    assert not np.isin(ids, gone).any()
    assert recall(ids, exact(text, queries, K, live)) >= 0.93
    keys = [[m["key"] for m in index.metadata(row)] for row in ids]

    compact_index(index_dir)
    compacted = open_index(index_dir)
    assert compacted.caption_index.ntotal == len(compacted) == live.sum()
    _, after = compacted.search_captions(queries, K)
    # the same answers by key: IVF-PQ keeps every code through compaction, ids are renumbered
    assert [[m["key"] for m in compacted.metadata(row)] for row in after] == keys
    assert check_index(index_dir)["ok"]


def test_a_folder_without_captions_ends_caption_search(collection, tmp_path, capsys):
    _, emb, _ = collection
    index_dir = tmp_path / "index"
    build_index([emb], index_dir, BuildOptions(kind="hnsw", queries=100))
    img2, _ = clustered(np.random.default_rng(2), 300, DIM)
    bare = embedding_folder(tmp_path / "bare", img2.astype(np.float32), None, part_rows=300, key_prefix="bare")
    capsys.readouterr()
    assert main(["index", "add", str(index_dir), str(bare)]) == 0
    assert "caption search (--modality text) ended" in capsys.readouterr().out
    info = json.loads((index_dir / "index.json").read_text())
    assert "captions" not in info and not list(index_dir.glob("captions-*.faiss"))
    index = open_index(index_dir)
    assert not index.has_captions
    with pytest.raises(SearchError, match="no caption vectors"):
        index.search_captions(np.zeros((1, DIM), dtype=np.float32), 3)


def test_large_folder_scope_through_the_caption_index(built, monkeypatch):
    index_dir, _, emb = built
    monkeypatch.setattr(index_module, "SCAN_ROWS", 100)  # folders above 100 rows go through faiss's selector
    index = open_index(index_dir)
    keys = [f"k{i}" for i in range(ROWS)]
    folder = [k for k in keys if int(k[1:]) % 3 == 0]
    assert len(folder) > 100
    # the embedding folder keys rows k0..k3999 without folders: scope by the rows' absolute paths
    scope = index.scope([f"/nowhere/{k}.png" for k in folder])
    allowed = np.zeros(ROWS, dtype=bool)
    allowed[::3] = True
    assert (scope.allowed == allowed).all()
    text, img = stored([emb], "text"), stored([emb], "img")
    queries = text[1:121:2].astype(np.float32)
    _, image_ids = index.search(queries, K, scope)  # the image index's lists first, then the captions'
    _, caption_ids = index.search_captions(queries, K, scope)
    assert np.isin(caption_ids, np.flatnonzero(allowed)).all() and np.isin(image_ids, np.flatnonzero(allowed)).all()
    assert recall(caption_ids, exact(text, queries, K, allowed)) >= 0.9
    assert recall(image_ids, exact(img, queries, K, allowed)) >= 0.9


def test_check_names_a_corrupt_caption_file_and_an_old_index_still_scans(built, tmp_path):
    index_dir, info, emb = built
    report = check_index(index_dir)
    assert report["ok"] and set(report["captions"]["recall"]) == {"image", "text"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in index_dir.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    stored_info = json.loads((copy / "index.json").read_text())
    stored_info["sources"][0]["path"] = str(emb)
    if info["kind"] == "ivfpq":  # a caption search narrower than tuned: check must say so
        narrow = {**stored_info, "captions": {**stored_info["captions"], "search": {"nprobe": 1}}}
        (copy / "index.json").write_text(json.dumps(narrow))
        report = check_index(copy)
        assert not report["ok"] and report["recall"]["text"]["ok"], report
        assert not report["captions"]["recall"]["text"]["ok"] and report["captions"]["recall"]["text"]["measured"] < 0.9
    (copy / "index.json").write_text(json.dumps(stored_info))
    name = stored_info["captions"]["index_file"]["name"]
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(SearchError, match=f"{name}: sha256 does not match"):
        check_index(copy)
    (copy / name).write_bytes(bytes(data[:-10]))
    with pytest.raises(SearchError, match=f"{name}: .* bytes, index.json says"):
        open_index(copy)
    del stored_info["captions"]  # an index built before caption indices: the exact scan, as then
    (copy / "index.json").write_text(json.dumps(stored_info))
    old = open_index(copy)
    text = stored([emb], "text")
    queries = text[:10].astype(np.float32)
    assert old.caption_index is None and (old.search_captions(queries, K)[1] == exact(text, queries, K)).mean() >= 0.99


def test_cli_reports_and_opts_out(collection, tmp_path, capsys):
    _, emb, _ = collection
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "a"), "--kind", "hnsw", "--queries", "100"]) == 0
    assert "caption index (HNSW32), search {'efSearch'" in capsys.readouterr().out
    assert main(["index", "build", str(emb), "--index", str(tmp_path / "b"), "--kind", "hnsw", "--queries", "100",
                 "--no-caption-index"]) == 0
    assert "caption index" not in capsys.readouterr().out


def test_api_info_reports_the_caption_recall(built):
    from clipforge.search.server import index_summary

    index_dir, info, _ = built

    class Served:  # what index_summary reads of a Searcher (a real one needs the index's model)
        index = open_index(index_dir)
        backend = "torch"

        def __init__(self) -> None:
            self.info = self.index.info

        def __len__(self) -> int:
            return len(self.index)

    summary = index_summary(Served())
    assert summary["caption_recall"] == info["captions"]["recall"] and summary["recall"] == info["recall"]
