"""scripts/queue_report.py: each arm trains with the options it names, scores land in the JSON, the summary is
mean ± sample std, and a bad --score stops in one line before any training."""

import json
import math
import sys

import pytest
import yaml
from script_loader import load_script



@pytest.fixture(scope="module")
def report():
    return load_script("queue_report")


def test_arms_name_their_training_options(report):
    arms = report.variants(["batch", "queue", "momentum", "batch4x", "accum"], 32, 4096, 128)
    assert arms == {
        "batch 32": ["--batch_size=32"],
        "batch 32 + queue 4096": ["--batch_size=32", "--loss.queue_size=4096"],
        "batch 32 + queue 4096, momentum 0.99": ["--batch_size=32", "--loss.queue_size=4096",
                                                 "--loss.queue_momentum=0.99"],
        "batch 128": ["--batch_size=128"],
        "batch 4096 by accumulation (chunk 128)": ["--batch_size=4096", "--accum_chunk=128"],
    }


def test_summary_is_mean_and_sample_std(report):
    table = report.summarise({"a": [{"x": 0.1}, {"x": 0.3}], "b": [{"x": 0.5}]})
    # a: mean 0.2, sample variance ((0.1)^2 + (0.1)^2) / 1 = 0.02; b: one value, std 0
    assert f"| a | 0.200 ± {math.sqrt(0.02):.3f} |" in table.splitlines()
    assert "| b | 0.500 ± 0.000 |" in table.splitlines()


def test_a_bad_score_spec_stops_before_training(report, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["queue_report.py", "--score", "probe:emoji", "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--score 'probe:emoji': expected 'zeroshot:DATASET'"):
        report.main()
    assert not any(tmp_path.iterdir())


def test_each_arm_trains_with_its_options_and_is_scored(report, monkeypatch, tmp_path):
    output = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", [
        "queue_report.py", "--steps", "2", "--seeds", "0", "--batch", "4", "--queue", "8", "--accum-chunk", "4",
        "--variants", "batch", "queue", "accum", "--train-arg=--model=ViT-Micro-8-32",
        "--train-arg=--data.synthetic.image_size=32", "--runs-dir", str(tmp_path / "runs"), "--output", str(output)])
    report.main()
    record = json.loads(output.read_text())
    assert record["steps"] == 2 and record["seeds"] == [0]
    assert list(record["runs"]) == ["batch 4", "batch 4 + queue 8", "batch 8 by accumulation (chunk 4)"]
    for runs in record["runs"].values():
        (metrics,) = runs
        assert set(metrics) == {"zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1",
                                "retrieval_t2i_r1", "s_per_step", "peak_rss_mib"}
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k not in ("s_per_step", "peak_rss_mib"))
        assert metrics["s_per_step"] > 0 and metrics["peak_rss_mib"] > 100  # a process that imported torch
    configs = {d.name: yaml.safe_load((d / "config.yaml").read_text()) for d in (tmp_path / "runs").iterdir()}
    assert configs["batch_4-seed0"]["batch_size"] == 4 and configs["batch_4-seed0"]["loss"]["queue_size"] == 0
    assert configs["batch_4_plus_queue_8-seed0"]["loss"]["queue_size"] == 8
    accum = configs["batch_8_by_accumulation_chunk_4-seed0"]
    assert accum["batch_size"] == 8 and accum["accum_chunk"] == 4 and accum["model"] == "ViT-Micro-8-32"
    assert all(c["steps"] == 2 and c["seed"] == 0 and c["threads"] == 1 for c in configs.values())
