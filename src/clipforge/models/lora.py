"""LoRA (Hu et al. 2021): W -> W + (alpha / r) B A on chosen weight matrices, only A [r, in] and B [out, r] trained.

Our own small module rather than Hugging Face PEFT: PEFT wraps `nn.Linear` modules, but the attention blocks
keep OpenAI's fused `in_proj_weight` as a bare parameter that `forward_at` slices into q and k/v parts, and
`text_projection` / `visual.proj` are bare matrices too; a weight *parametrization*
(`torch.nn.utils.parametrize`) adapts any matrix in place, under every code path that reads it. (PEFT also
imports transformers at start-up, which is heavy.)

B starts at zero, so an adapted model starts equal to its base. State dicts of an adapted model hold
`<module>.parametrizations.<name>.original` (the frozen base), `.0.lora_A`, `.0.lora_B` and `.0.scaling`;
`merge_lora_state_dict` folds them into plain `<module>.<name>` weights, which `clipforge.load_model` does on
reading, so every file an adapted run writes loads (and exports) as an ordinary model.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError

# Shorthands for lora_targets; "visual." / "text." in front restricts one to a tower.
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("*attn.in_proj_weight", "*attn.out_proj.weight", "*attnpool.[qkv]_proj.weight",
             "*attnpool.c_proj.weight"),
    "mlp": ("*mlp.c_fc.weight", "*mlp.c_proj.weight"),
}
_ORIGINAL = re.compile(r"^(?P<prefix>(?:.+\.)?)parametrizations\.(?P<name>[^.]+)\.original$")


class LoRADelta(nn.Module):
    """The parametrization W -> W + scaling * B @ A of one [rows, cols] matrix."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, cols, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a [rank, cols] weight
        self.register_buffer("scaling", torch.tensor(alpha / rank, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # In the weights' precision even under autocast, so the trained delta is the one a merge computes.
        with torch.autocast(weight.device.type, enabled=False):
            return weight + self.scaling * (self.lora_B @ self.lora_A)  # [rows, cols]


def _tower(name: str) -> str:
    return "visual" if name.startswith("visual.") else "text"


def eligible_weights(model: nn.Module) -> list[str]:
    """Names of the weight matrices LoRA can adapt: every 2-D parameter except embedding tables."""
    return [n for n, p in model.named_parameters() if p.ndim == 2 and not n.split(".")[-1].endswith("embedding")
            and not n.endswith("embedding.weight")]


def _available(names: list[str]) -> str:
    generic = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    return ", ".join([*PRESETS, *(f"{t}.{p}" for t in ("visual", "text") for p in PRESETS), *generic])


def match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The eligible weight names selected by `targets` (presets or fnmatch patterns over parameter names).

    A target that selects nothing is a ConfigError listing what is available."""
    names = eligible_weights(model)
    chosen: list[str] = []
    for target in targets:
        tower, _, preset = target.partition(".") if target.split(".")[0] in ("visual", "text") else ("", "", target)
        patterns = PRESETS.get(preset, (target,)) if preset in PRESETS else (target,)
        hits = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)
                and (preset not in PRESETS or not tower or _tower(n) == tower)]
        if not hits:
            raise ConfigError(f"config key 'finetune.lora_targets': {target!r} matches no weight matrix of this "
                              f"model; available: {_available(names)}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> list[str]:
    """Freeze every parameter of `model`, then adapt the matrices `targets` selects; returns their names."""
    if rank < 1:
        raise ValueError(f"add_lora: rank must be at least 1, got {rank}")
    chosen = match_targets(model, targets)
    model.requires_grad_(False)
    for name in chosen:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        weight = getattr(owner, attr)
        rows, cols = weight.shape
        parametrize.register_parametrization(owner, attr, LoRADelta(rows, cols, rank, alpha, weight.device))
    return chosen


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scaling B A) in place, leaving plain parameters; returns `model`."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def merge_lora_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA parametrizations folded into plain weights (unchanged without any)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _ORIGINAL.match(key)
        if match is None:
            if ".parametrizations." not in f".{key}":
                out[key] = value
            continue
        stem = f"{match['prefix']}parametrizations.{match['name']}.0."
        a, b, scaling = state[stem + "lora_A"], state[stem + "lora_B"], state[stem + "scaling"]
        out[match["prefix"] + match["name"]] = value + scaling * (b @ a)  # as LoRADelta.forward computes it
    return out
