"""Locking towers (LiT and partial fine-tuning): frozen parameters, eval-mode modules, unlocked groups."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import clipforge
from clipforge.models.config import ModelConfig, TextConfig, VisionConfig
from clipforge.models.lock import (
    image_groups, lock_image_tower, lock_text_tower, set_locked_eval, text_groups, trainable_parameters,
)

TINY_RN = ModelConfig(
    embed_dim=32,
    vision_cfg=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16, patch_size=None),
    text_cfg=TextConfig(context_length=8, vocab_size=100, width=32, heads=2, layers=2),
)


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "rn":
        return clipforge.create_model(TINY_RN)
    return clipforge.create_model("ViT-Micro-8-32")


def batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, model.image_size, model.image_size, generator=gen)
    tokens = torch.randint(1, 90, (4, model.context_length), generator=gen)
    tokens[:, -1] = 99
    return images, tokens


def train_step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One AdamW step (with weight decay) on the trainable parameters; returns the state before it."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    model.train()
    set_locked_eval(model)
    images, tokens = batch(model)
    image_features, text_features, scale = model(images, tokens)
    logits = scale * image_features @ text_features.t()
    labels = torch.arange(4)
    loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("name", ["vit", "rn"])
def test_locked_image_tower_is_frozen_and_in_eval(name: str) -> None:
    model = tiny(name)
    lock_image_tower(model)
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
    before = train_step(model)
    assert all(not m.training for m in model.visual.modules())
    assert model.transformer.training
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("visual."):  # weights and BatchNorm statistics untouched
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["text_projection"], before["text_projection"])
    assert all(p.grad is None for p in model.visual.parameters())


def test_unlocked_groups_vit() -> None:
    model = tiny("vit")
    groups = image_groups(model.visual)
    assert len(groups) == 1 + len(model.visual.transformer.resblocks) + 1
    lock_image_tower(model, unlocked_groups=2)  # the last block and the head
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    last = len(model.visual.transformer.resblocks) - 1
    assert trainable == {n for n, _ in model.visual.named_parameters()
                         if n.startswith(f"transformer.resblocks.{last}.") or n.startswith("ln_post.") or n == "proj"}
    before = train_step(model)
    after = model.state_dict()
    assert torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])
    assert not torch.equal(after["visual.proj"], before["visual.proj"])
    assert model.visual.transformer.resblocks[last].training and not model.visual.ln_pre.training


def test_unlocked_groups_resnet_and_bn_statistics() -> None:
    model = tiny("rn")
    lock_image_tower(model, unlocked_groups=2)  # layer4 and attention pooling
    assert not any(p.requires_grad for p in model.visual.layer3.parameters())
    assert all(p.requires_grad for p in model.visual.layer4.parameters())
    before = train_step(model)
    after = model.state_dict()
    assert torch.equal(after["visual.layer3.0.bn1.running_mean"], before["visual.layer3.0.bn1.running_mean"])
    assert not torch.equal(after["visual.layer4.0.bn1.running_mean"], before["visual.layer4.0.bn1.running_mean"])


def test_freeze_bn_stats_false_keeps_statistics_moving() -> None:
    model = tiny("rn")
    lock_image_tower(model, freeze_bn_stats=False)
    before = train_step(model)
    after = model.state_dict()
    assert torch.equal(after["visual.bn1.weight"], before["visual.bn1.weight"])  # affine parameters frozen
    assert not torch.equal(after["visual.bn1.running_mean"], before["visual.bn1.running_mean"])
    assert all(m.training for m in model.visual.modules() if isinstance(m, _BatchNorm))


def test_lock_text_tower_keeps_last_groups() -> None:
    model = tiny("vit")
    assert len(text_groups(model)) == 1 + model.config.text_cfg.layers + 1
    lock_text_tower(model, unlocked_layers=1)  # only ln_final and text_projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual.")}
    assert trainable == {"ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"}
    before = train_step(model)
    after = model.state_dict()
    assert torch.equal(after["token_embedding.weight"], before["token_embedding.weight"])
    assert not model.transformer.training and not any(b.training for b in model.transformer.resblocks)
    assert model.ln_final.training


def test_lit_configuration_trains_only_text() -> None:
    """LiT: image tower fully locked, text tower fully trainable."""
    model = tiny("vit")
    lock_image_tower(model, unlocked_groups=0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(not n.startswith("visual.") for n in names)
    assert len(trainable_parameters(model)) == len(names)


def test_bad_group_count() -> None:
    model = tiny("vit")
    with pytest.raises(ValueError, match="unlocked_groups=99"):
        lock_image_tower(model, unlocked_groups=99)
