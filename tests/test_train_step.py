"""The trainer's one step in its modes: exact contrastive accumulation (one process and 2 gloo ranks) against a
float64 run of the whole batch in one piece, BatchNorm statistics updated once per sample, bf16 weights with
fp32 master weights, hooks that stop a run, and exact resume of such a run."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from run_helpers import assert_bitwise_equal, distance, events, tiny_config, weights
from test_ddp_train import run_ranks
from torch.nn.modules.batchnorm import _BatchNorm

from clipforge.registry import get_model_config
from clipforge.tokenizer import tokenizer_for
from clipforge.train.config import TrainConfig
from clipforge.train.data import build_train_dataset
from clipforge.train.feed import LoaderSpec, build_loader
from clipforge.train.loop import train
from clipforge.train.schedule import lr_at
from clipforge.train.setup import prepare_model
from clipforge.train.step import build_stepper, forward_backward, train_step

STEPS = 3
CONSTANT = ["--optim.schedule=constant", "--optim.warmup_steps=0", "--optim.lr=1e-3", f"--steps={STEPS}",
            "--batch_size=8"]


def float64_reference(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, final) weights of `cfg`'s run computed in float64 with the whole batch in one piece: the
    trainer's own batches, schedule and step, on a float64 copy of its initial model."""
    model = prepare_model(cfg, torch.device("cpu")).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = build_stepper(replace(cfg, accum_chunk=None), model)
    dataset, shuffle = build_train_dataset(cfg, model.image_size)
    spec = LoaderSpec(cfg.batch_size, cfg.steps, cfg.seed, shuffle=shuffle)
    for step, batch in enumerate(build_loader(dataset, tokenizer_for(model.config), spec)):
        lr = lr_at(step, cfg.optim.lr, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.schedule)
        train_step(stepper, batch.images.double(), batch.tokens, lr)
    return start, model.state_dict()


def assert_as_exact_as_one_piece(run: dict, one_piece: dict, start: dict, exact: dict) -> None:
    """`run` is as close to the float64 result as the fp32 run of the batch in one piece is: accumulation adds
    no error beyond fp32 rounding (whose size the one-piece run measures on this machine)."""
    moved = distance(exact, start)  # how far training moved the weights
    floor = distance(one_piece, exact)  # fp32 rounding, amplified by AdamW's normalisation
    assert floor < 1e-2 * moved, f"fp32 one-piece run {floor:.3g} away from float64 (weights moved {moved:.3g})"
    error = distance(run, exact)
    assert error <= 3 * floor + 1e-6 * moved, f"{error:.3g} from float64, the one-piece fp32 run {floor:.3g}"


def test_accumulation_gives_the_weights_of_the_whole_batch_in_one_piece(tmp_path):
    one = train(tiny_config(tmp_path, "one", *CONSTANT), progress=False)
    acc = train(tiny_config(tmp_path, "acc", *CONSTANT, "--accum_chunk=3"), progress=False)  # chunks 3, 3, 2
    start, exact = float64_reference(tiny_config(tmp_path, "ref", *CONSTANT))
    assert_as_exact_as_one_piece(weights(acc.run_dir), weights(one.run_dir), start, exact)


def test_accumulation_over_two_gloo_ranks_equals_one_piece(tmp_path):
    one = train(tiny_config(tmp_path, "one", *CONSTANT), progress=False)
    statuses = run_ranks(tiny_config(tmp_path, "ddp", *CONSTANT, "--accum_chunk=2"))  # 4 rows a rank, chunks 2, 2
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
    start, exact = float64_reference(tiny_config(tmp_path, "ref", *CONSTANT))
    assert_as_exact_as_one_piece(weights(tmp_path / "ddp"), weights(one.run_dir), start, exact)


def test_batchnorm_statistics_are_updated_once_per_sample(tmp_path):
    cfg = tiny_config(tmp_path, "bn", "--model=RN-Tiny-64",
                      "--data.synthetic.image_size=64", "--accum_chunk=4")
    model = prepare_model(cfg, torch.device("cpu"))
    reference = copy.deepcopy(model)
    stepper = build_stepper(cfg, model)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=gen)
    tokens = tokenizer_for(get_model_config("RN-Tiny-64"))(["a red circle"] * 8)
    forward_backward(stepper, images, tokens)
    with torch.no_grad():  # each chunk seen once, in training mode: the statistics a single pass leaves
        reference(images[:4], tokens[:4])
        reference(images[4:], tokens[4:])
    layers = [(a, b) for a, b in zip(model.modules(), reference.modules()) if isinstance(a, _BatchNorm)]
    assert layers
    for ours, ref in layers:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.fixture
def native_bf16(monkeypatch):
    """The bf16 modes under test on every CPU: without AVX-512 BF16 or AMX the trainer would fall back to fp32
    (emulated bf16 computes the same values, only slower)."""
    from clipforge import speed  # noqa: PLC0415

    monkeypatch.setattr(speed, "cpu_supports_bf16", lambda cpuinfo="/proc/cpuinfo": True)


@pytest.mark.parametrize("precision", ["bf16", "bf16-master"])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(tmp_path, monkeypatch, precision):
    from clipforge import speed  # noqa: PLC0415

    monkeypatch.setattr(speed, "cpu_supports_bf16", lambda cpuinfo="/proc/cpuinfo": False)  # as on AVX2 only
    asked = train(tiny_config(tmp_path, "asked", *CONSTANT, f"--precision={precision}"), progress=False)
    fp32 = train(tiny_config(tmp_path, "fp32", *CONSTANT), progress=False)
    assert_bitwise_equal(weights(fp32.run_dir), weights(asked.run_dir), f"{precision} without native bf16")
    [event] = events(asked.run_dir, "precision")
    assert (event["requested"], event["used"]) == (precision, "fp32")
    assert not events(fp32.run_dir, "precision")


