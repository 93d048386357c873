"""The study's margin histograms (Figure 3) and its real-data setting, against hand computations.

Histograms: features whose similarities are written out by hand, so every margin is known exactly and
lies mid-bin (no value near a bin edge, where rounding could move it). The real-data setting: a study cell
trained on a tiny manifest and evaluated with the shared evaluators, checked against a naive computation
(one image or caption at a time, straight from the files) on the kept model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from clipforge.config import ConfigError
from clipforge.eval.margins import batch_margins, bin_edges, margin_report, merge_reports
from clipforge.eval.resolve import resolve_model
from clipforge.eval.spec import EvalTask
from clipforge.eval.templates import load_templates
from clipforge.study import build_study, expand_cells, run_study
from clipforge.study.figures import MarginPanel, histogram_of, plot_margin_panels
from clipforge.study.real import flatten_results, real_columns
from clipforge.study.report import markdown_tables, summarise
from clipforge.tokenizer import BPETokenizer
from clipforge.transforms import model_preprocess

from manifest_helpers import write_pairs_csv

# ---------------------------------------------------------------- margin histograms


def _features(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images e_1..e_3 and texts g_j = rows[j]: the similarity <f_i, g_j> is rows[j][i], read off by hand."""
    return torch.eye(3, dtype=torch.float64), torch.tensor(rows, dtype=torch.float64)


# S[i, j] = <f_i, g_j>: 0.6 on the diagonal, the hardest negative 0.64 in every row and column.
MIXED = [[0.6, 0.64, 0.48], [0.48, 0.6, 0.64], [0.64, 0.48, 0.6]]
# 0.96 on the diagonal, the hardest negative 0.28.
CLEAR = [[0.96, 0.28, 0.0], [0.0, 0.96, 0.28], [0.28, 0.0, 0.96]]


def test_margin_histograms_pool_seeds_exactly():
    one = margin_report(batch_margins(*_features(MIXED), batch_size=3), batch_size=3)
    two = margin_report(batch_margins(*_features(CLEAR), batch_size=3), batch_size=3)
    # by hand: 0.6 - 0.64 = -0.04 for each pair of MIXED, 0.96 - 0.28 = 0.68 for CLEAR, both directions
    edges = bin_edges("i2t")
    low, high = int(np.searchsorted(edges, -0.04)) - 1, int(np.searchsorted(edges, 0.68)) - 1
    assert edges[low] < -0.04 < edges[low + 1] and edges[high] < 0.68 < edges[high + 1]
    width = 0.025
    for report, index, value in ((one, low, -0.04), (two, high, 0.68)):
        for series in ("i2t", "t2i"):
            h = histogram_of(report, series)
            expected = np.zeros(len(edges) - 1)
            expected[index] = 1.0 / width  # all three pairs in one bin: density 1 / bin width
            np.testing.assert_allclose(h.density, expected, atol=1e-9)
            assert h.mean == pytest.approx(value, abs=1e-6) and h.pairs == 3  # computed in float32
            assert h.frac_negative == (1.0 if value < 0 else 0.0)
    pooled = histogram_of(merge_reports([one, two]))
    expected = np.zeros(len(edges) - 1)
    expected[[low, high]] = 0.5 / width
    np.testing.assert_allclose(pooled.density, expected, atol=1e-9)
    assert pooled.mean == pytest.approx((-0.04 + 0.68) / 2, abs=1e-6)  # equal pair counts
    assert pooled.frac_negative == 0.5 and pooled.pairs == 6
    assert float(np.sum(pooled.density * np.diff(pooled.edges))) == pytest.approx(1.0)
    positive = histogram_of(merge_reports([one, two]), "positive")  # similarities 0.6 and 0.96
    assert positive.mean == pytest.approx(0.78, abs=1e-6) and positive.frac_negative == 0.0


def test_margin_panels_draw_and_refuse_bad_reports(tmp_path):
    report = margin_report(batch_margins(*_features(MIXED), batch_size=3), batch_size=3)
    path = plot_margin_panels(tmp_path / "panels.png", [MarginPanel("T=0.01", report, 0.01),
                                                         MarginPanel("learned", report)], "margins")
    assert path.stat().st_size > 5000
    broken = {**report, "i2t": {**report["i2t"], "counts": [1, 2, 3]}}
    with pytest.raises(ValueError, match="expected 160 bins"):
        histogram_of(broken)
    with pytest.raises(ValueError, match="no panels"):
        plot_margin_panels(tmp_path / "none.png", [], "margins")


# ---------------------------------------------------------------- the real-data setting: naming and report


