"""Plateau stopping: the rule on toy validation curves whose stopping step is known, and in a tiny run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from clipforge.config import ConfigError
from clipforge.losses import clip_loss
from clipforge.train.config import load_train_config
from clipforge.train.early_stop import PlateauStopper, validation_batches, validation_loss
from clipforge.train import loop
from clipforge.train.loop import train

from run_helpers import events, tiny_args

# A validation curve measured every 10 steps: falls, flattens around 2.4, then rises (over-fitting).
CURVE = [5.0, 4.0, 3.0, 2.5, 2.4, 2.41, 2.39, 2.45, 2.5, 2.6, 2.7]


def _first_stop(stopper: PlateauStopper, curve: list[float], every: int = 10) -> int | None:
    for k, value in enumerate(curve, start=1):
        if stopper.observe(k * every, value):
            return k * every
    return None


def test_plateau_with_min_delta():
    """min_delta 0.02: 2.39 at step 70 is not 0.02 below 2.40, so steps 60, 70, 80 are stale: stop at 80."""
    stopper = PlateauStopper(patience=3, min_delta=0.02)
    assert _first_stop(stopper, CURVE) == 80
    assert stopper.state() == {"best_val_loss": 2.4, "best_step": 50, "stopped_step": 80}


def test_plateau_without_min_delta():
    """Any decrease counts: 2.39 at step 70 is the best, then 80, 90, 100 are stale: stop at 100."""
    stopper = PlateauStopper(patience=3)
    assert _first_stop(stopper, CURVE) == 100
    assert (stopper.best, stopper.best_step) == (2.39, 70)


def test_no_stop_while_falling_and_nan_is_stale():
    assert _first_stop(PlateauStopper(patience=2), [3.0, 2.0, 1.0, 0.5]) is None
    stopper = PlateauStopper(patience=2)
    assert _first_stop(stopper, [3.0, math.nan, math.nan]) == 30 and stopper.best_step == 10
    with pytest.raises(ValueError):
        PlateauStopper(patience=0)


def test_config_errors():
    with pytest.raises(ConfigError, match="early_stop.patience"):
        load_train_config(None, ["--early_stop.patience=0"])
    with pytest.raises(ConfigError, match="early_stop.every"):
        load_train_config(None, ["--early_stop.patience=2", "--early_stop.every=0"])


def test_validation_pairs_are_their_own_stream(tmp_path):
    """The validation batches are fixed, differ from the training stream's first batch, and their loss is the
    plain CLIP loss of the model's features."""
    cfg = load_train_config(None, tiny_args(tmp_path, "v", "--early_stop.patience=1", "--early_stop.batches=2"))
    from clipforge import create_model
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.data import build_train_dataset

    tokenizer = get_tokenizer(cfg.model)
    batches = validation_batches(cfg, 32, tokenizer)
    again = validation_batches(cfg, 32, tokenizer)
    assert len(batches) == 2 and all(images.shape == (8, 3, 32, 32) for images, _ in batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    train_set, _ = build_train_dataset(cfg, 32)
    assert not torch.equal(batches[0][0][0], train_set[0][0])
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    with torch.no_grad():
        expected = sum(float(clip_loss(*model(images, tokens))) for images, tokens in batches) / 2
    assert validation_loss(model, batches, torch.device("cpu")) == pytest.approx(expected, rel=1e-6)


def test_training_stops_at_the_known_step(tmp_path):
    """min_delta far above any change: the first validation (step 5) is the best, the next two are stale,
    so the run stops at step 5 + 2 * 5 = 15 of its 40-step budget, and says so in the log and the result."""
    cfg = load_train_config(None, tiny_args(tmp_path, "es", "--steps=40", "--early_stop.patience=2",
                                            "--early_stop.every=5", "--early_stop.min_delta=100",
                                            "--early_stop.batches=1"))
    result = train(cfg, progress=False)
    assert result.steps == 15
    stop = events(result.run_dir, "early_stop")
    assert len(stop) == 1 and stop[0]["step"] == 15 and stop[0]["stopped_step"] == 15
    entries = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    validations = [e for e in entries if "val_loss" in e]
    assert [e["step"] for e in validations] == [5, 10, 15]
    assert result.early_stop == {"best_val_loss": validations[0]["val_loss"], "best_step": 5, "stopped_step": 15}
    assert max(e["step"] for e in entries if "loss" in e) == 15  # no training step after the stop
    assert (result.run_dir / "model.safetensors").is_file()


def test_manifest_validation_split(tmp_path):
    """With a manifest, the validation pairs are the rows of early_stop.split, at the evaluation transform;
    a split smaller than one batch is a one-line config error naming the key."""
    from PIL import Image

    rows = ["image\tcaption\tsplit"]
    for i in range(12):
        name = f"img{i}.png"
        Image.new("RGB", (40, 36), (20 * i, 100, 200 - 10 * i)).save(tmp_path / name)
        rows.append(f"{name}\tpicture number {i}\t{'val' if i % 3 == 0 else 'train'}")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    from clipforge.tokenizer import get_tokenizer

    args = tiny_args(tmp_path, "m", "--data.source=manifest", f"--data.path={manifest}", "--batch_size=4",
                     "--early_stop.patience=1", "--early_stop.batches=1")
    cfg = load_train_config(None, args)
    batches = validation_batches(cfg, 32, get_tokenizer(cfg.model))
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 32, 32)
    tokenizer = get_tokenizer(cfg.model)
    val_captions = {f"picture number {i}" for i in range(0, 12, 3)}
    expected = tokenizer(sorted(val_captions))
    assert sorted(map(tuple, batches[0][1].tolist())) == sorted(map(tuple, expected.tolist()))
    cfg = load_train_config(None, [*args, "--batch_size=8"])
    with pytest.raises(ConfigError, match="early_stop.split.*4 pairs, fewer than one batch of 8"):
        validation_batches(cfg, 32, tokenizer)


