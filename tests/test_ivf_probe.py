"""IVF probing for a folder's rows (search/ivf_probe.py): the probe plan against a hand computation, the rows
per list against faiss's own assignment, the search against faiss's full probe, and recall on a folder of
similar images far from the queries, which a fixed widening of nprobe misses."""

from __future__ import annotations

import numpy as np
import pytest
from search_helpers import clustered, embedding_folder, exact_top_k, unit

import clipforge.search.index as index_module
from clipforge.search import ivf_probe
from clipforge.search.build import BuildOptions, build_index
from clipforge.search.index import open_index
from clipforge.search.ivf_probe import ListCounts, probe_plan, probe_search
from clipforge.search.removed import selector_params
from clipforge.search.scope import Scope

faiss = pytest.importorskip("faiss")


def test_probe_plan_by_hand():
    class Counts:
        sizes = np.array([10, 10, 10, 10])
        kept = np.array([0, 5, 10, 2])

    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    # query 0: the first list scans 10 rows; kept along its order 0, 5, 15 -> reached at its third list, and its
    # first list keeps nothing (-1); query 1: kept 2, 12 -> reached at its second list, the rest beyond it
    assert probe_plan(Counts, order, nprobe=1, depth=1).tolist() == [[-1, 1, 2], [3, 2, -1]]
    # twice the rows (20) is never reached: every list holding kept rows, in order
    assert probe_plan(Counts, order, nprobe=1, depth=2).tolist() == [[-1, 1, 2, 3], [3, 2, 1, -1]]
    # query 1's two first lists scan 20 rows; at depth 1 its kept 2, 12, 17 never reach them, at depth 0.5 (10)
    # the second list does
    assert probe_plan(Counts, order[1:], nprobe=2, depth=1).tolist() == [[3, 2, 1, -1]]
    assert probe_plan(Counts, order[1:], nprobe=2, depth=0.5).tolist() == [[3, 2]]


@pytest.fixture(scope="module")
def ivf():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((4000, 16))).astype(np.float32)
    index = faiss.index_factory(16, "IVF32,PQ4x8", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 2
    return index, x


def test_list_counts_match_faiss_assignment(ivf):
    index, x = ivf
    allowed = np.random.default_rng(1).random(len(x)) < 0.3
    counts = ListCounts(index, allowed)
    _, lists = index.quantizer.search(x, 1)  # the list each row was added to
    assert counts.sizes.tolist() == np.bincount(lists[:, 0], minlength=32).tolist()
    assert counts.kept.tolist() == np.bincount(lists[allowed, 0], minlength=32).tolist()


def test_a_plan_over_every_list_answers_as_the_full_probe(ivf, monkeypatch):
    index, x = ivf
    allowed = np.random.default_rng(2).random(len(x)) < 0.1
    selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
    queries = unit(np.random.default_rng(3).standard_normal((20, 16))).astype(np.float32)
    monkeypatch.setattr(ivf_probe, "SCOPE_DEPTH", 1e9)  # the target is never reached: every list is probed
    scores, ids = probe_search(index, ListCounts(index, allowed), selector, queries, 10)
    want_scores, want_ids = index.search(queries, 10, params=faiss.SearchParametersIVF(sel=selector, nprobe=32))
    assert allowed[ids].all()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (ids == want_ids).mean() > 0.95  # equal PQ scores may swap places


def test_a_folder_of_similar_images_far_from_the_query(tmp_path, monkeypatch):
    """A folder of one region of the collection (images of a few subjects), queried from elsewhere: its best rows
    lie in lists far down the query's order, so nprobe widened by 1 / share finds few of them, while probing
    until the folder's rows reach twice what the tuned probe scans keeps the index's recall."""
    dim, rows = 32, 6000
    img, text = clustered(np.random.default_rng(0), rows, dim, clusters=60)
    emb = embedding_folder(tmp_path / "emb", img, text, part_rows=2000)
    build_index([emb], tmp_path / "ivf", BuildOptions(kind="ivfpq", target_recall=0.9, queries=200))
    monkeypatch.setattr(index_module, "SCAN_ROWS", 0)  # the faiss path, as for a folder over 65,536 rows
    index = open_index(tmp_path / "ivf")
    stored = np.concatenate([chunk for _, chunk in index_module.vector_chunks(index.sources)])
    direction = unit(np.random.default_rng(4).standard_normal((1, dim)))  # [1, dim]
    along = stored @ direction[0]  # [rows]
    allowed = along > np.quantile(along, 0.75)  # a cap of the sphere: the quarter of the rows furthest along it
    inside = np.flatnonzero(allowed)
    # queries from the other side of the sphere, so that the folder's best rows are far from each of them
    queries = unit(np.random.default_rng(5).standard_normal((40, dim)) / np.sqrt(dim) - direction).astype(np.float32)

    def recall(scope: Scope) -> float:
        _, ids = index.search(queries, 10, scope)
        assert (ids >= 0).all() and allowed[ids].all()
        truth = [{int(inside[i]) for i, _ in exact_top_k(stored[inside], q, 10)} for q in queries]
        return sum(len(set(row.tolist()) & want) for row, want in zip(ids, truth)) / (10 * len(queries))

    class Widened(Scope):  # the fixed widening IVF searches took before ivf_probe: nprobe / share
        def faiss_search(self, faiss_index, q, k):
            kept = len(self) / faiss_index.ntotal
            return faiss_index.search(q, k, params=selector_params(faiss_index, self.selector(), kept))

    probed, widened = recall(Scope(allowed, ("cap",))), recall(Widened(allowed, ("cap",)))
    print(f"recall@10: probed {probed:.3f}, widened {widened:.3f}")
    assert probed >= 0.9
    assert probed > widened


def test_queries_in_blocks_answer_as_at_once(ivf, monkeypatch):
    index, x = ivf
    allowed = np.random.default_rng(6).random(len(x)) < 0.2
    counts = ListCounts(index, allowed)
    selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
    queries = unit(np.random.default_rng(7).standard_normal((20, 16))).astype(np.float32)
    whole = probe_search(index, counts, selector, queries, 10)
    monkeypatch.setattr(ivf_probe, "ORDER_ENTRIES", 3 * 32)  # blocks of 3 queries (the last of 2)
    blocks = probe_search(index, counts, selector, queries, 10)
    assert (blocks[1] == whole[1]).all() and (blocks[0] == whole[0]).all()
