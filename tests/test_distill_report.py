"""scripts/distill_report.py: mean ± std over seeds and paired differences, against hand-computed values."""

import json
import math

import pytest
import torch

import clipforge
from script_loader import load_script



@pytest.fixture(scope="module")
def report():
    return load_script("distill_report")


def _metrics(report, value):
    return {label: value for label, _, _ in report.METRICS}


def test_mean_std_and_paired_differences_by_hand(report):
    records = {"student": {0: _metrics(report, 0.10), 1: _metrics(report, 0.20), 2: _metrics(report, 0.30)},
               "distill-w1": {0: _metrics(report, 0.15), 1: _metrics(report, 0.20), 2: _metrics(report, 0.40)}}
    row = report.summarise(records, teacher=_metrics(report, 0.5))["openclipart image→text R@1"]
    # student 0.1, 0.2, 0.3: mean 0.2, sample variance (0.01 + 0 + 0.01) / 2 = 0.01
    assert row["variants"]["student"]["mean"] == pytest.approx(0.2)
    assert row["variants"]["student"]["std"] == pytest.approx(0.1)
    # distill 0.15, 0.2, 0.4: mean 0.25, variance (0.01 + 0.0025 + 0.0225) / 2 = 0.0175
    assert row["variants"]["distill-w1"]["std"] == pytest.approx(math.sqrt(0.0175))
    # paired differences 0.05, 0.0, 0.10: mean 0.05, variance (0.0025 + 0.0025 + 0.0025) / 2
    paired = row["paired"]["distill-w1"]
    assert paired["per_seed"] == pytest.approx({0: 0.05, 1: 0.0, 2: 0.10})
    assert paired["mean"] == pytest.approx(0.05) and paired["std"] == pytest.approx(0.05) and paired["n"] == 3
    assert row["teacher"] == 0.5


def test_pairs_only_seeds_measured_for_both(report):
    records = {"student": {0: _metrics(report, 0.1), 1: _metrics(report, 0.3)},
               "distill-w1": {1: _metrics(report, 0.6), 2: _metrics(report, 0.9)}}
    row = report.summarise(records, teacher=None)["emoji zero-shot top-1"]
    assert row["paired"]["distill-w1"]["per_seed"] == pytest.approx({1: 0.3})
    assert math.isnan(row["paired"]["distill-w1"]["std"])  # one pair: no spread to report
    assert row["variants"]["distill-w1"]["mean"] == pytest.approx(0.75)


def test_report_only_reads_eval_jsons_and_writes_the_table(report, tmp_path):
    def write_eval(folder, r1):
        folder.mkdir(parents=True)
        for dataset in ("openclipart", "emoji"):
            (folder / f"retrieval-{dataset}.json").write_text(json.dumps({
                "text_retrieval_recall@1": r1, "image_retrieval_recall@1": r1 / 2,
                "text_retrieval_recall@5": 0.5, "image_retrieval_recall@5": 0.4}))
            (folder / f"zeroshot-{dataset}.json").write_text(json.dumps({"acc1": 0.3, "mean_per_class_recall": 0.2}))

    write_eval(tmp_path / "eval" / "teacher", 0.4)
    cells = tmp_path / "cells"
    cells.mkdir()
    for variant, seed, r1 in (("student", 0, 0.10), ("student", 1, 0.20), ("distill-w1", 0, 0.16), ("distill-w1", 1, 0.30)):
        write_eval(tmp_path / "eval" / f"{variant}-seed{seed}", r1)
        metrics = report.metrics_of(tmp_path / "eval" / f"{variant}-seed{seed}")
        (cells / f"{variant}-seed{seed}.json").write_text(json.dumps({"metrics": metrics}))
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"")
    assert report.main(["--teacher", str(teacher), "--output", str(tmp_path), "--seeds", "0", "1", "--report-only"]) == 0
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == "| metric (%) | teacher | student (n=2) | distill-w1 (n=2) | distill-w1 − student, paired |"
    # student 10, 20: 15.0 ± 7.1; distill 16, 30: 23.0 ± 9.9; differences 6, 10: +8.0 ± 2.8 (sqrt 8)
    assert lines[2] == "| openclipart image→text R@1 | 40.0 | 15.0 ± 7.1 | 23.0 ± 9.9 | +8.0 ± 2.8 |"
    assert lines[3] == "| openclipart text→image R@1 | 20.0 | 7.5 ± 3.5 | 11.5 ± 4.9 | +4.0 ± 1.4 |"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["emoji zero-shot top-1"]["paired"]["distill-w1"]["mean"] == pytest.approx(0.0)


def test_student_config_is_much_smaller_than_the_real_data_teacher():
    student, teacher = clipforge.create_model("RN-Micro-64"), clipforge.create_model("RN-Tiny-64")
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(student) < 0.4 * count(teacher)
    assert student.image_size == teacher.image_size == 64
    images = torch.randn(2, 3, 64, 64)
    features = student.encode_image(images, normalize=True)
    assert features.shape == (2, 64)
