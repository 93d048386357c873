"""Searcher against brute-force numpy over the stored embeddings; the query language; refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from search_index import build_small_index

from clipforge.search.errors import SearchError
from clipforge.search.query import QueryTerm, combine, parse_query


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("search"), count=120)


@pytest.fixture(scope="module")
def searcher(built):
    from clipforge import Searcher

    return Searcher(built.index_dir)


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors.astype(np.float64) @ query.astype(np.float64)  # [n]
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def reference_text_vector(model, texts_weights):
    """The query vector computed independently: float64 weighted sum of per-text normalised embeddings."""
    from clipforge.tokenizer import BPETokenizer

    tokens = BPETokenizer(context_length=model.context_length)([t for t, _ in texts_weights])
    with torch.no_grad():
        feats = model.encode_text(tokens).double()  # [n, d], not normalised
    feats = feats / feats.norm(dim=-1, keepdim=True)
    total = sum(w * f for (_, w), f in zip(texts_weights, feats))
    return (total / total.norm()).numpy()


def test_text_search_equals_brute_force(built, searcher):
    answer = searcher.search(text="a red circle", k=10)
    query = reference_text_vector(built.model, [("a red circle", 1.0)])
    _, scores = brute_force(built.vectors, query, 10)
    got_ids = np.array([h["id"] for h in answer["results"]])
    got_scores = np.array([h["score"] for h in answer["results"]])
    # float32 query embedding vs float64: scores agree to ~1e-6 of their unit scale; ids may only differ by
    # swapping near-ties, so each returned id's brute-force score must equal its reported score
    assert np.allclose(got_scores, scores, atol=1e-5)
    assert np.allclose(built.vectors[got_ids].astype(np.float64) @ query, got_scores, atol=1e-5)
    assert len(set(got_ids.tolist())) == 10
    first = answer["results"][0]
    assert first["caption"] == built.captions[first["id"]]
    assert first["path"] == str(built.paths[first["id"]]) and first["key"] == built.paths[first["id"]].stem


def test_weighted_algebra_matches_reference(built, searcher):
    terms = parse_query(['2:a red circle', '+', 'a blue square', '-', '0.5:a green star'])
    assert [(t.kind, t.value, t.weight) for t in terms] == [
        ("text", "a red circle", 2.0), ("text", "a blue square", 1.0), ("text", "a green star", -0.5)]
    vector = searcher.query_vector(terms)
    reference = reference_text_vector(built.model, [("a red circle", 2.0), ("a blue square", 1.0),
                                                   ("a green star", -0.5)])
    assert np.allclose(vector, reference, atol=1e-5)
    answer = searcher.search(text=[("a red circle", 2.0), ("a blue square", 1.0), ("a green star", -0.5)], k=5)
    _, scores = brute_force(built.vectors, reference, 5)
    assert np.allclose([h["score"] for h in answer["results"]], scores, atol=1e-5)


def test_image_query_and_mixed_query(built, searcher):
    from PIL import Image

    from clipforge.transforms import EvalTransform

    with torch.no_grad():  # the image's embedding computed independently of the Searcher
        pixels = EvalTransform(built.model.image_size)(Image.open(built.paths[7]))[None]
        reference = built.model.encode_image(pixels).double()[0]
    reference = (reference / reference.norm()).numpy()
    answer = searcher.search(image=built.paths[7], k=5)
    _, scores = brute_force(built.vectors, reference, 5)
    assert np.allclose([h["score"] for h in answer["results"]], scores, atol=1e-5)
    assert scores[0] > 0.999  # the image itself (float16 storage), or a near-tie of a random model
    assert answer["threshold"] is None and answer["no_good_match"] is False  # calibrated on text queries only
    # mixed: the vector is the normalised sum of the normalised image and text embeddings
    text_vec = reference_text_vector(built.model, [("a red circle", 1.0)])
    image_vec = searcher.encode_images([built.paths[7]])[0].astype(np.float64)
    expected = combine(np.stack([text_vec, image_vec]), [1.0, 1.0])
    mixed = searcher.query_vector(parse_query(["a red circle", "+", str(built.paths[7])]))
    assert np.allclose(mixed, expected, atol=1e-5)
    by_bytes = searcher.search(image=built.paths[7].read_bytes(), k=5)
    assert by_bytes["results"] == answer["results"]


def test_search_by_id_leaves_itself_out(built, searcher):
    answer = searcher.search_by_id(11, k=5)
    ids, _ = brute_force(built.vectors, built.vectors[11] / np.linalg.norm(built.vectors[11]), 6)
    assert 11 not in [h["id"] for h in answer["results"]]
    assert [h["id"] for h in answer["results"]][:3] == [i for i in ids.tolist() if i != 11][:3]


def _with_threshold(built, name, threshold):
    """A Searcher over a copy of the built index whose index.json stores `threshold` (index.json is not
    checksummed: it holds the checksums). The copy sits beside the index: it finds the embeddings relatively."""
    from clipforge import Searcher

    folder = built.index_dir.parent / f"index-{name}"
    shutil.copytree(built.index_dir, folder)
    info = json.loads((folder / "index.json").read_text())
    info["threshold"] = threshold
    (folder / "index.json").write_text(json.dumps(info))
    return Searcher(folder)


def test_no_good_match_uses_the_index_threshold(built, searcher):
    stored = json.loads((built.index_dir / "index.json").read_text())["threshold"]
    assert searcher.threshold == (None if stored["score"] is None else pytest.approx(stored["score"]))
    best = searcher.search(text="a red circle", k=3)["results"][0]["score"]
    for name, score, flagged in (("above", best + 1e-3, True), ("below", best - 1e-3, False)):
        judged = _with_threshold(built, name, {**stored, "score": score})
        answer = judged.search(text="a red circle", k=3)
        assert answer["threshold"] == pytest.approx(score) and answer["no_good_match"] is flagged
        assert len(answer["results"]) == 3  # still listed
    # the same vector judged against a threshold above / below its best score
    vector = searcher.query_vector([QueryTerm("text", "a red circle")])
    assert searcher.search_vector(vector, 3, threshold=best + 1e-3)["no_good_match"] is True
    assert searcher.search_vector(vector, 3, threshold=best - 1e-3)["no_good_match"] is False


def test_an_uncalibrated_threshold_judges_nothing(built):
    from clipforge.search.measure import UNSEPARATED

    judged = _with_threshold(built, "none", {"score": None, "reason": UNSEPARATED, "pairs": 50})
    assert judged.threshold is None
    answer = judged.search(text="a red circle", k=3)
    assert answer["threshold"] is None and answer["no_good_match"] is False


def test_k_larger_than_index(searcher):
    answer = searcher.search(text="a red circle", k=500)
    assert len(answer["results"]) == len(searcher) == 120
    assert len({h["id"] for h in answer["results"]}) == 120


@pytest.mark.parametrize("args, message", [
    ([], "query is empty"), (["+"], "ends with an operator"), (["a", "b"], r"expected '\+' or '-'"),
    (["a", "+", "-", "b"], "two operators"), (["2:"], "a term is empty"), (["a +"], "ends with an operator"),
])
def test_query_language_errors(args, message):
    with pytest.raises(SearchError, match=message):
        parse_query(args)


def test_query_language_forms(tmp_path):
    photo = tmp_path / "photo.jpg"
    assert [(t.kind, t.weight) for t in parse_query(f"beach + {photo} - people")] == [
        ("text", 1.0), ("image", 1.0), ("text", -1.0)]
    assert parse_query(f"beach + {photo}", allow_paths=False)[1].kind == "text"  # the server never reads paths
    assert parse_query(["t-shirt"])[0].value == "t-shirt"
    assert parse_query(["- people"])[0].weight == -1.0
    assert parse_query(["0.25:a cat"])[0].weight == 0.25
    assert parse_query(["note: cats"])[0].value == "note: cats"  # not a number before the colon: plain text


def test_bad_queries(searcher, tmp_path):
    with pytest.raises(SearchError, match="empty"):
        searcher.search(text="   ")
    with pytest.raises(SearchError, match=f"102 tokens long; this model reads at most {searcher.context_length}"):
        searcher.search(text="word " * 100)
    with pytest.raises(SearchError, match="cancel out"):
        searcher.search(text=[("a red circle", 1.0), ("a red circle", -1.0)])
    with pytest.raises(SearchError, match="no such image file"):
        searcher.search(image=tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(SearchError, match="not a readable image"):
        searcher.search(image=junk)
    with pytest.raises(SearchError, match="k: expected a positive integer"):
        searcher.search(text="a cat", k=0)


def test_decompression_bomb_refused_from_header(built):
    import io

    from PIL import Image

    from clipforge.search.query import open_image

    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")  # 16 Mpx, a few KB compressed
    with pytest.raises(SearchError, match="over the limit of 1000000"):
        open_image(buffer.getvalue(), max_pixels=1_000_000)


def test_fingerprint_mismatch_refused(built):
    from clipforge import Searcher, create_model

    torch.manual_seed(1)
    other = create_model("RN-Tiny-64")
    with pytest.raises(SearchError, match="model fingerprint mismatch: weights_sha256 differs"):
        Searcher(built.index_dir, model=other)
    torch.manual_seed(0)
    with pytest.raises(SearchError, match="fingerprint mismatch: architecture"):
        Searcher(built.index_dir, model=create_model("ViT-Micro-8-32"))


def test_classify_probabilities_match_reference(built, searcher):
    from PIL import Image

    from clipforge.transforms import EvalTransform

    labels = ["a red circle", "a blue square", "a green star"]
    got = searcher.classify(built.paths[3], labels, templates=("a photo of {}.", "{}."))
    model = built.model
    from clipforge.tokenizer import BPETokenizer

    with torch.no_grad():
        prompts = [t.format(label) for label in labels for t in ("a photo of {}.", "{}.")]
        text = model.encode_text(BPETokenizer(context_length=model.context_length)(prompts)).double()
        text = text / text.norm(dim=-1, keepdim=True)
        classes = text.view(3, 2, -1).mean(1)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        pixels = EvalTransform(model.image_size)(Image.open(built.paths[3]))[None]
        image = model.encode_image(pixels).double()
        image = image / image.norm()
        probs = (model.logit_scale.exp().double() * image @ classes.t()).softmax(-1)[0]
    expected = {label: float(p) for label, p in zip(labels, probs)}
    assert sum(r["probability"] for r in got) == pytest.approx(1.0, abs=1e-5)
    for row in got:
        assert row["probability"] == pytest.approx(expected[row["label"]], abs=1e-4)
    assert [r["probability"] for r in got] == sorted((r["probability"] for r in got), reverse=True)


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import clipforge, sys; assert 'Searcher' in clipforge.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
