"""`clipforge index compact`: the live rows, their vectors byte for byte and their metadata, in one embedding
folder; search answers unchanged but for the ids (flat exactly; IVF-PQ with the same codes); folders the index
no longer uses inside it removed, the user's own kept; an interrupted compaction leaves the index as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from search_helpers import clustered, embedding_folder, unit
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search import open_index
from clipforge.search.build import BuildOptions, add_to_index, build_index
from clipforge.search.compact import compact_index


def _by_key(index, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Each query's answer as (key, score): what stays the same when ids are renumbered."""
    scores, ids = index.search(queries, k)
    return [[(index.metadata([i])[0]["key"], float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
            for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]


def _stored(index) -> dict[str, tuple[dict, np.ndarray, np.ndarray | None]]:
    """key -> (metadata without the id, float16 image vector, float16 caption vector) of every live row."""
    out = {}
    start = 0
    for source in index.sources:
        for part in source.parts:
            img = np.asarray(source.vectors(part, "img"))
            text = np.asarray(source.vectors(part, "text")) if source.has_text else None
            for row in range(part.rows):
                if start + row in index.removed:
                    continue
                meta = index.metadata([start + row])[0]
                meta.pop("id")
                out[meta["key"]] = (meta, img[row].copy(), None if text is None else text[row].copy())
            start += part.rows
    return out


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_compaction_keeps_every_live_row_and_every_answer(tmp_path, kind):
    img, text = clustered(np.random.default_rng(0), 3000, 32)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=700)
    build_index([emb], tmp_path / "i", BuildOptions(kind=kind, target_recall=0.9, queries=200))
    img2, text2 = clustered(np.random.default_rng(1), 500, 32)
    emb2 = embedding_folder(tmp_path / "emb2", img2, text2, part_rows=300, key_prefix="second")
    add_to_index(tmp_path / "i", [emb2], remove=np.arange(0, 3500, 4))
    before = open_index(tmp_path / "i")
    queries = unit(np.random.default_rng(2).standard_normal((20, 32))).astype(np.float32)
    answers = _by_key(before, queries, 10)
    rows = _stored(before)
    info = compact_index(tmp_path / "i", part_size=1000)
    assert info is not None and "removed" not in info and len(info["sources"]) == 1
    assert info["compacted"] == {**info["compacted"], "rows": 3500, "removed": 875, "sources": 2}
    after = open_index(tmp_path / "i")
    assert len(after) == after.id_end == 2625 and not after.removed
    assert [p.rows for p in after.sources[0].parts] == [1000, 1000, 625]
    compacted = _stored(after)
    assert compacted.keys() == rows.keys()
    for key, (meta, vector, caption) in rows.items():
        assert compacted[key][0] == meta
        assert compacted[key][1].tobytes() == vector.tobytes() and compacted[key][2].tobytes() == caption.tobytes()
    if kind == "hnsw":  # a new graph: the same neighbours up to its approximation
        got = _by_key(after, queries, 10)
        overlap = np.mean([len({k for k, _ in a} & {k for k, _ in b}) / 10 for a, b in zip(answers, got)])
        assert overlap >= 0.9
    else:  # flat: exact; ivfpq: the same trained lists and codes, so the same candidates and rescored scores
        assert _by_key(after, queries, 10) == answers
    assert (tmp_path / "emb").is_dir() and (tmp_path / "emb2").is_dir()  # folders outside the index are the user's
    assert compact_index(tmp_path / "i") is None  # nothing left to compact


def test_compact_after_syncs_removes_the_folders_it_replaced(tmp_path, capsys):
    built = build_small_index(tmp_path, count=30, arch="ViT-Micro-8-32")
    images = tmp_path / "images"
    for i in (2, 20):
        (images / f"img_{i:05d}.png").unlink()
    shutil.copy(images / "img_00003.png", images / "extra.png")
    (images / "extra.txt").write_text("an extra picture")
    assert main(["index", "sync", str(built.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    synced = list((built.index_dir / "synced").iterdir())
    assert len(synced) == 1
    before = open_index(built.index_dir)
    paths = sorted(m["path"] for m in before.metadata(before.removed.live()))
    query = unit(np.random.default_rng(0).standard_normal((1, before.dim))).astype(np.float32)
    want = [(before.metadata([i])[0]["path"], s) for i, s in zip(before.search(query, 29)[1][0],
                                                                 before.search(query, 29)[0][0])]
    capsys.readouterr()
    assert main(["index", "compact", str(built.index_dir)]) == 0
    assert "compacted 31 rows from 2 embedding folders (2 removed) into 29 rows" in capsys.readouterr().out
    after = open_index(built.index_dir)
    assert sorted(m["path"] for m in after.metadata(np.arange(len(after)))) == paths
    got = [(after.metadata([i])[0]["path"], s) for i, s in zip(after.search(query, 29)[1][0],
                                                              after.search(query, 29)[0][0])]
    assert got == want
    # the replaced folder stays until the next commit (a server may still read it until it reloads)
    assert synced[0].exists() and (tmp_path / "emb").is_dir()
    # a sync after compaction sees nothing changed (file sizes and times were carried over)
    assert main(["index", "sync", str(built.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "is up to date (29 images)" in capsys.readouterr().out
    assert main(["index", "compact", str(built.index_dir)]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    (images / "extra.png").unlink()
    assert main(["index", "sync", str(built.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert not synced[0].exists() and (tmp_path / "emb").is_dir()  # its own folder went, the user's stayed


def test_an_interrupted_compaction_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    import clipforge.search.build as build

    img, text = clustered(np.random.default_rng(0), 400, 32)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=150)
    build_index([emb], tmp_path / "i", BuildOptions(kind="flat", queries=50))
    add_to_index(tmp_path / "i", [], remove=[1, 2, 3])
    info_bytes = (tmp_path / "i" / "index.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(build, "write_index", crash)
        with pytest.raises(OSError):
            compact_index(tmp_path / "i")
    assert (tmp_path / "i" / "index.json").read_bytes() == info_bytes
    assert len(open_index(tmp_path / "i")) == 397
    info = compact_index(tmp_path / "i")  # again, from the start
    assert info is not None and info["live_rows"] == 397 and len(open_index(tmp_path / "i")) == 397
    assert len(list((tmp_path / "i" / "compact").iterdir())) == 1
    assert json.loads((tmp_path / "i" / "index.json").read_text())["sources"][0]["path"].startswith("compact/")
