"""bf16 training steps that keep bf16 weight copies and update fp32 masters straight from bf16 gradients
(`speed.autocast_weights`, `train.master_update.MasterUpdate`), against the plain steps they replace: autocast
over the fp32 model with torch's clipping and fused AdamW, and bf16-master's copy-clip-step-round. Equal bit for
bit: weights, optimizer state, gradient norms, losses."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from run_helpers import assert_bitwise_equal, tiny_config, weights
from test_train_step import CONSTANT

from clipforge import create_model, get_model_config, speed
from clipforge.speed import AUTOCAST_KEEP_FP32, MasterWeights, channels_last
from clipforge.train.config import OptimConfig, TrainConfig
from clipforge.train.loop import train
from clipforge.train.master_update import SLICE_ALIGN, MasterUpdate
from clipforge.train.optim import build_optimizer
from clipforge.train.step import Stepper, build_loss, build_stepper, train_step


@pytest.fixture
def native_bf16(monkeypatch):
    """bf16 autocast on every CPU (without AVX-512 BF16 or AMX it is emulated: the same values, slower)."""
    monkeypatch.setattr(speed, "cpu_supports_bf16", lambda cpuinfo="/proc/cpuinfo": True)


def model_and_batches(name: str, steps: int = 3, batch: int = 8):
    torch.manual_seed(0)
    model = create_model(name)
    channels_last(model)  # as the trainer stores a ResNet (conv weights NHWC: slices walk memory order)
    cfg = get_model_config(name)
    gen = torch.Generator().manual_seed(1)
    size, context = cfg.vision_cfg.image_size, cfg.text_cfg.context_length
    batches = [(torch.randn(batch, 3, size, size, generator=gen),
                torch.randint(1, 400, (batch, context), generator=gen)) for _ in range(steps)]
    return model, batches


def plain_autocast(model, cfg: TrainConfig) -> Stepper:
    """The step before bf16 copies: autocast over the fp32 model, clip_gradients, torch's fused AdamW."""
    return Stepper(model, model, build_optimizer(model, cfg.optim), build_loss(cfg.loss), "bf16", None,
                   cfg.optim.grad_clip)


def assert_same_training(a: Stepper, b: Stepper, batches) -> None:
    for step, (images, tokens) in enumerate(batches):
        out_a = train_step(a, images, tokens, lr=1e-3)
        out_b = train_step(b, images, tokens, lr=1e-3)
        assert torch.equal(out_a.grad_norm, out_b.grad_norm), f"step {step}: gradient norms differ"
        assert torch.equal(out_a.parts["loss"], out_b.parts["loss"]), f"step {step}: losses differ"
    assert_bitwise_equal(a.core.state_dict(), b.core.state_dict(), "fp32 weights")
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, entries in state_a.items():
        for key, value in entries.items():
            assert torch.equal(value, state_b[index][key]), f"optimizer state {index}/{key}"


@pytest.mark.parametrize("name", ["ViT-Micro-8-32", "RN-Micro-64"])
@pytest.mark.parametrize("grad_clip", [None, 1e4, 0.5])  # no limit, never reached, clipping every step
def test_bf16_copies_under_autocast_train_as_autocast_over_fp32_bit_for_bit(native_bf16, name, grad_clip):
    model, batches = model_and_batches(name)
    cfg = TrainConfig(precision="bf16", optim=OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=grad_clip))
    plain = plain_autocast(copy.deepcopy(model), cfg)
    fast = build_stepper(cfg, model)
    assert fast.master is not None and fast.streamed is not None
    fast.streamed.slice_size = 4 * SLICE_ALIGN  # many slices per weight, their edges inside vectors of layers
    compute = dict(fast.model.named_parameters())
    assert compute["visual.conv1.weight" if name.startswith("RN") else "visual.proj"].dtype == torch.bfloat16
    assert all(compute[n].dtype == torch.float32 for n in AUTOCAST_KEEP_FP32)
    assert fast.model.dtype == torch.float32  # the model takes its fp32 code path; autocast picks precisions
    assert all(p.dtype == torch.float32 for p in fast.core.parameters())
    assert_same_training(plain, fast, batches)
    for name_, param in fast.model.named_parameters():  # compute weights are the masters rounded
        assert torch.equal(param, dict(fast.core.named_parameters())[name_].to(param.dtype)), name_


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_bf16_master_streamed_update_is_its_copy_clip_step_round_bit_for_bit(native_bf16, grad_clip):
    model, batches = model_and_batches("RN-Micro-64")
    cfg = TrainConfig(precision="bf16-master", optim=OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=grad_clip))
    plain = build_stepper(cfg, copy.deepcopy(model))
    plain = replace(plain, streamed=None)  # MasterWeights.grads_to_master, clip_gradients, step, master_to_model
    fast = build_stepper(cfg, model)
    assert fast.streamed is not None
    assert_same_training(plain, fast, batches)


