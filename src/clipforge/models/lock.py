"""Locking towers for fine-tuning and LiT ("Locked-image Tuning", Zhai et al. 2022).

A tower is split into groups from input to output (embeddings, each block, the head). Locking keeps the last
`unlocked_*` groups trainable and freezes the rest: their parameters stop requiring gradients, and their modules
are switched to eval mode (so BatchNorm statistics stop moving) and marked, because `model.train()` would switch
them back. A trainer therefore:

    lock_image_tower(model, unlocked_groups=0)
    optimizer = AdamW(trainable_parameters(model), ...)
    ...
    model.train(); set_locked_eval(model)   # after every switch to training mode
"""

from __future__ import annotations

from typing import Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .resnet import ModifiedResNet
from .vision import VisionTransformer

_LOCKED = "_clipforge_locked"
Group = list[Union[nn.Module, nn.Parameter]]


def image_groups(visual: nn.Module) -> list[Group]:
    """The image tower's groups, input to output."""
    if isinstance(visual, VisionTransformer):
        stem: Group = [visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre]
        blocks: list[Group] = [[block] for block in visual.transformer.resblocks]
        return [stem, *blocks, [visual.ln_post, visual.proj]]
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3, visual.avgpool]
        return [stem, *[[stage] for stage in visual.stages], [visual.attnpool]]
    raise TypeError(f"cannot lock an image tower of type {type(visual).__name__}")


def text_groups(model: nn.Module) -> list[Group]:
    """The text tower's groups, input to output (CLIP's BPE transformer or a Hugging Face encoder)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "layer_groups"):
        return text.layer_groups()
    embeddings: Group = [model.token_embedding, model.positional_embedding]
    blocks: list[Group] = [[block] for block in model.transformer.resblocks]
    return [embeddings, *blocks, [model.ln_final, model.text_projection]]


def _lock_module(module: nn.Module, freeze_bn_stats: bool) -> None:
    if isinstance(module, _BatchNorm) and not freeze_bn_stats:
        return  # frozen affine weights, but running statistics keep following the data
    setattr(module, _LOCKED, True)
    module.training = False  # this module only: each locked descendant is marked on its own


def _lock_groups(
    groups: list[Group], unlocked: int, freeze_bn_stats: bool, what: str, roots: list[nn.Module]
) -> None:
    if not 0 <= unlocked <= len(groups):
        raise ValueError(f"{what}={unlocked}: this tower has {len(groups)} groups (0 keeps none trainable)")
    for group in groups[: len(groups) - unlocked]:
        for item in group:
            if isinstance(item, nn.Parameter):
                item.requires_grad_(False)
                continue
            for param in item.parameters():
                param.requires_grad_(False)
            for module in item.modules():
                _lock_module(module, freeze_bn_stats)
    # Containers (the tower itself, its block list) whose every parameter is now frozen are locked too.
    for root in roots:
        for module in root.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                _lock_module(module, freeze_bn_stats)


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
    """Freeze `model.visual` except its last `unlocked_groups` groups (0: the whole tower is locked).

    With `freeze_bn_stats`, BatchNorm layers in locked groups also stop updating their running statistics.
    """
    _lock_groups(image_groups(model.visual), unlocked_groups, freeze_bn_stats, "unlocked_groups", [model.visual])


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze the text tower except its last `unlocked_layers` groups (the head counts as one)."""
    text = getattr(model, "text", None)
    roots = [text] if isinstance(text, nn.Module) else [model.transformer]
    _lock_groups(text_groups(model), unlocked_layers, True, "unlocked_layers", roots)


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """Keep every BatchNorm layer in eval mode (running statistics fixed, used in the forward pass) through
    `model.train()` / `set_locked_eval`; its affine weights still train. Returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for module in layers:
        _lock_module(module, freeze_bn_stats=True)
    return len(layers)


def set_locked_eval(model: nn.Module) -> nn.Module:
    """Put every locked module back in eval mode; call after `model.train()`."""
    for module in model.modules():
        if getattr(module, _LOCKED, False):
            module.training = False  # not .eval(): that would recurse into unlocked BatchNorms
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should see: those still requiring gradients."""
    return [p for p in model.parameters() if p.requires_grad]
