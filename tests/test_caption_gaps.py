"""A collection where some images have no caption: they are embedded and searched by image like the others, get a
zero caption vector, and caption search (`modality="text"`) never answers with them, on every index kind and
through a scope; answers are checked against a float64 ranking of the captioned rows only."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from search_helpers import assert_ranking, clustered, embedding_folder, exact_top_k
from search_index import build_small_index

from clipforge.search import open_index
from clipforge.search.build import BuildOptions, build_index, query_sets

CAPTIONLESS = {3, 17, 26, 27}  # 26 and 27: the last row of part 0 and the first of part 1 (27 rows a part)


@pytest.fixture(scope="module")
def gaps(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("gaps"), count=40, captionless=CAPTIONLESS)


def _stored_captions(emb) -> np.ndarray:
    files = sorted((emb / "text_emb").glob("text_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    return np.concatenate([np.load(f) for f in files]).astype(np.float64)  # [n, d]


def test_embed_keeps_images_without_captions_and_records_them(gaps):
    emb = gaps.index_dir.parent / "emb"
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["has_text"] and manifest["rows"] == 40 and manifest["skipped"] == {}
    assert sum(p.get("uncaptioned", 0) for p in manifest["parts"]) == len(CAPTIONLESS)
    captions = _stored_captions(emb)
    zero = np.flatnonzero(~captions.any(axis=1))
    assert set(zero.tolist()) == CAPTIONLESS
    others = np.delete(captions, zero, axis=0)
    assert np.allclose(np.linalg.norm(others, axis=1), 1.0, atol=2e-3)  # float16 unit rows
    index = open_index(gaps.index_dir)
    assert index.has_captions
    assert [index.metadata([i])[0]["caption"] for i in range(40)] == gaps.captions


def test_caption_search_skips_them_and_image_search_does_not(gaps):
    from clipforge import Searcher

    searcher = Searcher(gaps.index_dir)
    captions = _stored_captions(gaps.index_dir.parent / "emb")
    kept = np.array(sorted(set(range(40)) - CAPTIONLESS))
    query = searcher.encode_texts(["a red circle"])[0]
    answer = searcher.search(text="a red circle", k=40, modality="text")
    want = [(int(kept[i]), s) for i, s in exact_top_k(captions[kept], query, 40)]
    assert len(answer["results"]) == len(kept)  # fewer than k: the others have no caption to match
    assert_ranking(answer["results"], want)
    by_image = searcher.search(text="a red circle", k=40)["results"]
    assert CAPTIONLESS <= {h["id"] for h in by_image}
    own = searcher.search_by_id(3, k=5, modality="text")["results"]  # an uncaptioned image as the query
    assert own and not CAPTIONLESS & {h["id"] for h in own}
    # a folder scope: the images under it that have a caption
    scoped = searcher.search(text="a red circle", k=40, modality="text", under="img_00003")
    assert scoped["results"] == []


@pytest.mark.parametrize("kind, caption_index", [("flat", True), ("flat", False), ("hnsw", True), ("ivfpq", True)])
def test_every_index_kind_skips_zero_caption_rows(tmp_path, kind, caption_index):
    rng = np.random.default_rng(0)
    n, dim = 12_000, 16
    img, text = clustered(rng, n, dim)
    missing = np.sort(rng.choice(n, n * 3 // 10, replace=False))  # 30% without a caption
    text[missing] = 0.0
    keys = [f"g{i % 2}/k{i}" for i in range(n)]
    emb = embedding_folder(tmp_path / "emb", img.astype(np.float32), text.astype(np.float32), part_rows=5_000,
                           keys=keys)
    opts = BuildOptions(kind=kind, queries=200, caption_index=caption_index, **({"nlist": 64} if kind == "ivfpq"
                                                                                  else {}))
    info = build_index([emb], tmp_path / "index", opts)
    if caption_index:
        assert info["captions"]["recall"]["target_met"]
    index = open_index(tmp_path / "index")
    sets = query_sets(index.sources, opts)
    assert not np.isin(sets["text"][0], missing).any()  # the held-out caption queries all have a caption
    queries = np.concatenate([img[:50], text[np.setdiff1d(np.arange(200), missing)[:50]]]).astype(np.float32)
    kept = np.setdiff1d(np.arange(n), missing)
    everything = np.concatenate([np.load(emb / "text_emb" / f"text_emb_{p}.npy") for p in range(3)])  # [n, dim]
    for scope_name, rows, scope in [("all", kept, None), ("g1", kept[kept % 2 == 1], index.scope("g1"))]:
        _, ids = index.search_captions(queries, 10, scope)
        assert not np.isin(ids, missing).any() and (ids >= 0).all(), scope_name
        exact = everything.astype(np.float64)[rows] @ queries.astype(np.float64).T  # [rows, q]
        truth = rows[np.argsort(-exact, axis=0, kind="stable")[:10]].T  # [q, 10]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= (0.999 if kind == "flat" else 0.8), (scope_name, recall)


def test_compaction_keeps_them_out_of_caption_search(tmp_path):
    from clipforge.search.compact import compact_index
    from clipforge.search.sync import sync_index

    built = build_small_index(tmp_path, count=30, captionless={4, 20})
    built.paths[10].unlink()  # a removed row, so that compaction rewrites the parts
    sync_index(built.index_dir, tmp_path / "images", progress=False, workers=0)
    before = open_index(built.index_dir)
    query = before.image_vector(4)[None, :]

    def keys(index) -> list[str]:
        _, ids = index.search_captions(query, 30)
        return [index.metadata([i])[0]["key"] for i in ids[0].tolist() if i >= 0]

    want = keys(before)
    assert len(want) == 27 and not {"img_00004", "img_00020", "img_00010"} & set(want)
    assert compact_index(built.index_dir, 7) is not None  # parts of 7 rows: the zero caption rows copied, recounted
    after = open_index(built.index_dir)
    assert keys(after) == want
    assert sum(p.uncaptioned for s in after.sources for p in s.parts) == 2


def test_index_add_of_a_folder_without_any_caption_ends_caption_search_and_says_so(tmp_path, capsys):
    from search_helpers import make_image

    from clipforge.cli import main

    built = build_small_index(tmp_path, count=30)
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(3):
        make_image(i, size=40).save(bare / f"b{i}.png")  # no sidecars at all
    assert main(["embed", str(bare), "--model", str(built.model_path), "--output", str(tmp_path / "emb2"),
                 "--workers", "0", "--no-progress"]) == 0
    assert not json.loads((tmp_path / "emb2" / "manifest.json").read_text())["has_text"]
    capsys.readouterr()
    assert main(["index", "add", str(built.index_dir), str(tmp_path / "emb2")]) == 0
    assert "caption search (--modality text) ended: an added folder was embedded without any caption" in \
        capsys.readouterr().out
    assert not open_index(built.index_dir).has_captions