def test_bf16_master_trains_fp32_masters_and_saves_them(tmp_path, native_bf16):
    result = train(tiny_config(tmp_path, "bf16m", *CONSTANT, "--precision=bf16-master"), progress=False)
    saved = weights(result.run_dir)
    assert all(v.dtype == torch.float32 for v in saved.values())
    fp32 = weights(train(tiny_config(tmp_path, "fp32", *CONSTANT), progress=False).run_dir)
    start, _ = float64_reference(tiny_config(tmp_path, "ref", *CONSTANT))
    # bf16 compute changes the gradients by about 2^-8 relative: the same training, not the same rounding
    assert distance(saved, fp32) < 0.1 * distance(fp32, start)
    assert 0 < distance(saved, fp32), "the bf16 compute path was not taken"
    assert saved.keys() == fp32.keys()


def test_a_hook_stops_the_run_and_it_resumes_exactly(tmp_path, native_bf16):
    modes = ["--precision=bf16-master", "--accum_chunk=3", "--steps=4"]
    whole = train(tiny_config(tmp_path, "whole", *CONSTANT, *modes), progress=False)

    def stop_at_two(ctx, progress, step):
        return "test hook" if step == 2 else None

    cut = train(tiny_config(tmp_path, "cut", *CONSTANT, *modes), progress=False, hooks=[stop_at_two])
    assert cut.stopped_early == "test hook" and cut.steps == 2 and cut.checkpoint is not None
    assert_bitwise_equal(weights(cut.run_dir), weights(cut.checkpoint), "the final model of a stopped run")
    resumed = train(tiny_config(tmp_path, "cut", *CONSTANT, *modes, "--resume=latest"), progress=False)
    assert resumed.steps == 4
    assert_bitwise_equal(weights(whole.run_dir), weights(resumed.run_dir), "resumed bf16-master + accumulation")


def test_tensorboard_gets_the_logged_numbers_and_evaluations(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tasks = "--eval.tasks=[{task: zeroshot, per_class: 1}, {task: retrieval, pairs: 20}]"
    result = train(tiny_config(tmp_path, "tb", *CONSTANT, "--eval.every=2", "--log.tensorboard=true", tasks),
                   progress=False)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/temperature", "train/samples_per_s", "train/grad_norm"} <= tags
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    evals = {e["step"]: e["eval"] for e in log if "eval" in e}
    assert sorted(evals) == [2, 3]  # every 2 steps and after the last
    board = {e.step: e.value for e in events.Scalars("eval/retrieval/synthetic/image_retrieval_recall@1")}
    assert board == pytest.approx({s: v["retrieval/synthetic"]["image_retrieval_recall@1"] for s, v in evals.items()})
    assert "eval/zeroshot/synthetic/subsets/heldout/acc1" in tags
    assert result.metrics == evals[3]


def test_wandb_asked_for_but_not_installed_is_one_clear_line(tmp_path, capsys):
    import importlib.util

    from run_helpers import tiny_args

    from clipforge.cli import main

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the run would log to it")
    assert main(["train", "--no-progress", *tiny_args(tmp_path, "w", "--steps=1", "--log.wandb=true")]) == 2
    assert capsys.readouterr().err.strip() == (
        "clipforge: error: config key 'log.wandb': Weights & Biases is not installed (pip install wandb)")


@pytest.mark.slow  # torch.compile builds C++ kernels: minutes on a small CPU
def test_compiled_step_trains_like_the_eager_one(tmp_path):
    eager = train(tiny_config(tmp_path, "eager", *CONSTANT), progress=False)
    compiled = train(tiny_config(tmp_path, "compiled", *CONSTANT, "--compile=true"), progress=False)
    start, exact = float64_reference(tiny_config(tmp_path, "ref", *CONSTANT))
    assert_as_exact_as_one_piece(weights(compiled.run_dir), weights(eager.run_dir), start, exact)


@pytest.mark.parametrize("max_norm_of", [lambda n: None, lambda n: 10 * n, lambda n: n, lambda n: n / 10,
                                         lambda n: n - 5e-7])
def test_clip_gradients_is_torchs_clip_grad_norm_bit_for_bit(max_norm_of):
    """Far below, at, just over and far over the limit (at it, torch's 1e-6 guard makes the factor < 1, so
    gradients are scaled), and no limit: the same norm and the same gradients as clip_grad_norm_."""
    from clipforge.train.step import clip_gradients

    torch.manual_seed(0)
    grads = [torch.randn(37, 5), torch.randn(300), torch.randn(2, 3, 4)]
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    max_norm = max_norm_of(norm)

    def params():
        out = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(out, grads):
            p.grad = g.clone()
        return out

    ours, theirs = params(), params()
    got = clip_gradients(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm is not None else float("inf"))
    assert torch.equal(got, want)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    scaled = max_norm is not None and max_norm / (norm + 1e-6) < 1
    assert all(torch.equal(a.grad, g) for a, g in zip(ours, grads)) != scaled


def test_clip_gradients_scales_a_non_finite_norm_as_torch_does():
    from clipforge.train.step import clip_gradients

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert torch.isnan(clip_gradients([p], 1.0)) and torch.isnan(p.grad).all()
