"""scripts/demo_heldout_diagnosis.py: per held-out combination recalls of full, shape-only and colour-only prompts."""

import json

import pytest
from script_loader import load_script

from clipforge.data.synthetic import default_heldout

diag = load_script("demo_heldout_diagnosis")


def test_recalls_by_class_match_a_hand_count():
    truth = ["black ring"] * 4 + ["red square"] * 2
    full = ["black ring", "black star", "black star", "black ring", "red square", "red circle"]
    shape = ["ring", "star", "ring", "ring", "circle", "circle"]
    colour = ["black", "black", "white", "black", "red", "red"]
    assert diag.recall_by_class(truth, full) == {"black ring": 0.5, "red square": 0.5}
    assert diag.recall_by_class(truth, shape, part=1) == {"black ring": 0.75, "red square": 0.0}
    assert diag.recall_by_class(truth, colour, part=0) == {"black ring": 0.75, "red square": 1.0}
    with pytest.raises(ValueError):
        diag.recall_by_class(truth, full[:-1])


def test_the_script_reports_every_heldout_combination(tmp_path, capsys):
    out = tmp_path / "diag.json"
    assert diag.main(["RN-Tiny-64", "--per-class", "2", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(rows) == sorted(default_heldout())
    for row in rows.values():
        assert all(row[k] in (0.0, 0.5, 1.0) for k in ("full", "shape_only", "colour_only"))
        assert (row["most_common_miss"] is None) == (row["full"] == 1.0)
    assert capsys.readouterr().out.count("\n") == 2 + len(rows)


def test_a_bad_per_class_is_one_line_error(capsys):
    assert diag.main(["RN-Tiny-64", "--per-class", "0"]) == 2
    assert "--per-class" in capsys.readouterr().err
