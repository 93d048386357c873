"""The study: grid expansion, resumability, the report's arithmetic, the CLI, and the CI study's effects."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.study import build_study, expand_cells, load_study, run_study
from clipforge.study import runner as study_runner
from clipforge.study.report import markdown_tables, mean_std, summarise

ROOT = Path(__file__).resolve().parents[1]

# A tiny ResNet CLIP at 32 px: a few seconds per cell, only for plumbing tests.
TINY_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None, "heads": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TINY = {
    "seeds": [0],
    "baseline": "clip",
    "model": TINY_MODEL,
    "train": {"steps": 2, "batch_size": 8, "precision": "fp32", "log_every": 1,
              "data": {"num_workers": 0, "synthetic": {"image_size": 32}}},
    "eval": {"zeroshot_per_class": 1, "retrieval_pairs": 16, "margin_pairs": 16, "margin_batch_size": 8,
             "probe_train_per_class": 1, "probe_test_per_class": 1, "probe_C": 1.0},
    "variants": [
        {"id": "clip", "name": "CLIP", "groups": ["objective"]},
        {"id": "reg-{loss.margin_lambda}", "name": "CLIP + R λ={loss.margin_lambda}", "groups": ["objective"],
         "set": {"loss.margin_form": "mean"}, "sweep": {"loss.margin_lambda": [0.5]}},
    ],
}  # fmt: skip


def study_dict(**changes) -> dict:
    data = copy.deepcopy(TINY)
    data.update(changes)
    return data


# ---------------------------------------------------------------- grid expansion


def test_sweeps_expand_to_the_cartesian_product_with_templated_ids():
    data = study_dict(seeds=[3, 7], variants=[
        {"id": "clip"},
        {"id": "r-{loss.margin_form}-{loss.margin_lambda}", "name": "{loss.margin_form} λ={loss.margin_lambda}",
         "groups": ["reg"], "sweep": {"loss.margin_form": ["mean", "hinge"], "loss.margin_lambda": [0.1, 1.0, 3.0]}},
    ])  # fmt: skip
    study = build_study(data)
    ids = [v.id for v in study.variants]
    assert ids == ["clip", "r-mean-0.1", "r-mean-1.0", "r-mean-3.0", "r-hinge-0.1", "r-hinge-1.0", "r-hinge-3.0"]
    assert study.variant("r-hinge-3.0").name == "hinge λ=3.0"
    assert study.variant("clip").name == "clip"  # the id when no name is given
    cells = expand_cells(study, "model.json", "out")
    assert len(cells) == 7 * 2
    assert [c.id for c in cells[:3]] == ["clip--seed3", "clip--seed7", "r-mean-0.1--seed3"]  # variant-major
    by_seed = expand_cells(build_study({**data, "order": "seeds"}), "model.json")
    assert [c.seed for c in by_seed[:7]] == [3] * 7  # seed-major: a partial study has whole seeds
    first = expand_cells(build_study({**data, "run_first": ["r-hinge-1.0", "clip"]}), "model.json")
    assert [c.id for c in first[:5]] == ["r-hinge-1.0--seed3", "r-hinge-1.0--seed7", "clip--seed3", "clip--seed7",
                                         "r-mean-0.1--seed3"]  # fmt: skip
    assert sorted(c.id for c in first) == sorted(c.id for c in cells)
    cell = next(c for c in cells if c.id == "r-hinge-3.0--seed7")
    assert cell.train.loss.margin_form == "hinge" and cell.train.loss.margin_lambda == 3.0
    assert cell.train.seed == 7 and cell.train.data.synthetic.seed == 7
    assert cell.train.run_name == "r-hinge-3.0--seed7" and cell.train.output_dir == "out"
    assert cell.train.steps == 2  # from the base train config
    assert study.groups() == ["reg"]


def test_fingerprint_follows_the_cell_not_its_paths():
    study = build_study(study_dict())
    a = expand_cells(study, "one/model.json", "one/runs")
    b = expand_cells(study, "two/model.json", "two/runs")
    assert [c.fingerprint() for c in a] == [c.fingerprint() for c in b]
    assert len({c.fingerprint() for c in a}) == len(a)
    other = expand_cells(build_study(study_dict(train={**TINY["train"], "steps": 3})), "m.json")
    assert other[0].fingerprint() != a[0].fingerprint()


def test_a_neutral_new_option_keeps_finished_cells_and_a_set_one_reruns_them():
    cell = expand_cells(build_study(study_dict()), "m.json")[0]
    frozen = expand_cells(build_study(study_dict(train={**TINY["train"], "finetune": {"freeze_bn_stats": True}})),
                          "m.json")[0]
    assert cell.train.finetune.freeze_bn_stats is False
    assert frozen.fingerprint() != cell.fingerprint()


@pytest.mark.parametrize("config, results", [("study-reduced.yaml", "study-reduced"), ("study-real.yaml", "study-real"),
                                             ("study.yaml", "study-full"), ("study-converged.yaml", "study-converged"),
                                             ("study-real-long.yaml", "study-real-long"),
                                             ("study-real-budget.yaml", "study-real-budget"),
                                             ("study-real-fixedt.yaml", "study-real-fixedt"),
                                             ("study-real-recall.yaml", "study-real-recall"),
                                             ("study-real-fixedt-p10.yaml", "study-real-fixedt-p10"),
                                             ("study-real-recall-p6.yaml", "study-real-recall-p6"),
                                             ("study-converged-wd3.yaml", "study-converged-wd3"),
                                             ("study-heldout24.yaml", "study-heldout24"),
                                             ("study-heldout24-margin.yaml", "study-heldout24-margin"),
                                             ("study-real-budget-cpu-check.yaml", "study-real-budget-cpu-check")])
def test_the_committed_study_results_still_describe_the_shipped_configs(config, results):
    """docs/ holds finished cells; a code change that silently alters their fingerprints (a new option hashed at
    its default) would make `clipforge study` retrain them all and the committed tables unreproducible."""
    cells = expand_cells(load_study(ROOT / "configs" / config), "model.json")
    stored = {p.stem: json.loads(p.read_text()) for p in (ROOT / "docs" / results / "cells").glob("*.json")}
    assert stored and set(stored) <= {c.id for c in cells}
    mismatched = [c.id for c in cells if c.id in stored and stored[c.id]["fingerprint"] != c.fingerprint()]
    assert not mismatched


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": [{"id": "a"}, {"id": "a"}]}, "occurs twice"),
        ({"variants": [{"id": "a", "set": {"loss.nmae": "square"}}]}, "loss.nmae"),
        ({"variants": [{"id": "a", "set": {"loss.name": "hinge"}}]}, "loss.name"),
        ({"variants": [{"id": "a-{batch_size}"}]}, "placeholder '{batch_size}'"),
        ({"variants": [{"id": "a", "sweep": {"batch_size": 8}}]}, "non-empty list"),
        ({"variants": [{"id": "a b"}]}, "file name"),
        ({"baseline": "nope"}, "'baseline'"),
        ({"run_first": ["clip", "nope"]}, "'run_first'"),
        ({"seeds": []}, "'seeds'"),
        ({"extra_seeds": {"nope": [3]}}, "'extra_seeds.nope'.*not a variant id"),
        ({"extra_seeds": {"clip": [0]}}, "seed 0 is already one of the study's seeds"),
        ({"extra_seeds": {"clip": []}}, "non-empty list of distinct integers"),
        ({"extra_seeds": {"clip": [3, 3]}}, "non-empty list of distinct integers"),
        ({"extra_seeds": {"clip": 3}}, "non-empty list of distinct integers"),
        ({"baseline": "clip", "extra_seeds": {"reg-0.5": [3, 4], "clip": [3]}}, "seed 4 has no baseline cell"),
        ({"variants": [{"id": "a", "set": {"data.synthetic.image_size": 64}}]}, "image size 32"),
        ({"eval": {"margin_pairs": 4, "margin_batch_size": 8}}, "margin_pairs"),
        ({"wat": 1}, "wat"),
    ],
)
def test_bad_study_is_a_clear_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_study(study_dict(**{"baseline": None, **changes}))


def test_extra_seeds_run_after_the_study_and_pair_with_the_baseline():
    study = build_study(study_dict(seeds=[0, 1, 2], extra_seeds={"clip": [3, 4], "reg-0.5": [4]}))
    cells = expand_cells(study, "model.json")
    assert [c.id for c in cells] == ["clip--seed0", "clip--seed1", "clip--seed2", "reg-0.5--seed0", "reg-0.5--seed1",
                                     "reg-0.5--seed2", "clip--seed3", "clip--seed4", "reg-0.5--seed4"]  # fmt: skip
    assert cells[-1].train.seed == 4 and cells[-1].train.data.synthetic.seed == 4
    assert study.seeds_of("reg-0.5") == (0, 1, 2, 4) and study.cell_count() == 9
    # Differences are paired over the seeds both variants finished: 0, 1, 2 and 4, not the baseline's seed 3.
    records = {f"clip--seed{s}": fake_record("clip", s, margin_i2t=0.1 * s) for s in range(5)}
    records |= {f"reg-0.5--seed{s}": fake_record("reg-0.5", s, margin_i2t=0.1 * s + 0.01 * s) for s in (0, 1, 2, 4)}
    summary = summarise(study, records)
    diff = summary["variants"][1]["vs_baseline"]["margin_i2t"]
    assert diff["n"] == 4 and diff["values"] == pytest.approx([0.0, 0.01, 0.02, 0.04])
    assert summary["cells_finished"] == 9 and summary["cells_total"] == 9


def test_the_shipped_studies_load():
    default = load_study(ROOT / "configs" / "study.yaml")
    ids = {v.id for v in default.variants}
    assert {"clip", "square", "siglip", "cyclip", "fixed-T0.01", "fixed-T0.2"} <= ids
    forms = {v.overrides.get("loss.margin_form") for v in default.variants} - {None}
    assert forms == {"mean", "squared", "mean-scaled", "squared-scaled", "hinge"}
    for form in forms:  # each form with its own λ sweep
        assert len({v.overrides["loss.margin_lambda"] for v in default.variants
                    if v.overrides.get("loss.margin_form") == form}) >= 3
    assert len(default.seeds) >= 3 and default.claims
    converged = load_study(ROOT / "configs" / "study-converged.yaml")
    assert converged.model_config["vision_cfg"]["image_size"] == 64 and len(converged.seeds) >= 3
    for study in (default, converged):
        cell = expand_cells(study, "model.json")[0]
        assert cell.train.early_stop.patience is not None  # trained to convergence (or the budget)
    ci = load_study(ROOT / "configs" / "study-ci.yaml")
    assert len(ci.seeds) >= 3 and {"clip", "square"} <= {v.id for v in ci.variants}


# ---------------------------------------------------------------- running and resuming


def write_study(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_run_resume_and_rerun_only_what_changed(tmp_path, monkeypatch):
    config = write_study(tmp_path, TINY)
    out = tmp_path / "out"
    first = run_study(config, out, jobs=1, threads=1, log=lambda _: None)
    assert sorted(first.ran) == ["clip--seed0", "reg-0.5--seed0"] and not first.failed
    record = json.loads((out / "cells" / "clip--seed0.json").read_text())
    for key in ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "probe_top1", "margin_i2t",
                "margin_t2i", "positive_similarity", "temperature"):  # fmt: skip
        assert math.isfinite(record["metrics"][key])
    assert record["final_log"]["step"] == 2 and record["cpu_seconds"] > 0
    from clipforge.speed import cpu_description

    assert record["machine"] == {"cpu": cpu_description(), "torch": torch.__version__, "threads": 1}
    # both cells trained through the render cache; once every cell finished, it is gone
    assert record["config"]["data"]["render_cache"] == str(out / "runs" / "render-cache")
    assert not (out / "runs" / "render-cache").exists()
    assert "margin" in json.loads((out / "cells" / "reg-0.5--seed0.json").read_text())["final_log"]
    assert (out / "runs" / "clip--seed0" / "margins.png").is_file()
    assert not (out / "runs" / "clip--seed0" / "model.safetensors").exists()  # keep_models is off
    assert (out / "results.md").is_file() and (out / "figures" / "study-margins-objective.png").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(study_runner, "run_cell", must_not_run)
    second = run_study(config, out, jobs=1, threads=1, log=lambda _: None)
    assert second.ran == [] and sorted(second.skipped) == ["clip--seed0", "reg-0.5--seed0"]
    assert second.summary["cells_finished"] == 2

    # Changing one variant's settings reruns that cell only; a missing file is rerun too.
    monkeypatch.undo()
    changed = copy.deepcopy(TINY)
    changed["variants"][1]["sweep"] = {"loss.margin_lambda": [0.5]}
    changed["variants"][1]["set"] = {"loss.margin_form": "hinge"}
    third = run_study(write_study(tmp_path, changed), out, jobs=1, threads=1, log=lambda _: None)
    assert third.ran == ["reg-0.5--seed0"] and third.skipped == ["clip--seed0"]


def test_the_render_cache_changes_no_result(tmp_path):
    config = write_study(tmp_path, TINY)
    cached = run_study(config, tmp_path / "cached", jobs=1, threads=1, log=lambda _: None)
    plain = run_study(config, tmp_path / "plain", jobs=1, threads=1, log=lambda _: None, render_cache=False)
    assert sorted(cached.ran) == sorted(plain.ran) == ["clip--seed0", "reg-0.5--seed0"]
    for cell in plain.ran:
        a, b = (json.loads((tmp_path / d / "cells" / f"{cell}.json").read_text()) for d in ("cached", "plain"))
        untimed = [{k: v for k, v in r["metrics"].items() if not k.endswith("_seconds")} for r in (a, b)]
        assert a["fingerprint"] == b["fingerprint"] and untimed[0] == untimed[1] and a["margins"] == b["margins"]
        assert "render_cache" not in b["config"]["data"] or b["config"]["data"]["render_cache"] is None


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    real = study_runner.run_cell

    def flaky(cell, *args, **kwargs):
        if cell.variant.id == "clip":
            raise RuntimeError("boom")
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(study_runner, "run_cell", flaky)
    outcome = run_study(write_study(tmp_path, TINY), tmp_path / "out", jobs=1, threads=1, log=lambda _: None)
    assert outcome.failed == {"clip--seed0": "RuntimeError: boom"}
    assert outcome.ran == ["reg-0.5--seed0"]
    assert not (tmp_path / "out" / "cells" / "clip--seed0.json").exists()
    assert any((tmp_path / "out" / "runs" / "render-cache").rglob("*.npz"))  # kept for the rerun of clip


def test_cli_study_then_report_only(tmp_path, capsys):
    config = write_study(tmp_path, study_dict(variants=[TINY["variants"][0]]))
    out = tmp_path / "out"
    assert main(["study", str(config), "--output-dir", str(out), "--figures-dir", str(tmp_path / "fig")]) == 0
    assert (out / "results.md").is_file()
    assert not (tmp_path / "fig" / "study-objective.png").exists()  # one variant: nothing to compare yet
    assert main(["study", str(config), "--output-dir", str(out), "--report-only", "--output",
                 str(tmp_path / "summary.json")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells_finished"] == 1 and summary["variants"][0]["seeds"] == [0]
    assert "1 already finished, 0 to run" in capsys.readouterr().out
    assert main(["study", str(config), "--jobs", "0"]) == 2
    assert main(["study", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- report arithmetic


def fake_record(variant: str, seed: int, **metrics: float) -> dict:
    return {"variant": variant, "seed": seed, "metrics": metrics}


def test_summary_means_stds_and_paired_differences():
    study = build_study(study_dict(seeds=[0, 1, 2]))
    keys = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "probe_top1", "margin_i2t",
            "margin_t2i", "positive_similarity")  # fmt: skip
    base = {s: dict.fromkeys(keys, 0.1 * (s + 1)) for s in range(3)}  # 0.1, 0.2, 0.3
    reg = {s: dict.fromkeys(keys, 0.1 * (s + 1) + d) for s, d in zip(range(2), (0.05, 0.15))}  # seed 2 missing
    records = {f"clip--seed{s}": fake_record("clip", s, **m) for s, m in base.items()}
    records |= {f"reg-0.5--seed{s}": fake_record("reg-0.5", s, **m) for s, m in reg.items()}
    summary = summarise(study, records)
    clip, r = summary["variants"]
    assert clip["metrics"]["probe_top1"]["mean"] == pytest.approx(0.2)
    assert clip["metrics"]["probe_top1"]["std"] == pytest.approx(0.1)  # sample std of 0.1, 0.2, 0.3
    assert r["seeds"] == [0, 1]
    diff = r["vs_baseline"]["margin_i2t"]
    assert diff["mean"] == pytest.approx(0.1) and diff["n"] == 2
    assert diff["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # differences 0.05 and 0.15
    assert summary["cells_finished"] == 5 and summary["cells_total"] == 6
    text = markdown_tables(summary, ["objective"])
    assert "| CLIP | 3 | 20.0 ± 10.0 |" in text
    # the baseline again over the seeds the variant ran (0.1, 0.2): a row comparable with the variant's
    assert "| CLIP, seeds 0, 1 only | 2 | 15.0 ± 7.1 |" in text
    assert clip["on_seeds"][0]["seeds"] == [0, 1] and r.get("on_seeds") is None
    assert "| CLIP + R λ=0.5 | 2 | +10.0 ± 7.1 |" in text
    assert mean_std([2.0]) == {"mean": 2.0, "std": 0.0, "n": 1}


# ---------------------------------------------------------------- trainer hooks the study relies on


def test_prepare_model_sets_up_siglip_and_freezes_an_unused_temperature():
    from clipforge.train.config import load_train_config
    from clipforge.train.setup import prepare_model

    base = [f"--model={ROOT / 'src/clipforge/model_configs/ViT-Micro-8-32.json'}"]
    siglip = prepare_model(load_train_config(None, base + ["--loss.name=siglip"]), torch.device("cpu"))
    assert siglip.logit_bias is not None and float(siglip.logit_bias.detach()) == -10.0
    assert float(siglip.logit_scale.detach().exp()) == pytest.approx(10.0)
    assert siglip.config.init_logit_bias == -10.0 and siglip.logit_scale.requires_grad
    assert "logit_bias" in dict(siglip.named_parameters())
    square = prepare_model(load_train_config(None, base + ["--loss.name=square"]), torch.device("cpu"))
    assert not square.logit_scale.requires_grad and square.logit_bias is None
    clip = prepare_model(load_train_config(None, base), torch.device("cpu"))
    assert clip.logit_scale.requires_grad and clip.logit_bias is None


# ---------------------------------------------------------------- the CI study: robust effects


@pytest.mark.slow
def test_ci_study_shows_the_robust_effects(tmp_path):
    """configs/study-ci.yaml, 3 seeds: the square loss is far below CLIP at zero-shot, and the margin
    regularizer raises the mean positive similarity. Compared per seed (same data and initialisation)."""
    outcome = run_study(ROOT / "configs" / "study-ci.yaml", tmp_path / "ci", jobs=2, log=print)
    assert not outcome.failed
    assert outcome.stopped is None, f"a {outcome.stopped} stopped the study; cells left: {outcome.interrupted}"
    cells = {}
    for path in (tmp_path / "ci" / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        cells[(record["variant"], record["seed"])] = record["metrics"]
    seeds = sorted({seed for _, seed in cells})
    assert len(seeds) >= 3
    gaps = [cells[("clip", s)]["zeroshot_seen_top1"] - cells[("square", s)]["zeroshot_seen_top1"] for s in seeds]
    assert min(gaps) > 0.03 and sum(gaps) / len(gaps) > 0.05, gaps
    lifts = [cells[("clip-rmean-1", s)]["positive_similarity"] - cells[("clip", s)]["positive_similarity"]
             for s in seeds]  # fmt: skip
    assert min(lifts) > 0.1, lifts
