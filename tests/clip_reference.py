"""Reference implementations for the conversion tests, loaded by file path (never imported as packages).

- OpenAI's `clip/model.py` from the installed `clip-anytorch` distribution.
- OpenCLIP's `model.py` (with its sibling modules) from the installed `open_clip_torch` distribution. Its
  `utils.py` imports torchvision for one class used only by `freeze_batch_norm_2d`; without torchvision a
  stand-in module is placed in `sys.modules` for the duration of that import only.
- The whole `open_clip` package as its users import it (`import_open_clip`), for the round trips through
  `open_clip.create_model`. It needs torchvision, which is kept out of the environment and installed apart
  (`pip install --no-deps --target .ref-packages torchvision==0.28.0`, README's test command; the folder is
  `$CLIPFORGE_REF_PACKAGES` when set): installed into the environment, PyPI's torchvision wheel (built for a
  CUDA torch) breaks `from transformers import CLIPModel` for every other program, because its compiled
  operators do not load against the CPU torch and its Python code then fails at import. Here, in the test
  process only, the folder goes on sys.path and the schemas of the two operators torchvision registers fake
  kernels for (`nms`, `qnms`) are defined before it is imported; neither is ever called.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from clipforge.models.config import ModelConfig


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"reference package {name} is not installed"
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def openai_model_module() -> types.ModuleType:
    """OpenAI's clip/model.py, executed from its file."""
    spec = importlib.util.spec_from_file_location("_ref_openai_clip_model", _package_dir("clip") / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF_PACKAGES = Path(os.environ.get("CLIPFORGE_REF_PACKAGES", Path(__file__).resolve().parents[1] / ".ref-packages"))


@lru_cache(maxsize=1)
def _torchvision_operator_schemas() -> None:
    if REF_PACKAGES.is_dir() and str(REF_PACKAGES) not in sys.path:
        sys.path.append(str(REF_PACKAGES))
        importlib.invalidate_caches()
    if importlib.util.find_spec("torchvision") is None:
        return
    if "torchvision" in sys.modules:
        return  # already imported (with its own operators or these schemas)
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)  # a Library deregisters its definitions when garbage-collected


_LIBRARIES: list[Any] = []


def import_open_clip() -> types.ModuleType:
    """The installed `open_clip` package, with torchvision from REF_PACKAGES."""
    _torchvision_operator_schemas()
    assert importlib.util.find_spec("torchvision") is not None, (
        f"torchvision for the open_clip client tests is missing: pip install --no-deps --target {REF_PACKAGES} "
        "torchvision==0.28.0"
    )
    return importlib.import_module("open_clip")


@lru_cache(maxsize=1)
def openclip_model_module() -> types.ModuleType:
    """OpenCLIP's open_clip/model.py, imported as a submodule of a private package rooted at its folder."""
    import transformers  # noqa: F401 - imported first so its availability checks never see the stand-in

    package = types.ModuleType("_ref_open_clip")
    package.__path__ = [str(_package_dir("open_clip"))]  # type: ignore[attr-defined]
    sys.modules["_ref_open_clip"] = package
    stand_ins = {}
    _torchvision_operator_schemas()
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d:  # never instantiated by the code paths tested
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("torchvision stand-in")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
        ops = types.ModuleType("torchvision.ops")
        ops.misc = misc  # type: ignore[attr-defined]
        root = types.ModuleType("torchvision")
        root.ops = ops  # type: ignore[attr-defined]
        stand_ins = {"torchvision": root, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("_ref_open_clip.model")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def openai_clip(cfg: ModelConfig) -> torch.nn.Module:
    """OpenAI's CLIP built by its own constructor for our config (fp32, eval)."""
    ref = openai_model_module()
    v, t = cfg.vision_cfg, cfg.text_cfg
    layers = list(v.layers) if isinstance(v.layers, tuple) else v.layers
    model = ref.CLIP(
        cfg.embed_dim, v.image_size, layers, v.width, v.patch_size,
        t.context_length, t.vocab_size, t.width, t.heads, t.layers,
    )
    return model.eval()


def openclip_model_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """OpenCLIP's `model_cfg` (open_clip_config.json) for our config, written here from OpenCLIP's dataclass
    fields (CLIPVisionCfg.head_width, CLIPTextCfg.heads), independently of clipforge's mapping."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    vision = {"image_size": v.image_size, "width": v.width, "mlp_ratio": v.mlp_ratio}
    if v.is_resnet:
        vision.update(layers=list(v.layers), head_width=v.width * 32 // v.num_heads)  # type: ignore[arg-type]
    else:
        vision.update(layers=v.layers, patch_size=v.patch_size, head_width=v.width // v.num_heads)
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision, "text_cfg": text}


def openclip_clip(cfg: ModelConfig) -> torch.nn.Module:
    """OpenCLIP's CLIP built by its own constructor for our config (fp32, eval)."""
    ref = openclip_model_module()
    m = openclip_model_cfg(cfg)
    return ref.CLIP(m["embed_dim"], m["vision_cfg"], m["text_cfg"], quick_gelu=m["quick_gelu"]).eval()


def reduced(cfg: ModelConfig, vision_layers: Any, text_layers: int) -> ModelConfig:
    """The same architecture with fewer blocks: every width, head count and resolution unchanged."""
    return dataclasses.replace(
        cfg,
        vision_cfg=dataclasses.replace(cfg.vision_cfg, layers=vision_layers),
        text_cfg=dataclasses.replace(cfg.text_cfg, layers=text_layers),
    )


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make a freshly initialised model a demanding test case: every vector parameter (norm scales and
    shifts, biases, zero-initialised BatchNorm scales, class embedding) and every BatchNorm running statistic
    gets random values, so that no part of the computation can be skipped or reordered unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dim() != 1:
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen).to(tensor.dtype))
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * noise)
        elif name.endswith("bn3.weight"):
            tensor.copy_(0.2 + 0.05 * noise)  # OpenAI zero-initialises these; keep the blocks non-trivial
        else:
            tensor.add_(0.05 * noise)
    return model


def random_tokens(batch: int, context_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Token ids as the BPE tokenizer lays them out: start token, words, one end token (the largest id),
    zero padding; a different length for each row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    for row in range(batch):
        length = 2 + (row * 7 + 3) % (context_length - 2)
        tokens[row, 0] = vocab_size - 2
        tokens[row, 1 : length - 1] = torch.randint(1, vocab_size - 2, (length - 2,), generator=gen)
        tokens[row, length - 1] = vocab_size - 1
    return tokens


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)
