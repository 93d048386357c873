"""`clipforge search` and `clipforge serve` as a user calls them: the table, --output JSON, one-line errors."""

from __future__ import annotations

import json

import pytest
from search_index import build_small_index

from clipforge.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("cli"), count=40)


def test_search_table_and_json(built, tmp_path, capsys):
    from clipforge import Searcher

    out = tmp_path / "hits.json"
    assert main(["search", str(built.index_dir), "a red circle", "+", str(built.paths[3]), "-", "0.5:a blue square",
                 "-k", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].split() == ["rank", "score", "key", "caption", "path"]
    payload = json.loads(out.read_text())
    assert payload["query"] == ["+1×text 'a red circle'", f"+1×image '{built.paths[3]}'", "-0.5×text 'a blue square'"]
    direct = Searcher(built.index_dir).search(text=[("a red circle", 1.0), ("a blue square", -0.5)],
                                              image=[built.paths[3]], k=4)
    assert [h["id"] for h in payload["results"]] == [h["id"] for h in direct["results"]]
    assert payload["threshold"] is None  # an image in the query: the text threshold does not judge it
    rows = [line.split()[:3] for line in printed.splitlines() if line[:1].isdigit()]
    assert rows == [[str(n), f"{h['score']:.4f}", h["key"]] for n, h in enumerate(payload["results"], 1)]


def test_options_anywhere_and_image_option(built, capsys):
    assert main(["search", str(built.index_dir), "-k", "2", "a green star", "+", "a red circle",
                 "--image", str(built.paths[0])]) == 0
    printed = capsys.readouterr().out
    assert "+1×text 'a green star' +1×text 'a red circle' +1×image" in printed
    assert len([line for line in printed.splitlines() if line[:1].isdigit()]) == 2  # two result rows


def test_no_good_match_line(built, capsys, monkeypatch):
    import clipforge.search.searcher as searcher_module

    original = searcher_module.Searcher.__init__

    def high_threshold(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.threshold = 2.0  # above any cosine: every text query is judged "no good match"

    monkeypatch.setattr(searcher_module.Searcher, "__init__", high_threshold)
    assert main(["search", str(built.index_dir), "a red circle", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "No good match: the best score" in printed and "threshold 2.0000" in printed
    assert len([line for line in printed.splitlines() if line[:1].isdigit()]) == 3  # results still listed


@pytest.mark.parametrize("args, fragment", [
    (["a red circle", "+"], "ends with an operator"),
    (["word " * 100], "tokens long; this model reads at most 32"),
    (["missing.png"], "missing.png: no such image file"),
    ([], "give a query text, an image"),
    (["a cat", "--bogus"], "unrecognised option --bogus"),
])
def test_search_errors_are_one_line(built, capsys, args, fragment):
    assert main(["search", str(built.index_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_unreadable_image_and_missing_index(built, tmp_path, capsys):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert main(["search", str(built.index_dir), "--image", str(junk)]) == 2
    assert "junk.jpg: not a readable image" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nope"), "a cat"]) == 2
    assert "no such index directory" in capsys.readouterr().err


def test_fingerprint_mismatch_refused_at_start(built, tmp_path, capsys):
    import torch

    from clipforge.checkpoint import save_model
    from clipforge.factory import create_model

    torch.manual_seed(5)
    other = save_model(create_model("RN-Tiny-64"), tmp_path / "other.safetensors")
    assert main(["search", str(built.index_dir), "a cat", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model fingerprint mismatch: weights_sha256 differs" in err
    assert main(["serve", str(built.index_dir), "--model", str(other), "--port", "1"]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--port", "0"], "--port: expected 1..65535"),
    (["--max-upload-mb", "0"], "--max-upload-mb: expected a positive number"),
    (["--templates", "no-such-set"], "no template set 'no-such-set'"),
    (["--dedup", "1.5"], "--dedup: expected a cosine similarity in (-1, 1], got 1.5"),
])
def test_serve_bad_options(built, capsys, args, fragment):
    assert main(["serve", str(built.index_dir), *args]) == 2
    assert fragment in capsys.readouterr().err
