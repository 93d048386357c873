"""`clipforge filter`: the exact set of images over a score (against float64 numpy), the manifest and copied
folder it writes (read back by `data shards` and `embed`), tar-shard images, defaults and refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search.errors import SearchError
from clipforge.search.query import QueryTerm

ARCH = "ViT-Tiny-8-64"  # spread embeddings (see test_dedup.py)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("filter"), count=40, arch=ARCH, copies={3: 1})


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


def reference_scores(built, searcher, text: str) -> np.ndarray:
    query = searcher.query_vector([QueryTerm("text", text)]).astype(np.float64)
    return built.vectors.astype(np.float64) @ query  # [n]


def gap_threshold(scores: np.ndarray, keep: int) -> float:
    """A cut between the keep-th and (keep+1)-th best scores, asserted at least 1e-5 from both."""
    ranked = np.sort(scores)[::-1]
    assert ranked[keep - 1] - ranked[keep] > 2e-5, "no clear gap at this rank: pick another"
    return float(ranked[keep - 1] + ranked[keep]) / 2


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_matches_are_every_image_over_the_score_best_first(built, searcher):
    scores = reference_scores(built, searcher, "a red circle")
    keep = next(k for k in range(15, 30) if np.sort(scores)[::-1][k - 1] - np.sort(scores)[::-1][k] > 2e-5)
    cut = gap_threshold(scores, keep)
    hits = searcher.filter(text="a red circle", min_score=cut)
    expected = sorted(np.flatnonzero(scores >= cut).tolist(), key=lambda i: (-scores[i], i))
    assert len(expected) == keep and [h["id"] for h in hits] == expected
    assert np.allclose([h["score"] for h in hits], scores[expected], atol=1e-5)
    assert [h["id"] for h in searcher.filter(text="a red circle", min_score=cut, limit=5)] == expected[:5]
    assert searcher.filter(text="a red circle", min_score=1.0) == []


def test_manifest_then_shards(built, searcher, tmp_path, capsys):
    scores = reference_scores(built, searcher, "a blue square")
    cut = float(np.sort(scores)[::-1][9] - 1e-4)  # at least 10 images
    manifest, summary = tmp_path / "sel.csv", tmp_path / "sel.json"
    assert main(["filter", str(built.index_dir), "a blue square", "--min-score", str(cut), "--manifest",
                 str(manifest), "--output", str(summary)]) == 0
    rows = read_rows(manifest)
    direct = searcher.filter(text="a blue square", min_score=cut)
    assert list(rows[0]) == ["image", "caption", "score", "id", "key"]
    assert [int(r["id"]) for r in rows] == [h["id"] for h in direct] and len(rows) >= 10
    for row in rows:
        assert row["image"] == str(built.paths[int(row["id"])].resolve()) and row["caption"] == built.captions[int(row["id"])]
    report = json.loads(summary.read_text())
    assert report["matches"] == len(rows) and report["of"] == len(built.paths) and report["min_score"] == cut
    assert f"{len(rows)} of {len(built.paths)} images score >=" in capsys.readouterr().out
    shards = tmp_path / "shards"
    assert main(["data", "shards", "--from", str(manifest), "--out", str(shards)]) == 0  # a manifest clipforge reads
    import tarfile

    members = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            members += tar.getnames()
    assert sum(m.endswith(".txt") for m in members) == len(rows)


def test_copy_to_folder_then_embed_it(built, searcher, tmp_path):
    scores = reference_scores(built, searcher, "a green star")
    order = np.argsort(-scores, kind="stable")
    cut = float(scores[order[7]] - 1e-4)
    out = tmp_path / "picked"
    assert main(["filter", str(built.index_dir), "a green star", "--min-score", str(cut), "--copy-to", str(out)]) == 0
    rows = read_rows(out / "manifest.csv")
    hits = searcher.filter(text="a green star", min_score=cut)
    assert [int(r["id"]) for r in rows] == [h["id"] for h in hits]
    for rank, row in enumerate(rows, 1):
        original = built.paths[int(row["id"])]
        assert row["image"].startswith(f"{rank:06d}_") and row["image"].endswith(".png")
        assert (out / row["image"]).read_bytes() == original.read_bytes()
        assert (out / row["image"]).with_suffix(".txt").read_text() == built.captions[int(row["id"])]
    emb = tmp_path / "picked-emb"
    assert main(["embed", str(out), "--model", str(built.model_path), "--output", str(emb), "--workers", "0",
                 "--no-progress"]) == 0
    again = json.loads((emb / "manifest.json").read_text())
    assert sum(part["rows"] for part in again["parts"]) == len(rows)
    # a second run never writes into what the first made
    before = sorted(p.name for p in out.iterdir())
    assert main(["filter", str(built.index_dir), "a green star", "--min-score", str(cut), "--copy-to", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_images_inside_tar_shards(built, tmp_path, capsys):
    from clipforge.data.writer import write_shards

    shards = tmp_path / "shards"
    write_shards([(p, c) for p, c in zip(built.paths, built.captions)], shards, samples_per_shard=16,
                 image_format="keep")
    emb, index = tmp_path / "emb", tmp_path / "index"
    assert main(["embed", str(shards), "--model", str(built.model_path), "--output", str(emb), "--workers", "0",
                 "--no-progress"]) == 0
    assert main(["index", "build", str(emb), "--index", str(index), "--kind", "flat", "--queries", "10"]) == 0
    capsys.readouterr()
    assert main(["filter", str(index), "a red circle", "--min-score", "-1", "--manifest",
                 str(tmp_path / "m.csv")]) == 2
    assert "has no file of its own (in tar shard" in capsys.readouterr().err and not (tmp_path / "m.csv").exists()
    out = tmp_path / "extracted"
    assert main(["filter", str(index), "a red circle", "--min-score", "-1", "--limit", "6", "--copy-to",
                 str(out)]) == 0
    originals: dict[bytes, set[str]] = {}
    for path, caption in zip(built.paths, built.captions):
        originals.setdefault(path.read_bytes(), set()).add(caption)
    rows = read_rows(out / "manifest.csv")
    assert len(rows) == 6
    for row in rows:  # every member's bytes are an original PNG's, with that image's caption
        assert row["caption"] in originals[(out / row["image"]).read_bytes()]


def test_default_cut_is_the_calibrated_threshold(built, searcher, tmp_path):
    from clipforge import Searcher

    scores = reference_scores(built, searcher, "a red circle")
    calibrated = gap_threshold(scores, next(k for k in range(5, 20)
                                            if np.sort(scores)[::-1][k - 1] - np.sort(scores)[::-1][k] > 2e-5))
    folder = built.index_dir.parent / "index-calibrated"
    shutil.copytree(built.index_dir, folder, dirs_exist_ok=True)
    info = json.loads((folder / "index.json").read_text())
    info["threshold"] = {"score": calibrated, "precision": 0.9, "recall": 0.8}
    (folder / "index.json").write_text(json.dumps(info))
    judged = Searcher(folder)
    assert [h["id"] for h in judged.filter(text="a red circle")] == \
        [h["id"] for h in searcher.filter(text="a red circle", min_score=calibrated)]
    out = tmp_path / "default.csv"
    assert main(["filter", str(folder), "a red circle", "--manifest", str(out)]) == 0
    assert len(read_rows(out)) == int((scores >= calibrated).sum())
    with pytest.raises(SearchError, match="required for a query with an image"):
        judged.filter(image=built.paths[0])
    with pytest.raises(SearchError, match="required for a query with an image or a negative term"):
        judged.filter(text=[("a red circle", 1.0), ("a blue square", -1.0)])


@pytest.mark.parametrize("args, fragment", [
    (["a red circle"], "say where the matches go"),
    (["a red circle", "--manifest", "x.csv", "--limit", "0"], "--limit: expected a positive integer"),
    (["a red circle", "--manifest", "x.csv", "--min-score", "1.5"], "--min-score: expected a cosine"),
    (["a red circle", "--manifest", "x.csv"], "--min-score: required: this index has no no-good-match threshold"),
    (["--manifest", "x.csv", "--min-score", "0"], "give a query text, an image"),
    (["a red circle", "--manifest", "x.csv", "--min-score", "0", "--bogus"], "unrecognised option --bogus"),
])
def test_refusals(built, tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["filter", str(built.index_dir), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_duplicates_keep_manifest_drops_all_but_one_of_each_group(built, tmp_path, capsys):
    raw = built.vectors.astype(np.float64) @ built.vectors.astype(np.float64).T  # `index duplicates` compares dots
    pairs = np.triu(np.ones_like(raw, dtype=bool), 1)
    pairs[3, 4] = False  # the one planted copy (image 3 and its copy, id 4)
    assert raw[pairs].max() < raw[3, 4] - 2e-5, "two different images embed as close as the copies"
    threshold = float(raw[pairs].max() + raw[3, 4]) / 2
    kept = tmp_path / "kept.csv"
    assert main(["index", "duplicates", str(built.index_dir), "--threshold", str(threshold), "--keep-manifest",
                 str(kept)]) == 0
    rows = read_rows(kept)
    assert [int(r["id"]) for r in rows] == [i for i in range(len(built.paths)) if i != 4]
    assert all(r["score"] == "" and r["image"] == str(built.paths[int(r["id"])].resolve()) for r in rows)
    assert f"{len(rows)} of {len(built.paths)} images kept" in capsys.readouterr().out


def test_shards_hold_the_matches_in_rank_order_and_train_reads_them(built, searcher, tmp_path, capsys):
    from clipforge.data.shards import expand_shards, scan_shard

    scores = reference_scores(built, searcher, "a yellow heart")
    cut = float(np.sort(scores)[::-1][6] - 1e-4)  # at least 7 images
    out = tmp_path / "yellow"
    assert main(["filter", str(built.index_dir), "a yellow heart", "--min-score", str(cut), "--shards", str(out),
                 "--per-shard", "3", "--output", str(tmp_path / "s.json")]) == 0
    hits = searcher.filter(text="a yellow heart", min_score=cut)
    shards = expand_shards(str(out))
    assert len(shards) == -(-len(hits) // 3) and f"Wrote {len(hits)} image-caption pairs" in capsys.readouterr().out
    import tarfile

    images, captions = [], []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getnames()):
                data = tar.extractfile(member).read()
                if member.endswith(".png"):
                    images.append(data)
                elif member.endswith(".txt"):
                    captions.append(data.decode())
    assert images == [built.paths[h["id"]].read_bytes() for h in hits]  # the files as they were, best first
    assert captions == [built.captions[h["id"]] for h in hits]
    assert sum(1 for shard in shards for _ in scan_shard(shard, 0)) == len(hits)  # the training reader's view
    assert json.loads((tmp_path / "s.json").read_text())["shards"]["sharded"] == len(hits)


def test_shards_leave_out_unreadable_images_and_refuse_a_used_folder(tmp_path, capsys):
    from search_helpers import clustered, embedding_folder

    from clipforge.search import open_index
    from clipforge.search.build import BuildOptions, build_index
    from clipforge.search.filter import shard_matches

    img, text = clustered(np.random.default_rng(0), 50, 16)
    build_index([embedding_folder(tmp_path / "emb", img, text, part_rows=20)], tmp_path / "i",
                BuildOptions(kind="flat", queries=10))
    index = open_index(tmp_path / "i")
    result = shard_matches(index, np.arange(5), tmp_path / "out")  # their paths are /nowhere/...
    assert result["sharded"] == 0 and [r["id"] for r in result["unreadable"]] == [0, 1, 2, 3, 4]
    assert "image unreadable" in result["unreadable"][0]["error"]
    with pytest.raises(SearchError, match="--shards .*not an empty folder"):
        shard_matches(index, np.arange(5), tmp_path / "i")
