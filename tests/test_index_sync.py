"""`clipforge index sync` and removed rows: a synced index holds what a fresh index of the changed folder holds,
removed ids never answer (flat, IVF-PQ, HNSW, exact scans, by-id routes), a sync interrupted before its commit
leaves the index as it was and resumes, bad input is one line."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from search_helpers import (
    RANK_TOL,
    assert_ranking,
    clustered,
    embedding_folder,
    exact_top_k,
    make_image,
    unit,
)
from search_index import build_small_index

from clipforge.cli import main
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.search import SearchError, open_index
from clipforge.search.build import BuildOptions, add_to_index, build_index, query_sets
from clipforge.search.check import find_duplicates
from clipforge.search.filter import matching
from clipforge.search.removed import Removed

FP16_TOL = 2e-3  # one float16 rounding of unit-vector entries, in a dot product of two such vectors


def _live_vectors(index) -> dict[str, np.ndarray]:
    """path -> stored float32 image vector, for every id a search can return."""
    ids = index.removed.live()
    return {m["path"]: v for m, v in zip(index.metadata(ids), index.image_vectors(ids))}


def _change_folder(images: Path, model_image_size: int) -> dict[str, list[str]]:
    """Delete three files (both embedding parts), add four, rewrite one with another picture."""
    world = SyntheticWorld(SyntheticConfig(image_size=model_image_size))
    gone = [images / f"img_{i:05d}.png" for i in (3, 17, 30)]
    for path in gone:
        path.unlink()
        path.with_suffix(".txt").unlink()
    added = []
    for i in range(40, 44):
        image, caption = world.pair(STREAM_TRAIN, 50_000 + i)
        image.save(images / f"img_{i:05d}.png")
        (images / f"img_{i:05d}.txt").write_text(caption)
        added.append(str((images / f"img_{i:05d}.png").resolve()))
    changed = images / "img_00005.png"
    make_image(11, size=64).save(changed)  # noise, unlike every synthetic scene
    return {"gone": [str(p.resolve()) for p in gone], "added": added, "changed": [str(changed.resolve())]}


@pytest.fixture()
def small(tmp_path):
    return build_small_index(tmp_path, count=40, arch="ViT-Micro-8-32")  # distinct vectors (RN-Tiny-64 at
    # random init maps every image within ~5e-3 of one vector)


def test_a_synced_index_holds_what_a_fresh_index_of_the_folder_holds(small, tmp_path, capsys):
    images = tmp_path / "images"
    before = _live_vectors(open_index(small.index_dir))
    changes = _change_folder(images, small.model.image_size)
    assert main(["index", "sync", str(small.index_dir), str(images), "--dry-run"]) == 0
    assert "4 new, 1 changed, 3 gone, 36 unchanged" in capsys.readouterr().out
    assert json.loads((small.index_dir / "index.json").read_text()).get("removed") is None  # dry run wrote nothing
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "went from 40 to 41 images" in capsys.readouterr().out

    # the reference: the changed folder embedded and indexed from scratch with the same model
    assert main(["embed", str(images), "--model", str(small.model_path), "--output", str(tmp_path / "fresh"),
                 "--workers", "0", "--no-progress"]) == 0
    assert main(["index", "build", str(tmp_path / "fresh"), "--index", str(tmp_path / "fresh_index"),
                 "--kind", "flat", "--queries", "20"]) == 0
    synced, fresh = open_index(small.index_dir), open_index(tmp_path / "fresh_index")
    got, want = _live_vectors(synced), _live_vectors(fresh)
    assert sorted(got) == sorted(want) == sorted(str(p.resolve()) for p in images.glob("*.png"))
    assert len(synced) == len(fresh) == 41
    for path, vector in want.items():
        assert np.abs(got[path] - vector).max() <= FP16_TOL, path  # same model, batches of other sizes
    changed = changes["changed"][0]
    # the changed file was embedded again: its row is the new picture's vector, not the old one's
    assert np.abs(before[changed] - want[changed]).max() > 10 * FP16_TOL

    # search answers: the exact ranking of the live rows (float64), never a removed row
    live = synced.removed.live()
    vectors = synced.image_vectors(live)
    gone = set(synced.removed.ids.tolist())
    assert len(gone) == 4  # three deleted files and the old row of the changed one
    queries = unit(np.random.default_rng(5).standard_normal((12, synced.dim))).astype(np.float32)
    for k in (5, 41, 60):
        scores, ids = synced.search(queries, k)  # 12 queries: the flat block path
        single = [synced.search(q[None], k) for q in queries[:3]]  # one at a time: faiss with a selector
        for row, query in enumerate(queries):
            want_ranking = [(int(live[i]), s) for i, s in exact_top_k(vectors, query, min(k, len(live)))]
            hits = [{"id": int(i), "score": float(s)} for i, s in zip(ids[row], scores[row]) if i >= 0]
            assert_ranking(hits, want_ranking)
            assert not gone & set(ids[row].tolist())
            if row < 3:
                assert np.array_equal(single[row][1], ids[row]) or np.allclose(single[row][0], scores[row],
                                                                               atol=RANK_TOL)
        assert (ids[:, len(live):] == -1).all()


def test_a_second_sync_changes_nothing_and_index_add_keeps_removals(small, tmp_path, capsys):
    images = tmp_path / "images"
    _change_folder(images, small.model.image_size)
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    info_bytes = (small.index_dir / "index.json").read_bytes()
    capsys.readouterr()
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "is up to date (41 images)" in capsys.readouterr().out
    assert (small.index_dir / "index.json").read_bytes() == info_bytes
    removed = json.loads(info_bytes)["removed"]
    # another collection added afterwards: the removals stay
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    shutil.copy(images / "img_00001.png", other / "x" / "copy.png")
    (other / "x" / "copy.txt").write_text("a copy")
    assert main(["embed", str(other), "--model", str(small.model_path), "--output", str(tmp_path / "emb2"),
                 "--workers", "0", "--no-progress"]) == 0
    info = add_to_index(small.index_dir, [tmp_path / "emb2"])
    assert info["removed"] == removed and info["live_rows"] == 42
    # syncing the first folder leaves the other collection's row alone
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    index = open_index(small.index_dir)
    assert len(index) == 42 and index.metadata([index.id_end - 1])[0]["key"] == "x/copy"


def test_an_interrupted_sync_leaves_the_index_as_it_was_and_resumes(small, tmp_path, monkeypatch):
    from clipforge.search import build

    images = tmp_path / "images"
    _change_folder(images, small.model.image_size)
    info_before = (small.index_dir / "index.json").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the commit")

    with monkeypatch.context() as patched:
        patched.setattr(build, "add_to_index", crash)
        assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) != 0
    assert (small.index_dir / "index.json").read_bytes() == info_before
    assert len(open_index(small.index_dir)) == 40  # still the old index, searchable
    embedded = list((small.index_dir / "synced").iterdir())
    assert len(embedded) == 1 and (embedded[0] / "manifest.json").is_file()
    manifest_bytes = (embedded[0] / "manifest.json").read_bytes()
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert list((small.index_dir / "synced").iterdir()) == embedded  # resumed there, not embedded again
    assert (embedded[0] / "manifest.json").read_bytes() == manifest_bytes
    assert len(open_index(small.index_dir)) == 41


def test_removed_rows_are_refused_by_id_everywhere(small, tmp_path):
    import urllib.error
    import urllib.request

    from search_index import running_server

    from clipforge import Searcher
    from clipforge.search.server import create_app

    add_to_index(small.index_dir, [], remove=[7])
    searcher = Searcher(small.index_dir)
    assert len(searcher) == 39
    for call in (lambda: searcher.search_by_id(7), lambda: searcher.index.image_vector(7),
                 lambda: searcher.index.image_vectors([1, 7]), lambda: searcher.index.metadata([7])):
        with pytest.raises(SearchError, match="7.*removed"):
            call()
    hits = searcher.search_by_id(8, k=39)["results"]
    assert len(hits) == 38 and 7 not in {h["id"] for h in hits}  # 39 live rows, itself left out
    captions = searcher.search(text="a red circle", k=39, modality="text")["results"]
    assert len(captions) == 39 and 7 not in {h["id"] for h in captions}
    with running_server(create_app(searcher)) as url:
        for path in ("/api/image/7", "/api/search?id=7"):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(url + path, timeout=30)
            assert error.value.code == 404 and "removed" in json.loads(error.value.read())["error"]
        with urllib.request.urlopen(url + "/api/image/39", timeout=30) as reply:  # the last id still serves
            assert reply.status == 200
        with urllib.request.urlopen(url + "/healthz", timeout=30) as reply:
            assert json.loads(reply.read())["images"] == 39


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_every_index_kind_skips_removed_ids_and_measures_recall_over_the_rest(tmp_path, kind):
    img, text = clustered(np.random.default_rng(0), 4000, 32)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=1500)
    build_index([emb], tmp_path / "i", BuildOptions(kind=kind, target_recall=0.9, queries=200))
    queries = unit(img[:64] + 0.05 * np.random.default_rng(1).standard_normal((64, 32))).astype(np.float32)
    stored = img.astype(np.float16).astype(np.float32)
    first = np.argsort(-(queries @ stored.T), axis=1)[:, :3].reshape(-1)  # the best rows of every query
    remove = np.unique(np.concatenate([first, np.arange(0, 4000, 3)]))  # and a third of the rest
    info = add_to_index(tmp_path / "i", [], remove=remove)
    assert info["live_rows"] == 4000 - len(remove) and min(info["recall"]["image"], info["recall"]["text"]) >= 0.9
    index = open_index(tmp_path / "i")
    live = index.removed.live()
    for batch in (queries, queries[:1]):
        _scores, ids = index.search(batch, 10)
        assert not np.isin(ids, remove).any() and (ids >= 0).all()  # ten live rows each, none removed
        truth = live[np.argsort(-(batch @ stored[live].T), axis=1, kind="stable")[:, :10]]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= (1.0 if kind == "flat" else 0.8)
    # the stored recall is over live rows: recomputed here with a numpy ground truth that leaves them out
    sets = query_sets(index.sources, BuildOptions(queries=200, seed=0), index.removed)
    query_ids, vectors = sets["image"]
    assert len(query_ids) == 200 and not np.isin(query_ids, remove).any()
    found = index.search(vectors, 11)[1]
    exact = vectors @ stored.T  # [200, 4000]
    exact[:, remove] = -np.inf
    exact[np.arange(200), query_ids] = -np.inf  # a query's own row is no answer
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    hits = [len(set(f[f != q][:10].tolist()) & set(t.tolist())) for f, q, t in zip(found, query_ids, truth)]
    assert info["recall"]["image"] == pytest.approx(sum(hits) / 2000, abs=2e-3)  # ties may swap the 10th


def test_filter_and_duplicates_leave_removed_rows_out(tmp_path):
    rng = np.random.default_rng(3)
    img = unit(rng.standard_normal((300, 32)))
    img[10] = unit((img[3] + 0.01 * rng.standard_normal(32))[None])[0]
    img[200] = unit((img[3] + 0.01 * rng.standard_normal(32))[None])[0]
    emb = embedding_folder(tmp_path / "emb", img, None, part_rows=128)
    build_index([emb], tmp_path / "i", BuildOptions(kind="flat"))
    assert [[m["id"] for m in g] for g in find_duplicates(tmp_path / "i", 0.98)["groups"]] == [[3, 10, 200]]
    add_to_index(tmp_path / "i", [], remove=[10])
    assert [[m["id"] for m in g] for g in find_duplicates(tmp_path / "i", 0.98)["groups"]] == [[3, 200]]
    assert main(["index", "duplicates", str(tmp_path / "i"), "--threshold", "0.98",
                 "--keep-manifest", str(tmp_path / "kept.csv")]) == 0
    kept = [int(line.split(",")[3]) for line in (tmp_path / "kept.csv").read_text().splitlines()[1:]]
    assert kept == [i for i in range(300) if i not in (10, 200)]  # removed 10, and 200 duplicates 3
    index = open_index(tmp_path / "i")
    ids, _scores = matching(index, img[3].astype(np.float32), 0.9)
    assert ids.tolist() == [3, 200]  # 10 matches too, but it was removed
    ids, _ = matching(index, img[10].astype(np.float32), -1.0)
    assert len(ids) == 299 and 10 not in ids.tolist()


def test_removed_set_and_its_checks():
    removed = Removed([9, 2, 5, 2], total=10)
    assert removed.ids.tolist() == [2, 5, 9] and len(removed) == 3 and 5 in removed and 4 not in removed
    assert removed.live().tolist() == [0, 1, 3, 4, 6, 7, 8]
    assert removed.mask(4, 3).tolist() == [False, True, False] and removed.mask(6, 3) is None
    assert not Removed([], total=3) and Removed([], total=3).faiss_params(None) is None
    with pytest.raises(SearchError, match="index.json.*outside 0..9"):
        Removed([10], total=10)
    with pytest.raises(SearchError, match="integer ids"):
        Removed(["a"], total=10)


def test_sync_refuses_bad_input_in_one_line(small, tmp_path, capsys):
    images = tmp_path / "images"
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\nimages/img_00001.png,x\n")
    for args, message in [([str(tmp_path / "nowhere")], "nowhere"),
                          ([str(manifest)], "takes an image folder")]:
        assert main(["index", "sync", str(small.index_dir), *args, "--no-progress"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    other_model = build_small_index(tmp_path / "other", count=4, arch="ViT-Micro-8-32", seed=1).model_path
    (images / "img_00001.png").unlink()
    shutil.copy(images / "img_00002.png", images / "new.png")
    assert main(["index", "sync", str(small.index_dir), str(images), "--model", str(other_model),
                 "--workers", "0", "--no-progress"]) != 0
    assert "fingerprint" in capsys.readouterr().err.lower()
    with open(small.index_dir / ".sync.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["index", "sync", str(small.index_dir), str(images), "--no-progress"]) != 0
        assert "another `index sync` or `index compact` is running" in capsys.readouterr().err
    info = json.loads((small.index_dir / "index.json").read_text())
    info["removed"] = [0, 99]
    (small.index_dir / "index.json").write_text(json.dumps(info))
    with pytest.raises(SearchError, match="index.json.*outside 0..39"):
        open_index(small.index_dir)


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _wait_until(condition, seconds: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_running_server_serves_the_synced_index(small, tmp_path):
    from search_index import running_server

    from clipforge import Searcher
    from clipforge.search.server import create_app

    images = tmp_path / "images"
    searcher = Searcher(small.index_dir)
    app = create_app(searcher, reload_s=0.1)
    with running_server(app) as url:
        assert json.loads(_get(url + "/healthz")[1])["images"] == 40
        changes = _change_folder(images, small.model.image_size)
        assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
        assert _wait_until(lambda: json.loads(_get(url + "/healthz")[1])["images"] == 41), "never reloaded"
        fresh = Searcher(small.index_dir)  # the reference: the synced index opened anew
        status, body = _get(url + "/api/search?text=a%20red%20circle&k=41")
        assert status == 200
        got = json.loads(body)["results"]
        before, after = searcher.info["index_file"]["sha256"][:12], fresh.info["index_file"]["sha256"][:12]
        assert before != after and all(h["image_url"].endswith(f"?v={after}") for h in got)  # not the old URLs
        assert json.loads(_get(url + "/api/info")[1])["version"] == after
        assert_ranking([{"id": h["id"], "score": h["score"]} for h in got],
                       [(h["id"], h["score"]) for h in fresh.search(text="a red circle", k=41)["results"]], tol=1e-4)
        by_path = {h["path"]: h["id"] for h in fresh.search(text="a red circle", k=41)["results"]}
        for path in changes["added"] + changes["changed"]:
            status, body = _get(url + f"/api/image/{by_path[path]}")
            assert status == 200 and body == Path(path).read_bytes()
        for id_ in fresh.index.removed.ids.tolist():
            assert _get(url + f"/api/image/{id_}")[0] == 404
        status, body = _get(url + "/metrics")
        assert status == 200 and 'clipforge_index_images{index="default"} 41.0' in body.decode()
    assert len(searcher) == 40 and len(searcher.search(text="a red circle", k=50)["results"]) == 40  # untouched


def test_a_changed_index_that_does_not_open_keeps_being_served(small, capfd):
    from clipforge import Searcher
    from clipforge.search.server import ServedIndices

    served = ServedIndices(Searcher(small.index_dir))
    info_path = small.index_dir / "index.json"
    good = info_path.read_text()
    damaged = json.loads(good)
    damaged["removed"] = [0, 99]  # past the last id
    info_path.unlink()  # a new file, as every commit writes
    info_path.write_text(json.dumps(damaged))
    assert served.reload_changed() == [] and len(served.searchers["default"]) == 40
    assert "index default changed but was not reloaded" in capfd.readouterr().err
    assert served.reload_changed() == [] and capfd.readouterr().err == ""  # the same file is not retried
    damaged["removed"] = [0]
    info_path.unlink()
    info_path.write_text(json.dumps(damaged))
    assert served.reload_changed() == ["default"] and len(served.searchers["default"]) == 39


def test_an_edited_caption_is_embedded_again(small, tmp_path, capsys):
    images = tmp_path / "images"
    sidecar = images / "img_00012.txt"
    sidecar.write_text("  a completely new description of this picture\n")
    (images / "img_00013.txt").write_text((images / "img_00013.txt").read_text() + "\n")  # same caption, cleaned
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "0 new, 1 changed, 0 gone, 39 unchanged" in capsys.readouterr().out
    index = open_index(small.index_dir)
    assert index.removed.ids.tolist() == [12] and len(index) == 40
    record = index.metadata([40])[0]
    assert record["caption"] == "a completely new description of this picture"
    assert record["path"] == str((images / "img_00012.png").resolve())


def test_a_file_indexed_twice_is_counted_once(small, tmp_path, capsys):
    images = tmp_path / "images"
    assert main(["embed", str(images), "--model", str(small.model_path), "--output", str(tmp_path / "again"),
                 "--workers", "0", "--no-progress"]) == 0
    add_to_index(small.index_dir, [tmp_path / "again"])  # every file now has two rows
    make_image(3, size=40).save(images / "img_00009.png")
    (images / "img_00011.png").unlink()
    capsys.readouterr()
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "0 new, 1 changed, 1 gone, 38 unchanged" in capsys.readouterr().out
    index = open_index(small.index_dir)
    assert index.removed.ids.tolist() == [9, 11, 49, 51] and len(index) == 77  # 80 - 4 + the one re-embedded


def test_small_changes_keep_the_measurement_until_they_add_up(tmp_path, capsys):
    img, text = clustered(np.random.default_rng(4), 1000, 32)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=400)
    built = build_index([emb], tmp_path / "i", BuildOptions(kind="flat", queries=100))
    assert built["recall"]["rows"] == 1000 and built["unmeasured_changes"] == 0
    kept = add_to_index(tmp_path / "i", [], remove=np.arange(1, 11), measure=None)  # 10 of 1000: under 5%
    assert kept["recall"] == built["recall"] and kept["threshold"] == built["threshold"]
    assert kept["unmeasured_changes"] == 10 and kept["live_rows"] == 990
    more = add_to_index(tmp_path / "i", [], remove=np.arange(11, 52), measure=None)  # 51 in all > 5% of 949
    assert more["unmeasured_changes"] == 0 and more["recall"]["rows"] == 949
    forced = add_to_index(tmp_path / "i", [], remove=[60], measure=True)
    assert forced["unmeasured_changes"] == 0 and forced["recall"]["rows"] == 948
    # and through index sync's report and message
    from clipforge.search.sync import sync_index

    small = build_small_index(tmp_path / "s", count=60, arch="ViT-Micro-8-32")
    (tmp_path / "s" / "images" / "img_00001.png").unlink()
    report = sync_index(small.index_dir, tmp_path / "s" / "images", progress=False, workers=0)
    assert report["measured"] is False and report["unmeasured_changes"] == 1
    (tmp_path / "s" / "images" / "img_00002.png").unlink()
    capsys.readouterr()
    assert main(["index", "sync", str(small.index_dir), str(tmp_path / "s" / "images"), "--measure"]) == 0
    assert "kept from the last measurement" not in capsys.readouterr().out
    assert json.loads((small.index_dir / "index.json").read_text())["recall"]["rows"] == 58


def test_a_new_image_without_a_caption_keeps_caption_search(small, tmp_path, capsys):
    images = tmp_path / "images"
    make_image(21, size=40).save(images / "no_caption.png")  # no .txt beside it
    assert main(["index", "sync", str(small.index_dir), str(images), "--workers", "0", "--no-progress"]) == 0
    assert "caption search" not in capsys.readouterr().out
    index = open_index(small.index_dir)
    assert index.has_captions and len(index) == 41
    new = next(i for i in range(index.id_end) if index.metadata([i])[0]["key"] == "no_caption")
    assert index.metadata([new])[0]["caption"] is None
    query = index.image_vector(new)[None, :]
    assert index.search(query, 1)[1][0, 0] == new  # found by its image
    _, ids = index.search_captions(query, 41)  # but never as a caption: the 40 captioned images answer
    assert new not in ids[0].tolist() and (ids[0] >= 0).sum() == 40