PLATEAU_ARGS = ("--steps=40", "--early_stop.patience=2", "--early_stop.every=5", "--early_stop.min_delta=100",
                "--early_stop.batches=1")  # as above: the first validation (step 5) stays the best; stop at 15


def _signal_after(after_step: int):
    """A hook that sends this process SIGTERM after `after_step`; the run stops (and saves) after the next step."""
    def sender(_ctx, _progress, step):
        if step == after_step:
            os.kill(os.getpid(), signal.SIGTERM)

    return sender


def _validations(run_dir) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]


# Stops landing at step 7 (between validations), 10 (right after one) and 15 (right after the rule fired).
@pytest.mark.parametrize("after_step", [6, 9, 14])
def test_a_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path, after_step):
    reference = train(load_train_config(None, tiny_args(tmp_path, "ref", *PLATEAU_ARGS)), progress=False)
    assert reference.steps == 15
    cfg = load_train_config(None, tiny_args(tmp_path, "cut", *PLATEAU_ARGS))
    first = train(cfg, progress=False, hooks=(_signal_after(after_step),))
    assert first.interrupted == "SIGTERM" and first.steps == after_step + 1
    resumed = train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert resumed.resumed_from is not None and resumed.interrupted is None
    # A rule restarted at the resume would take the first validation after it as its best and stop 5-10 steps later.
    assert resumed.steps == 15 and resumed.early_stop == reference.early_stop
    assert resumed.stopped_early == reference.stopped_early and not events(resumed.run_dir, "plateau_restarted")
    assert dict(_validations(resumed.run_dir)) == dict(_validations(reference.run_dir))
    ours, theirs = load_file(str(resumed.run_dir / "model.safetensors")), load_file(str(reference.run_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_checkpoint_without_plateau_state_restarts_the_rule_and_says_so(tmp_path, monkeypatch):
    """Checkpoints written before the rule's state was saved: the run resumes, the rule starts afresh at the
    resume (its first validation, step 10, becomes the best), so it stops at 20, and the log says why."""
    cfg = load_train_config(None, tiny_args(tmp_path, "old", *PLATEAU_ARGS))
    real = loop.extra_state
    monkeypatch.setattr(loop, "extra_state", lambda ctx, progress: {k: v for k, v in real(ctx, progress).items()
                                                                    if k != "plateau"})  # fmt: skip
    assert train(cfg, progress=False, hooks=(_signal_after(6),)).steps == 7
    monkeypatch.undo()
    resumed = train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert resumed.steps == 20 and resumed.early_stop["best_step"] == 10
    assert len(events(resumed.run_dir, "plateau_restarted")) == 1


def test_recall_is_maximised():
    """monitor recall: higher is better; 0.305 is not 0.01 above 0.3, so steps 3 and 4 are stale: stop at 4."""
    stopper = PlateauStopper(patience=2, min_delta=0.01, maximize=True, key="val_r1")
    assert _first_stop(stopper, [0.1, 0.3, 0.305, 0.2], every=1) == 4
    assert stopper.state() == {"best_val_r1": 0.3, "best_step": 2, "stopped_step": 4}
    fresh = PlateauStopper(patience=2, min_delta=0.01, maximize=True, key="val_r1")
    fresh.load_state_dict(PlateauStopper(2, maximize=True).state_dict())  # no observation yet: best stays -inf
    assert fresh.improves(-1e9)


class _LookupModel(torch.nn.Module):
    """Returns fixed unit features for the pair indices the 'images' carry, and a logit scale."""

    def __init__(self, image_features: list[list[float]], text_features: list[list[float]], scale: float) -> None:
        super().__init__()
        norm = lambda rows: torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)  # noqa: E731
        self.images, self.texts, self.scale = norm(image_features), norm(text_features), torch.tensor(scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        index = images[:, 0].long()
        return self.images[index], self.texts[index], self.scale


def _cross_entropy(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_validation_metrics_by_hand():
    """Four pairs in two batches; pairs 1 and 2 have the same caption. Image-to-text: I0 -> T0 (right), I1 -> T2
    (pair 2's caption, the same text: right), I2 -> T3 and I3 -> T0 (wrong): 2/4. Text-to-image: T0 -> I0, T1 -> I2
    and T2 -> I1 (images captioned the same: right), T3 -> I2 (wrong): 3/4. R@1 0.625 (by index it would be 0.25).
    The losses: per batch, the symmetric cross-entropy written out, at the model's scale and at 1/0.05."""
    from clipforge.train.early_stop import validation_metrics

    image_rows = [[1, 0, 0], [0, 0, 1], [0, 0.6, 0.8], [0.8, 0.5, 0]]
    text_rows = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]
    model = _LookupModel(image_rows, text_rows, scale=3.0).eval()
    captions = torch.tensor([[7, 1], [7, 2], [7, 2], [7, 3]])
    batches = [(torch.tensor([[0.0], [1.0]]), captions[:2]), (torch.tensor([[2.0], [3.0]]), captions[2:])]
    got = validation_metrics(model, batches, torch.device("cpu"), fixed_temperature=0.05)
    assert got["val_r1"] == pytest.approx(0.625)

    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    imgs, txts = [unit(r) for r in image_rows], [unit(r) for r in text_rows]

    def loss(scale: float) -> float:
        total = 0.0
        for pairs in ((0, 1), (2, 3)):
            sim = [[scale * sum(a * b for a, b in zip(imgs[i], txts[j])) for j in pairs] for i in pairs]
            rows = sum(_cross_entropy(sim[k], k) for k in range(2)) / 2
            cols = sum(_cross_entropy([sim[i][k] for i in range(2)], k) for k in range(2)) / 2
            total += (rows + cols) / 2
        return total / 2

    assert got["val_loss"] == pytest.approx(loss(3.0), rel=1e-6)
    assert got["val_loss_fixed_t"] == pytest.approx(loss(20.0), rel=1e-6)


def test_early_stop_config_errors():
    with pytest.raises(ConfigError, match="early_stop.monitor.*loss, fixed_t_loss, recall.*'r1'"):
        load_train_config(None, ["--early_stop.monitor=r1"])
    with pytest.raises(ConfigError, match="early_stop.fixed_temperature"):
        load_train_config(None, ["--early_stop.fixed_temperature=0"])


def _keep_weights_at(step_wanted: int, kept: dict):
    def hook(ctx, _progress, step):
        if step == step_wanted:
            kept.update({k: v.detach().clone() for k, v in ctx.core.state_dict().items()})

    return hook


def test_restore_best_keeps_the_best_checks_weights(tmp_path):
    """PLATEAU_ARGS: the best check is step 5, the run stops at 15. With restore_best the final model file and
    the returned model hold step 5's weights exactly (and the file says so); without it, step 15's."""
    at5: dict = {}
    result = train(load_train_config(None, tiny_args(tmp_path, "best", *PLATEAU_ARGS, "--early_stop.restore_best=true")),
                   progress=False, hooks=(_keep_weights_at(5, at5),))
    assert result.steps == 15 and result.early_stop["best_step"] == 5 and result.early_stop["restored_step"] == 5
    saved = load_file(str(result.run_dir / "model.safetensors"))
    assert saved.keys() == at5.keys() and all(torch.equal(saved[k], at5[k]) for k in at5)
    assert all(torch.equal(v, at5[k]) for k, v in result.model.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(result.run_dir / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["restored_step"] == "5" and handle.metadata()["step"] == "15"
    assert [e["restored_step"] for e in events(result.run_dir, "restored_best")] == [5]

    plain = train(load_train_config(None, tiny_args(tmp_path, "last", *PLATEAU_ARGS)), progress=False)
    final = load_file(str(plain.run_dir / "model.safetensors"))
    assert any(not torch.equal(final[k], at5[k]) for k in at5)  # the last step's weights differ from step 5's


def test_restore_best_refuses_a_file_from_another_step(tmp_path):
    """A best-model file that is not the best check's (here overwritten at step 12) is not loaded: the final
    model stays the last step's, and the log says why."""
    from clipforge.checkpoint import save_model

    def overwrite(ctx, _progress, step):
        if step == 12:
            save_model(ctx.core, ctx.run_dir / loop.BEST_MODEL, {"step": "12"})

    at15: dict = {}
    result = train(load_train_config(None, tiny_args(tmp_path, "odd", *PLATEAU_ARGS, "--early_stop.restore_best=true")),
                   progress=False, hooks=(overwrite, _keep_weights_at(15, at15)))
    assert result.early_stop["restored_step"] == 15
    assert len(events(result.run_dir, "restore_best_failed")) == 1
    saved = load_file(str(result.run_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], at15[k]) for k in at15)


def test_restore_best_survives_a_resume(tmp_path):
    """Interrupted after step 9 (the best check, 5, already kept on disk), resumed: the final model is the same
    step-5 model as the uninterrupted run's."""
    args = (*PLATEAU_ARGS, "--early_stop.restore_best=true")
    reference = train(load_train_config(None, tiny_args(tmp_path, "ref", *args)), progress=False)
    cfg = load_train_config(None, tiny_args(tmp_path, "cut", *args))
    assert train(cfg, progress=False, hooks=(_signal_after(9),)).interrupted == "SIGTERM"
    resumed = train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert resumed.early_stop == reference.early_stop and resumed.early_stop["restored_step"] == 5
    ours, theirs = load_file(str(resumed.run_dir / "model.safetensors")), load_file(str(reference.run_dir / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_monitor_keys_match_the_config():
    from clipforge.train.config import EARLY_STOP_MONITORS
    from clipforge.train.early_stop import MONITOR_KEYS

    assert set(MONITOR_KEYS) == set(EARLY_STOP_MONITORS)


def test_validation_signals_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(load_train_config(None, tiny_args(tmp_path, "tb", *PLATEAU_ARGS, "--log.tensorboard=true")),
                   progress=False)
    board = EventAccumulator(str(result.run_dir / "tensorboard"))
    board.Reload()
    logged = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    for key in ("val_loss", "val_loss_fixed_t", "val_r1"):
        expected = {e["step"]: e[key] for e in logged if key in e}
        assert sorted(expected) == [5, 10, 15]
        assert {e.step: e.value for e in board.Scalars(f"val/{key}")} == pytest.approx(expected, rel=1e-6)
