"""scripts/demo_seeds.py: README's demo table over seeds, checked against hand-computed means and stds."""

from __future__ import annotations

import json
from pathlib import Path

from script_loader import load_script

KEYS = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "zeroshot_heldout_top5", "retrieval_i2t_r1", "retrieval_t2i_r1")


def write_result(path: Path, heldout: float) -> Path:
    result = {k: 0.5 for k in KEYS} | {k + "_single_template": 0.5 for k in KEYS if k.startswith("zeroshot")}
    result["zeroshot_heldout_top1"] = heldout
    path.write_text(json.dumps(result))
    return path


def test_mean_and_sample_std_over_seeds(tmp_path: Path, capsys) -> None:
    paths = [write_result(tmp_path / f"s{i}.json", h) for i, h in enumerate((0.80, 0.86, 0.92))]
    assert load_script("demo_seeds").main([str(p) for p in paths]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "held-out combinations (ensemble)" in line)
    # mean 86.0; sample std sqrt(((-6)^2 + 0 + 6^2) / 2) = 6.0
    assert row == "| zero-shot top-1, held-out combinations (ensemble) | 80.0% | 86.0% | 92.0% | 86.0 ± 6.0 |"


def test_a_file_without_demo_keys_is_one_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"acc1": 0.5}))
    assert load_script("demo_seeds").main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other.json" in err and "zeroshot_seen_top1" in err
