"""Strict config loading: unknown keys, wrong types and impossible values name the key."""

from dataclasses import replace

import pytest

from clipforge.config import ConfigError
from clipforge.registry import get_model_config
from clipforge.train.config import load_train_config
from clipforge.train.schedule import lr_at


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.01\n")
    cfg = load_train_config(path, ["--batch_size=16", "--data.synthetic.caption_noise=0.2"])
    assert cfg.steps == 7 and cfg.optim.lr == 0.01 and cfg.batch_size == 16
    assert cfg.data.synthetic.caption_noise == 0.2


@pytest.mark.parametrize("override,match", [
    ("--optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("--optim.lr=-1", "'optim.lr'"),
    ("--steps=abc", "'steps': expected an integer"),
    ("--batch_size=1", "'batch_size'"),
    ("--precision=fp16", "'precision': expected one of"),
    ("--data.source=manifest", "'data.path'"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [override])


def test_fixed_length_tuples_convert_each_item_to_its_own_type(tmp_path):
    from dataclasses import dataclass

    from clipforge.config import from_dict

    @dataclass(frozen=True)
    class Pair:
        span: tuple[float, int] = (0.0, 0)

    assert from_dict(Pair, {"span": [3, 4]}).span == (3.0, 4)
    with pytest.raises(ConfigError, match=r"'span\[1\]': expected an integer"):
        from_dict(Pair, {"span": [3, "x"]})
    with pytest.raises(ConfigError, match="'span': expected 2 items"):
        from_dict(Pair, {"span": [3]})
    cfg = load_train_config(None, ["--data.synthetic.train_background_grey=[20, 235]"])
    assert cfg.data.synthetic.train_background_grey == (20.0, 235.0)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_train_config(tmp_path / "nope.yaml")


def test_unknown_model_and_bad_model_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'ViT-Q-99'"):
        get_model_config("ViT-Q-99")
    bad = tmp_path / "m.json"
    bad.write_text('{"embed_dim": 8, "vision_cfg": {"widht": 3}}')
    with pytest.raises(ConfigError, match="vision_cfg.widht"):
        get_model_config(bad)


def test_lr_schedule_hand_values():
    # warm-up: linear from base/warmup to base
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)
    # cosine: half-way through the decay is half the base lr; the end is min_lr
    assert lr_at(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, 2.0, 100, 0, schedule="constant") == 2.0


def test_scientific_notation_override_is_a_number():
    cfg = load_train_config(None, ["--optim.lr=2e-3"])
    assert cfg.optim.lr == pytest.approx(0.002)


def test_demo_config_file_restates_the_demo_recipe():
    from pathlib import Path

    from clipforge.demo import demo_config
    from clipforge.train.config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_train_config(path) == demo_config()
    # the recipe differs from the trainer's defaults in the weight decay alone
    assert demo_config() == replace(TrainConfig(), optim=replace(TrainConfig().optim, weight_decay=3.0))
    # a config file replaces the recipe; overrides win over both
    assert demo_config(path, ["--optim.weight_decay=0.5"]).optim.weight_decay == 0.5
    assert demo_config(None, ["--optim.weight_decay=0.5"]).optim.weight_decay == 0.5