def test_a_skipped_step_changes_nothing(native_bf16):
    model, batches = model_and_batches("ViT-Micro-8-32", steps=2)
    cfg = TrainConfig(precision="bf16", optim=OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0))
    fast = build_stepper(cfg, model)
    before = copy.deepcopy(fast.core.state_dict())
    out = train_step(fast, *batches[0], lr=1e-3, skip=lambda loss, norm: True)
    assert out.skipped and float(out.grad_norm) > 0
    assert_bitwise_equal(before, fast.core.state_dict(), "weights after a skipped step")
    assert not fast.optimizer.state


@pytest.mark.parametrize("change", [{"accum_chunk": 4}, {"precision": "fp32"}, {"compile": True}])
def test_bf16_copies_only_where_they_keep_autocasts_numbers(native_bf16, change):
    """Chunked accumulation would sum bf16 gradients where autocast sums fp32 ones; fp32 has nothing to copy;
    a compiled model is left as torch.compile sees it."""
    model, _ = model_and_batches("ViT-Micro-8-32", steps=0)
    stepper = build_stepper(replace(TrainConfig(precision="bf16"), **change), model)
    assert stepper.master is None and stepper.streamed is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("size", [0, 100, SLICE_ALIGN + 1])
def test_a_slice_size_off_the_vector_grid_is_refused(size):
    model = create_model("ViT-Micro-8-32")
    master = MasterWeights(model)
    optimizer = build_optimizer(master.master, OptimConfig())
    with pytest.raises(ValueError, match=f"multiple of {SLICE_ALIGN}, got {size}"):
        MasterUpdate(master, optimizer, slice_size=size)


def test_a_foreach_adamw_is_not_streamed():
    model = create_model("ViT-Micro-8-32")
    master = MasterWeights(model)
    optimizer = torch.optim.AdamW(master.master.parameters(), foreach=True)
    with pytest.raises(ValueError, match="fused=True"):
        MasterUpdate(master, optimizer)


def test_a_stopped_bf16_run_resumes_exactly(tmp_path, native_bf16):
    """The compute copies are rebuilt from the restored fp32 weights: the resumed run is the uninterrupted one."""
    modes = ["--precision=bf16", "--steps=4", "--optim.grad_clip=0.5"]
    whole = train(tiny_config(tmp_path, "whole", *CONSTANT, *modes), progress=False)

    def stop_at_two(ctx, progress, step):
        return "test hook" if step == 2 else None

    cut = train(tiny_config(tmp_path, "cut", *CONSTANT, *modes), progress=False, hooks=[stop_at_two])
    assert cut.steps == 2 and cut.checkpoint is not None
    resumed = train(tiny_config(tmp_path, "cut", *CONSTANT, *modes, "--resume=latest"), progress=False)
    assert resumed.steps == 4
    assert_bitwise_equal(weights(whole.run_dir), weights(resumed.run_dir), "resumed bf16 run")