def test_flatten_results_names_each_number():
    tasks = [EvalTask("zeroshot", dataset="emoji"), EvalTask("retrieval", dataset="openclipart"),
             EvalTask("linear-probe", dataset="fashion-mnist", limit=100),
             EvalTask("margins", dataset="/data/x/pairs.csv")]  # fmt: skip
    results = {
        "zeroshot/emoji": {"acc1": 0.5, "mean_per_class_recall": 0.25, "acc5": 0.9},
        "retrieval/openclipart": {"text_retrieval_recall@1": 0.1, "image_retrieval_recall@1": 0.2,
                                  "text_retrieval_recall@5": 0.3, "image_retrieval_recall@5": 0.4},
        "linear-probe/fashion-mnist": {"acc1": 0.7, "C": 3.0},
        "margins//data/x/pairs.csv": {"i2t": {"mean": -0.125}, "t2i": {"mean": 0.5}},
    }  # fmt: skip
    assert flatten_results(tasks, results) == {
        "zeroshot_emoji_top1": 0.5, "zeroshot_emoji_mpcr": 0.25,
        "retrieval_openclipart_i2t_r1": 0.1, "retrieval_openclipart_t2i_r1": 0.2,
        "retrieval_openclipart_i2t_r5": 0.3, "retrieval_openclipart_t2i_r5": 0.4,
        "probe_fashion-mnist_top1": 0.7, "margin_pairs_i2t": -0.125, "margin_pairs_t2i": 0.5,
    }  # fmt: skip
    assert [c[0] for c in real_columns(tasks)] == list(flatten_results(tasks, results))


REAL = {
    "seeds": [0, 1, 2], "baseline": "clip", "model": "RN-Tiny-64",
    "train": {"steps": 2, "data": {"source": "offline", "datasets": ["emoji"]}},
    "eval": {"tasks": [{"task": "zeroshot", "dataset": "emoji"}, {"task": "retrieval", "dataset": "emoji"}]},
    "claims": [{"id": "z", "text": "R raises zero-shot", "metric": "zeroshot_emoji_mpcr", "sign": 1,
                "prefixes": ["r-"]}],
    "variants": [{"id": "clip", "name": "CLIP", "groups": ["real"]},
                 {"id": "r-mean", "name": "R mean", "groups": ["real"], "set": {"loss.margin_form": "mean"}}],
}  # fmt: skip


@pytest.mark.parametrize(("change", "message"), [
    ({"claims": [{"id": "z", "text": "t", "metric": "zeroshot_seen_top1", "variants": ["r-mean"]}]},
     "'zeroshot_seen_top1' is not one of"),
    ({"eval": {"tasks": [{"task": "robustness", "dataset": "emoji"}]}}, "a study cell flattens"),
    ({"eval": {"tasks": [{"task": "zeroshot", "dataset": "emoji", "split": "train"}]}}, "held-out images"),
    ({"eval": {"tasks": [{"task": "zeroshot", "dataset": "emoji"}, {"task": "zeroshot", "dataset": "emoji",
                                                                     "split": "val"}]}}, "give one a `name`"),
])  # fmt: skip
def test_bad_real_study_is_a_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        build_study({**REAL, **change})


def test_real_report_pairs_the_tasks_metrics_by_seed():
    study = build_study(REAL)
    synthetic = build_study({**REAL, "eval": {}, "claims": [], "train": {"steps": 2}})
    assert expand_cells(study, "m.json")[0].fingerprint() != expand_cells(synthetic, "m.json")[0].fingerprint()
    keys = [c[0] for c in real_columns(study.eval.tasks)]
    records = {}
    for seed, (base, reg) in enumerate(((0.30, 0.35), (0.20, 0.26), (0.25, 0.29))):
        for variant, value in (("clip", base), ("r-mean", reg)):
            metrics = dict.fromkeys(keys, value) | {"temperature": 0.05, "steps_trained": 2.0}
            records[f"{variant}--seed{seed}"] = {"variant": variant, "seed": seed, "metrics": metrics}
    summary = summarise(study, records)
    diff = summary["variants"][1]["vs_baseline"]["zeroshot_emoji_mpcr"]
    assert diff["values"] == pytest.approx([0.05, 0.06, 0.04])
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd 0.01 / sqrt(3), by hand
    assert diff["ci95"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-6)
    assert summary["claims"][0]["rows"][0]["verdict"] == "agrees"  # [0.025, 0.075] lies above 0
    text = markdown_tables(summary, ["real"])
    assert "| variant | n | emoji zero-shot % | emoji zero-shot mean per-class recall % | emoji R@1 i→t % |" in text
    assert "| R mean | 3 | 30.0 ± 4.6 | 30.0 ± 4.6 |" in text  # 35, 26, 29 percent
    assert "| R mean | 3 | +5.0 ± 1.0 | +5.0 ± 1.0 |" in text  # paired differences 5, 6, 4 points


# ---------------------------------------------------------------- the real-data setting: a cell end to end

