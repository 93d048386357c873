"""The study's verdicts: paired t intervals against table values, verdicts on toy data with a known answer,
and claims judged in a study summary."""

from __future__ import annotations

import math

import pytest

from clipforge.config import ConfigError
from clipforge.study import build_study
from clipforge.study.report import markdown_tables, summarise
from clipforge.study.stats import paired_t_interval, verdict

from test_study import fake_record, study_dict

# Student t quantiles t_{0.975, df} from printed tables (df = 2, 4).
T975 = {2: 4.302653, 4: 2.776445}


def test_interval_matches_the_t_table():
    ci = paired_t_interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1
    half = T975[2] / math.sqrt(3)
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.low == pytest.approx(2.0 - half, abs=1e-5) and ci.high == pytest.approx(2.0 + half, abs=1e-5)
    ci = paired_t_interval([0.5, 0.7, 0.6, 0.4, 0.8])  # mean 0.6, sd sqrt(0.1 / 4)
    half = T975[4] * math.sqrt(0.025) / math.sqrt(5)
    assert (ci.low, ci.high) == (pytest.approx(0.6 - half, abs=1e-6), pytest.approx(0.6 + half, abs=1e-6))


def test_verdicts_on_known_cases():
    clearly_up = paired_t_interval([0.5, 0.7, 0.6, 0.4, 0.8])  # [0.404, 0.796]
    assert verdict(clearly_up, +1) == "agrees" and verdict(clearly_up, -1) == "disagrees"
    straddles = paired_t_interval([-1.0, 1.0, 0.5])
    assert verdict(straddles, +1) == "inconclusive" and verdict(straddles, -1) == "inconclusive"
    one_seed = paired_t_interval([5.0])
    assert math.isinf(one_seed.low) and verdict(one_seed, +1) == "inconclusive"
    two_seeds = paired_t_interval([3.7, 3.9])  # interval [2.53, 5.07] excludes 0, but 2 seeds carry no verdict
    assert two_seeds.low > 0 and verdict(two_seeds, +1) == "inconclusive"
    # Same mean, too few seeds for the spread: the interval [2 - 2.48, 2 + 2.48] contains 0.
    assert verdict(paired_t_interval([1.0, 2.0, 3.0]), +1) == "inconclusive"
    assert verdict(paired_t_interval([1.9, 2.0, 2.1]), +1) == "agrees"
    with pytest.raises(ValueError):
        verdict(clearly_up, 0)


CLAIMS = [{"id": "r-margin", "text": "R raises the margin", "metric": "margin_i2t", "sign": 1, "prefixes": ["reg-"]},
          {"id": "r-probe", "text": "R raises the probe", "metric": "probe_top1", "variants": ["reg-0.5"]}]


def test_claims_in_a_summary():
    study = build_study(study_dict(seeds=[0, 1, 2], claims=CLAIMS))
    keys = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "probe_top1", "margin_i2t",
            "margin_t2i", "positive_similarity")
    records = {}
    for s in range(3):
        records[f"clip--seed{s}"] = fake_record("clip", s, **dict.fromkeys(keys, 0.1 * s))
        reg = dict.fromkeys(keys, 0.1 * s)
        reg["margin_i2t"] += (0.019, 0.020, 0.021)[s]  # a consistent rise: the interval excludes 0
        reg["probe_top1"] += (0.05, -0.05, 0.01)[s]  # noise around 0
        records[f"reg-0.5--seed{s}"] = fake_record("reg-0.5", s, **reg)
    summary = summarise(study, records)
    margin, probe = summary["claims"]
    assert [(r["variant"], r["verdict"]) for r in margin["rows"]] == [("reg-0.5", "agrees")]
    assert probe["rows"][0]["verdict"] == "inconclusive" and probe["rows"][0]["n"] == 3
    low, high = margin["rows"][0]["ci95"]
    assert low == pytest.approx(0.02 - T975[2] * 0.001 / math.sqrt(3), abs=1e-6) and high > 0.02
    text = markdown_tables(summary, ["objective"])
    assert "### claim `r-margin`: R raises the margin" in text
    assert "| CLIP + R λ=0.5 | 3 | +0.020 | [+0.018, +0.022] | agrees |" in text


@pytest.mark.parametrize("claim, message", [
    ({"id": "x", "text": "t", "metric": "nope", "prefixes": ["reg-"]}, "metric"),
    ({"id": "x", "text": "t", "metric": "probe_top1", "variants": ["ghost"]}, "ghost"),
    ({"id": "x", "text": "t", "metric": "probe_top1", "prefixes": ["ghost-"]}, "matches no variant"),
    ({"id": "x", "text": "t", "metric": "probe_top1", "sign": 0, "prefixes": ["reg-"]}, "sign"),
])
def test_bad_claims_are_clear_errors(claim, message):
    with pytest.raises(ConfigError, match=message):
        build_study(study_dict(claims=[claim]))
