"""Near-duplicate collapsing (`search --dedup`, `dedup=` in the API): a hand-worked case, a float64 greedy
reference over the whole exact ranking, byte-identical copies, and the CLI / HTTP surfaces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_index import build_small_index

from clipforge.cli import main
from clipforge.search.dedup import check_threshold, collapse
from clipforge.search.errors import SearchError
from clipforge.search.query import QueryTerm
from clipforge.search.server import create_app

# A randomly initialised ViT spreads its image embeddings (cosines ~0.5-1.0 here; a random ResNet puts every
# pair above 0.998), so thresholds in the middle of the range make real decisions.
ARCH = "ViT-Tiny-8-64"
COPIES = {3: 1, 7: 2}  # image 3 once more, image 7 twice more: ids 4 and 9, 10


def unit(degrees: float) -> np.ndarray:
    return np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def test_collapse_by_hand():
    # ranked a (0 deg), b (10 deg), c (90 deg), d (80 deg); cos 10 deg = 0.985 >= 0.95 > cos 80 deg = 0.174
    ranked = np.stack([unit(0), 2.0 * unit(10), unit(90), unit(80)])  # b's length must not matter
    out = collapse(ranked, 0.95, limit=4)
    assert out.shown == [0, 2] and out.hidden_under == {0: [1], 2: [3]} and out.hidden == 2
    assert not out.complete  # the candidates ran out: more duplicates of c could follow
    out = collapse(ranked, 0.95, limit=1)  # walks on to c, the next distinct one, and stops: d is never examined
    assert out.shown == [0] and out.hidden_under == {0: [1]} and out.hidden == 1 and out.complete
    out = collapse(ranked, 0.95, limit=4, seed=unit(85))  # c and d are copies of the query image (cos 0.996)
    assert out.shown == [0] and out.hidden_under == {0: [1]} and out.hidden_as_seed == 2 and out.hidden == 3
    out = collapse(ranked, 1.0, limit=4)  # only exact copies collapse
    assert out.shown == [0, 1, 2, 3] and out.hidden == 0
    # a candidate near two shown results goes under the nearer one: e (50 deg) is 0.766 from a, 0.866 from c
    out = collapse(np.stack([unit(0), unit(90), unit(50)]), 0.7, limit=3)
    assert out.shown == [0, 1] and out.hidden_under == {0: [], 1: [2]}


@pytest.mark.parametrize("value", [True, "0.9", 1.5, -1.0, float("nan"), float("inf"), None])
def test_bad_thresholds_are_refused(value):
    with pytest.raises(ValueError, match="dedup: expected a cosine similarity in"):
        check_threshold(value)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("dedup"), count=70, arch=ARCH, copies=COPIES)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


@pytest.fixture(scope="module")
def distinct(tmp_path_factory):
    """No copies: exact ties would leave the order of equal scores to faiss."""
    from clipforge import Searcher

    built = build_small_index(tmp_path_factory.mktemp("dedup-distinct"), count=70, arch=ARCH)
    return built, Searcher(built.index_dir)


def copy_groups(built) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(built.paths):
        groups.setdefault(path.stem.split("_copy")[0], []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def test_copies_are_where_the_builder_says(built):
    assert copy_groups(built) == [[3, 4], [8, 9, 10]]  # image 7 is id 8 once image 3's copy takes id 4
    for group in copy_groups(built):
        assert all(np.array_equal(built.vectors[group[0]], built.vectors[i]) for i in group)


def reference(vectors: np.ndarray, query: np.ndarray, k: int, threshold: float,
              exclude: int | None = None) -> tuple[list[int], dict[int, list[int]], int, list[float]]:
    """The whole collection ranked exactly in float64, then walked greedily; also every cosine it compared."""
    vectors = vectors.astype(np.float64)
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    order = [int(i) for i in np.argsort(-(vectors @ query), kind="stable") if i != exclude]
    seed = units[exclude] if exclude is not None else None
    shown: list[int] = []
    under: dict[int, list[int]] = {}
    hidden, compared = 0, []
    for i in order:
        if seed is not None:
            compared.append(float(units[i] @ seed))
            if compared[-1] >= threshold:
                hidden += 1
                continue
        sims = [float(units[i] @ units[j]) for j in shown]
        compared += sims
        if sims and max(sims) >= threshold:
            under[shown[int(np.argmax(sims))]].append(i)
            hidden += 1
            continue
        if len(shown) == k:
            break
        shown.append(i)
        under[i] = []
    return shown, under, hidden, compared


def robust_threshold(vectors: np.ndarray, query: np.ndarray, k: int, exclude: int | None) -> float:
    """A threshold in the middle of the cosine range whose greedy walk compares no cosine within 1e-5 of it and
    ranks no two examined candidates within 1e-6: float32 (ours) and float64 (the reference) then agree."""
    units = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    cosines = np.sort((units @ units.T)[np.triu_indices(len(units), 1)])
    scores = np.sort(vectors.astype(np.float64) @ query)[::-1]
    for quantile in np.linspace(0.80, 0.40, 41):
        low, high = np.quantile(cosines, [quantile - 0.01, quantile + 0.01])
        window = cosines[(cosines >= low) & (cosines <= high)]
        gap = int(np.argmax(np.diff(window)))
        threshold = float(window[gap] + window[gap + 1]) / 2
        shown, under, _, compared = reference(vectors, query, k, threshold, exclude)
        examined = sorted((float(vectors[i].astype(np.float64) @ query) for i in
                           shown + [j for v in under.values() for j in v]), reverse=True)
        if (min(abs(c - threshold) for c in compared) > 1e-5 and len(shown) == k
                and np.all(np.diff(examined) < -1e-6) and scores[0] - scores[1] > 1e-6):
            return threshold
    raise AssertionError("no threshold with a clear margin: the fixture's embeddings changed")


def test_dedup_equals_the_greedy_reference(distinct):
    built, searcher = distinct
    query = searcher.query_vector([QueryTerm("text", "a red circle")]).astype(np.float64)
    for exclude in (None, 20):
        vector = query if exclude is None else built.vectors[exclude].astype(np.float64)
        vector = vector / np.linalg.norm(vector)
        threshold = robust_threshold(built.vectors, vector, 8, exclude)
        shown, under, hidden, _ = reference(built.vectors, vector, 8, threshold, exclude)
        assert hidden > 0, "the threshold hides nothing: the test would not test collapsing"
        if exclude is None:
            answer = searcher.search_vector(vector.astype(np.float32), 8, dedup=threshold)
        else:
            answer = searcher.search_by_id(exclude, 8, dedup=threshold)
        assert [h["id"] for h in answer["results"]] == shown
        assert {h["id"]: h["duplicates"] for h in answer["results"]} == under
        assert answer["hidden"] == hidden and answer["dedup"] == threshold


def test_copies_appear_once_with_the_others_listed_under_them(built, searcher):
    units = built.vectors / np.linalg.norm(built.vectors, axis=1, keepdims=True)
    in_group = {i for g in copy_groups(built) for i in g[1:]}
    distinct = [i for i in range(len(units)) if i not in in_group]
    closest = float(np.max((units[distinct] @ units[distinct].T)[np.triu_indices(len(distinct), 1)]))
    assert closest < 1 - 1e-4, "two different images embed alike: copies cannot be told apart"
    threshold = (closest + 1.0) / 2
    everything = len(built.paths)
    answer = searcher.search(text="a red circle", k=everything, dedup=threshold)
    ids = [h["id"] for h in answer["results"]]
    assert len(ids) == everything - 3 and answer["hidden"] == 3  # 1 copy of image 3, 2 of image 7
    for group in copy_groups(built):
        shown = [i for i in group if i in ids]
        assert len(shown) == 1
        listed = next(h["duplicates"] for h in answer["results"] if h["id"] == shown[0])
        assert sorted([shown[0], *listed]) == group
    plain = searcher.search(text="a red circle", k=everything)
    assert "dedup" not in plain and all("duplicates" not in h for h in plain["results"])
    assert [h["id"] for h in plain["results"] if h["id"] in ids] == ids  # collapsing keeps the ranking
    for group in copy_groups(built):  # equal scores come in id order: the original first, then its copies
        ranked = [h["id"] for h in searcher.search_by_id(group[0], k=everything - 1)["results"]]
        assert [i for i in ranked if i in group] == group[1:]
        assert next(h["id"] for h in answer["results"] if h["id"] in group) == group[0]
    like_three = searcher.search_by_id(3, k=5, dedup=threshold)  # its copy (id 4) is not "an image like it"
    assert 4 not in [h["id"] for h in like_three["results"]] and like_three["hidden"] >= 1
    assert 4 in [h["id"] for h in searcher.search_by_id(3, k=3)["results"]]  # without dedup the copy is there


def test_dedup_errors(searcher):
    with pytest.raises(SearchError, match="dedup: expected a cosine"):
        searcher.search(text="a red circle", k=3, dedup=1.5)


def test_cli_and_http(built, searcher, tmp_path, capsys):
    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), "a red circle", "-k", str(len(built.paths)), "--dedup", "0.99995",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    direct = searcher.search(text="a red circle", k=len(built.paths), dedup=0.99995)
    assert [h["id"] for h in saved["results"]] == [h["id"] for h in direct["results"]]
    assert saved["hidden"] == direct["hidden"] >= 3 and f"{direct['hidden']} near-duplicates" in printed
    assert main(["search", str(built.index_dir), "a red circle", "--dedup", "2"]) == 2
    assert "--dedup: expected a cosine similarity in (-1, 1], got 2" in capsys.readouterr().err

    client = TestClient(create_app(searcher))
    body = client.get("/api/search", params={"text": "a red circle", "k": 6, "dedup": "0.99995"}).json()
    direct = searcher.search(text="a red circle", k=6, dedup=0.99995)
    assert [r["id"] for r in body["results"]] == [h["id"] for h in direct["results"]]
    assert [r["duplicates"] for r in body["results"]] == [h["duplicates"] for h in direct["results"]]
    assert body["dedup"] == 0.99995 and body["hidden"] == direct["hidden"]
    by_id = client.get("/api/search", params={"id": 3, "k": 4, "dedup": "0.99995"}).json()
    assert 4 not in [r["id"] for r in by_id["results"]]
    posted = client.post("/api/search", files={"image": ("q.png", built.paths[8].read_bytes(), "image/png")},
                         data={"k": "5", "dedup": "0.99995"}).json()
    assert posted["results"][0]["id"] in (8, 9, 10)  # one of image 7's three files, the others under it
    assert sorted([posted["results"][0]["id"], *posted["results"][0]["duplicates"]]) == [8, 9, 10]
    for bad in ("abc", "1.5", "-1", "nan", "inf"):
        response = client.get("/api/search", params={"text": "a red circle", "dedup": bad})
        assert response.status_code == 400 and response.json()["error"].startswith("dedup: expected a cosine")
    assert client.get("/api/search", params={"text": "a red circle", "dedup": ""}).json().get("dedup") is None


def test_serve_default_is_the_library_default():
    from clipforge.cli import build_parser
    from clipforge.search.dedup import DEFAULT_DEDUP

    assert build_parser().parse_args(["serve", "idx"]).dedup == DEFAULT_DEDUP  # the CLI spells it without numpy