TINY_RESNET = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None, "heads": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train and 8 test images (solid colours with a darker square), two labels; a test image with two
    captions."""
    folder = tmp_path_factory.mktemp("manifest")
    rows = []
    for i in range(20):
        colour = ((47 * i) % 256, (101 * i + 30) % 256, (23 * i + 60) % 256)
        image = Image.new("RGB", (40, 36), colour)
        image.paste(tuple(c // 3 for c in colour), (2 * i % 24, i % 20, 2 * i % 24 + 12, i % 20 + 12))
        image.save(folder / f"im{i}.png")
        split, label = ("test" if i % 5 in (1, 3) else "train"), ("warm" if i % 2 else "cold")
        rows.append((f"im{i}.png", f"swatch {i} in {label} tones", split, label))
        if i == 1:
            rows.append((f"im{i}.png", "the first test swatch", split, label))
    return write_pairs_csv(folder, rows)


@torch.no_grad()
def _naive(model: torch.nn.Module, manifest: Path) -> dict[str, float]:
    """Zero-shot top-1, retrieval R@1 and R@5 both ways, and the mean image→text margin on the test rows, one
    image or caption at a time."""
    tokenizer = BPETokenizer(context_length=model.context_length)
    transform = model_preprocess(model).eval_transform()
    rows = [r for r in csv.DictReader(manifest.open()) if r["split"] == "test"]
    names = list(dict.fromkeys(r["image"] for r in rows))
    images = torch.cat([F.normalize(model.encode_image(transform(Image.open(manifest.parent / n))[None]), dim=-1)
                        for n in names])  # [I, D]
    texts = torch.cat([F.normalize(model.encode_text(tokenizer([r["caption"]])), dim=-1) for r in rows])  # [T, D]
    owner = torch.tensor([names.index(r["image"]) for r in rows])
    out: dict[str, float] = {}
    for k in (1, 5):  # an image is found by any of its captions; a caption by its one image
        hits = sum(i in owner[(images[i] @ texts.t()).topk(k).indices].tolist() for i in range(len(names)))
        out[f"i2t_r{k}"] = hits / len(names)
        hits = sum(int(owner[t]) in (texts[t] @ images.t()).topk(k).indices.tolist() for t in range(len(rows)))
        out[f"t2i_r{k}"] = hits / len(rows)
    # margins: each image with its first caption, in the evaluator's seeded random batches of 4
    first = torch.stack([texts[[r["image"] for r in rows].index(n)] for n in names])  # [I, D]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))
    margins = []
    for batch in order.view(-1, 4).tolist():
        for i in batch:
            negatives = max(float(images[i] @ first[j]) for j in batch if j != i)
            margins.append(float(images[i] @ first[i]) - negatives)
    out["margin_i2t"] = sum(margins) / len(margins)
    classes = sorted({r["label"] for r in rows})
    templates = load_templates("imagenet-simple")
    weights = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])),
                                                   dim=-1).mean(dim=0), dim=-1) for c in classes])  # [C, D]
    labels = {r["image"]: classes.index(r["label"]) for r in rows}
    out["top1"] = sum(int((weights @ images[i]).argmax()) == labels[n] for i, n in enumerate(names)) / len(names)
    return out


def test_a_real_setting_cell_matches_a_naive_evaluation(manifest: Path, tmp_path: Path) -> None:
    study = {
        "seeds": [0], "baseline": "clip", "model": TINY_RESNET,
        "train": {"steps": 20, "batch_size": 6, "precision": "fp32", "log_every": 10,
                  "optim": {"lr": 5e-3, "warmup_steps": 2},
                  "data": {"source": "manifest", "path": str(manifest), "split": "train", "num_workers": 0}},
        "eval": {"keep_models": True, "tasks": [
            {"task": "zeroshot", "dataset": str(manifest), "templates": "imagenet-simple"},
            {"task": "retrieval", "dataset": str(manifest)},
            {"task": "margins", "dataset": str(manifest), "batch_size": 4}]},
        "variants": [{"id": "clip", "name": "CLIP", "groups": ["real"]},
                     {"id": "r-mean", "name": "R mean", "groups": ["real"], "set": {"loss.margin_form": "mean"}}],
    }  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study, sort_keys=False))
    outcome = run_study(config, tmp_path / "out", log=lambda _: None, threads=1)
    assert not outcome.failed and sorted(outcome.ran) == ["clip--seed0", "r-mean--seed0"]
    for cell in ("clip--seed0", "r-mean--seed0"):
        record = json.loads((tmp_path / "out" / "cells" / f"{cell}.json").read_text())
        metrics = record["metrics"]
        model, _ = resolve_model(str(tmp_path / "out" / "runs" / cell))
        naive = _naive(model, manifest)
        assert metrics["zeroshot_pairs_top1"] == pytest.approx(naive["top1"], abs=1e-6)
        for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
            assert metrics[f"retrieval_pairs_{key}"] == pytest.approx(naive[key], abs=1e-6)
        # a continuous number: checks which image goes with which caption, batch by batch (float32 sums)
        assert metrics["margin_pairs_i2t"] == pytest.approx(naive["margin_i2t"], abs=1e-5)
        assert metrics["steps_trained"] == 20
        assert metrics["temperature"] == pytest.approx(float(1 / model.logit_scale.detach().exp()), rel=1e-6)
        assert record["margins"] is None  # histograms are the synthetic setting's
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "zeroshot_pairs_top1" in summary["variants"][1]["vs_baseline"]
    assert (tmp_path / "out" / "figures" / "study-real.png").is_file()


def test_study_threads_option_is_checked(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(REAL, sort_keys=False))
    from clipforge.cli import main

    assert main(["study", str(config), "--threads", "0", "--report-only"]) == 2
    assert "--threads: expected at least 1, got 0" in capsys.readouterr().err
