"""clipforge.load_model on files written by the reference implementations, parity of every architecture,
round trips through the layouts others read, and refusal of unsafe or damaged files.

References: OpenAI's clip/model.py (clip-anytorch, loaded by file path), Hugging Face transformers.CLIPModel,
OpenCLIP's model.py (loaded by file path). All in fp32 on CPU, compared within 1e-4 absolute.

Sizes: the fast suite runs RN50 and ViT-B-32 at full size (OpenAI state dict, TorchScript archive, and for
ViT-B-32 a Hugging Face folder), and the format, round-trip and error tests on tiny configs. `slow` tests run
the other seven architectures at full size (OpenAI state dict), and all nine at reduced depth (every width,
head count and resolution unchanged, one block per stage/tower) through every format.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import clipforge
from clip_reference import (
    openai_clip, openai_model_module, openclip_clip, openclip_model_cfg, perturb_, random_images, random_tokens,
    reduced,
)
from clipforge.convert import CheckpointFormatError, export_hf, export_openai, export_openclip, load_model
from clipforge.models.config import ModelConfig, TextConfig, VisionConfig

ATOL = 1e-4
RESNETS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"]
VITS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
FULL_SIZE_FAST = ["RN50", "ViT-B-32"]
# Tiny architectures for the format plumbing. Head counts follow OpenAI's rule (width / 64, ResNet pooling
# 32 * width / 64) so OpenAI's build_model reads the exports.
TINY_RN = ModelConfig(
    embed_dim=32,
    vision_cfg=VisionConfig(image_size=64, layers=(1, 2, 1, 1), width=16, patch_size=None),
    text_cfg=TextConfig(context_length=16, width=64, heads=1, layers=2),
    quick_gelu=True,
)
TINY_VIT = ModelConfig(
    embed_dim=32,
    vision_cfg=VisionConfig(image_size=32, layers=2, width=64, patch_size=8),
    text_cfg=TextConfig(context_length=16, width=64, heads=1, layers=2),
    quick_gelu=True,
)


def small(name: str) -> ModelConfig:
    """`name` with one block per ResNet stage / one transformer block per tower."""
    cfg = clipforge.get_model_config(name)
    return reduced(cfg, (1, 1, 1, 1) if cfg.vision_cfg.is_resnet else 1, 1)


def openai_reference(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random CLIP as OpenAI's code builds and ships it: its constructor, then its `build_model` (which
    infers the architecture from the state dict and rounds weights to fp16), back in fp32 for comparison."""
    ref_module = openai_model_module()
    torch.manual_seed(seed)
    source = perturb_(openai_clip(cfg), seed)
    built = ref_module.build_model(source.state_dict())
    del source
    gc.collect()
    return built.float().eval()


def inputs(cfg: ModelConfig, images: int = 2, texts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    t = cfg.text_cfg
    images_ = random_images(images, cfg.vision_cfg.image_size, seed=1)
    return images_, random_tokens(texts, t.context_length, t.vocab_size)


@torch.no_grad()
def reference_outputs(ref: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image": ref.encode_image(images),
        "text": ref.encode_text(tokens),
        "logits": ref(images, tokens)[0],
    }


@torch.no_grad()
def assert_matches(model: torch.nn.Module, expected: dict[str, torch.Tensor], images, tokens) -> None:
    got = {"image": model.encode_image(images), "text": model.encode_text(tokens)}
    if "logits" in expected:  # clipforge's models; other clients are compared on the features
        got["logits"] = model.logits(images, tokens)[0]
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def add_openai_extras(ref: torch.nn.Module, cfg: ModelConfig) -> None:
    """OpenAI's released archives also carry their sizes as tensors; loaders must skip them."""
    for name in ("context_length", "vocab_size"):  # plain ints on the reference module: make them tensors
        ref.__dict__.pop(name, None)
    ref.register_buffer("input_resolution", torch.tensor(cfg.vision_cfg.image_size))
    ref.register_buffer("context_length", torch.tensor(cfg.text_cfg.context_length))
    ref.register_buffer("vocab_size", torch.tensor(cfg.text_cfg.vocab_size))


def save_torchscript(ref: torch.nn.Module, cfg: ModelConfig, path: Path) -> None:
    """Trace the reference and store its matrices in fp16, as OpenAI's released archives are."""
    add_openai_extras(ref, cfg)
    images, tokens = inputs(cfg, images=1, texts=1)
    traced = torch.jit.trace(ref, (images, tokens), check_trace=False)
    for _, param in traced.named_parameters():
        # build_model rounded conv, linear, attention and projection weights to fp16: store those as fp16.
        if param.dim() >= 1 and torch.equal(param.data, param.data.half().float()):
            param.data = param.data.half()
    traced.save(str(path))


def check_openai_formats(name: str, cfg: ModelConfig, tmp_path: Path, torchscript: bool) -> None:
    ref = openai_reference(cfg)
    images, tokens = inputs(cfg, images=1 if cfg.vision_cfg.image_size > 300 else 2)
    expected = reference_outputs(ref, images, tokens)
    torch.save(ref.state_dict(), tmp_path / "openai.pt")
    with pytest.raises(CheckpointFormatError, match="does not say its activation .*model_name="):
        load_model(tmp_path / "openai.pt")  # the same tensors fit a GELU model: never guessed
    model = load_model(tmp_path / "openai.pt", cfg)
    assert model.config.vision_cfg.num_heads == clipforge.get_model_config(name).vision_cfg.num_heads
    assert_matches(model, expected, images, tokens)
    del model
    gc.collect()
    if torchscript:
        save_torchscript(ref, cfg, tmp_path / "openai-jit.pt")
        del ref
        model = load_model(tmp_path / "openai-jit.pt")  # OpenAI's archives are QuickGELU, 64-wide heads
        assert model.config.quick_gelu and model.config.vision_cfg.num_heads == cfg.vision_cfg.num_heads
        assert model.preprocess_cfg.mode == "openai"
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert_matches(model, expected, images, tokens)


# ---------------------------------------------------------------- OpenAI files: state dict and TorchScript


@pytest.mark.parametrize("name", FULL_SIZE_FAST)
def test_openai_files_full_size(name: str, tmp_path: Path) -> None:
    check_openai_formats(name, clipforge.get_model_config(name), tmp_path, torchscript=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RESNETS + VITS if n not in FULL_SIZE_FAST])
def test_openai_state_dict_full_size(name: str, tmp_path: Path) -> None:
    check_openai_formats(name, clipforge.get_model_config(name), tmp_path, torchscript=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESNETS + VITS)
def test_openai_files_every_architecture_reduced_depth(name: str, tmp_path: Path) -> None:
    check_openai_formats(name, small(name), tmp_path, torchscript=True)


# ---------------------------------------------------------------- Hugging Face CLIPModel folders


def hf_reference(cfg: ModelConfig, seed: int = 0):
    """transformers.CLIPModel for the architecture, configured here independently of clipforge's mapping."""
    from transformers import CLIPConfig, CLIPModel

    v, t = cfg.vision_cfg, cfg.text_cfg
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    config = CLIPConfig(
        text_config={"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": 4 * t.width,
                     "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                     "max_position_embeddings": t.context_length, "hidden_act": act,
                     "bos_token_id": 49406, "eos_token_id": 49407},
        vision_config={"hidden_size": v.width, "intermediate_size": 4 * v.width, "num_hidden_layers": v.layers,
                       "num_attention_heads": v.width // 64, "image_size": v.image_size,
                       "patch_size": v.patch_size, "hidden_act": act},
        projection_dim=cfg.embed_dim,
    )
    torch.manual_seed(seed)
    return perturb_(CLIPModel(config), seed).eval()


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def hf_outputs(hf, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image": _features(hf.get_image_features(pixel_values=images)),
        "text": _features(hf.get_text_features(input_ids=tokens)),
        "logits": hf(input_ids=tokens, pixel_values=images).logits_per_image,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", VITS)
def test_hf_folder_reduced_depth(name: str, tmp_path: Path) -> None:
    cfg = small(name)
    hf = hf_reference(cfg)
    hf.save_pretrained(tmp_path / "hf")
    images, tokens = inputs(cfg)
    model = load_model(tmp_path / "hf", cfg)
    assert_matches(model, hf_outputs(hf, images, tokens), images, tokens)


def test_hf_folder_full_size_vit_b_32(tmp_path: Path) -> None:
    cfg = clipforge.get_model_config("ViT-B-32")
    hf = hf_reference(cfg)
    hf.save_pretrained(tmp_path / "hf")
    images, tokens = inputs(cfg)
    expected = hf_outputs(hf, images, tokens)
    del hf
    model = load_model(tmp_path / "hf")  # architecture from config.json alone
    assert model.config.vision_cfg.layers == 12 and model.config.quick_gelu
    assert_matches(model, expected, images, tokens)


def test_hf_folder_pytorch_bin_and_gelu(tmp_path: Path) -> None:
    """An older folder layout: weights in pytorch_model.bin (read with weights_only=True); GELU towers."""
    cfg = dataclasses.replace(TINY_VIT, quick_gelu=False)
    hf = hf_reference(cfg)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    images, tokens = inputs(cfg)
    model = load_model(tmp_path / "hf")
    assert not model.config.quick_gelu
    assert_matches(model, hf_outputs(hf, images, tokens), images, tokens)


# ---------------------------------------------------------------- OpenCLIP checkpoints


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
@pytest.mark.parametrize("base", [TINY_RN, TINY_VIT], ids=["resnet", "vit"])
def test_openclip_training_checkpoint(base: ModelConfig, quick_gelu: bool, tmp_path: Path) -> None:
    """{"epoch", "state_dict": {"module.…"}} as OpenCLIP's trainer writes it, for a GELU (OpenCLIP's default)
    and a `-quickgelu` model: the file cannot tell them apart, so the caller names the activation."""
    cfg = dataclasses.replace(base, quick_gelu=quick_gelu)
    torch.manual_seed(0)
    ref = perturb_(openclip_clip(cfg))
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    images, tokens = inputs(cfg)
    with pytest.raises(CheckpointFormatError, match="read as OpenCLIP checkpoint.*quick_gelu=True\\|False"):
        load_model(tmp_path / "epoch_3.pt")
    model = load_model(tmp_path / "epoch_3.pt", dataclasses.replace(cfg, quick_gelu=not quick_gelu),
                       quick_gelu=quick_gelu)
    assert model.config.quick_gelu == quick_gelu
    with torch.no_grad():
        expected = {"image": ref.encode_image(images), "text": ref.encode_text(tokens)}
    assert_matches(model, expected, images, tokens)


def test_openclip_safetensors_and_hub_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = TINY_VIT  # QuickGELU, declared by the hub folder's config
    torch.manual_seed(0)
    ref = perturb_(openclip_clip(cfg))
    images, tokens = inputs(cfg)
    with torch.no_grad():
        expected = {"image": ref.encode_image(images), "text": ref.encode_text(tokens)}
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": openclip_model_cfg(cfg)}))
    assert_matches(load_model(folder), expected, images, tokens)
    with pytest.raises(CheckpointFormatError, match="read as safetensors file"):
        load_model(folder / "open_clip_model.safetensors")  # the file alone: no config
    assert_matches(load_model(folder / "open_clip_model.safetensors", cfg), expected, images, tokens)


# ---------------------------------------------------------------- clipforge's own model file


def test_clipforge_model_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from clipforge.config import to_dict

    cfg = clipforge.get_model_config("ViT-Micro-8-32")  # 2 heads at width 64: not inferable from shapes
    torch.manual_seed(0)
    source = perturb_(clipforge.create_model(cfg)).eval()
    metadata = {"format": "clipforge", "model_config": json.dumps(to_dict(cfg))}
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "m.safetensors"), metadata)
    model = load_model(tmp_path / "m.safetensors")
    assert model.config == cfg
    images, tokens = inputs(cfg)
    with torch.no_grad():
        expected = {"image": source.encode_image(images), "text": source.encode_text(tokens)}
    assert_matches(model, expected, images, tokens)
    created = clipforge.create_model("ViT-Micro-8-32", pretrained=tmp_path / "m.safetensors")
    assert_matches(created, expected, images, tokens)


# ---------------------------------------------------------------- round trips through other layouts


def _ours(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = perturb_(clipforge.create_model(cfg), seed).eval()
    with torch.no_grad():  # fp16-representable weights: OpenAI's build_model rounds to fp16 when reading
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


@torch.no_grad()
def own_outputs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image": model.encode_image(images), "text": model.encode_text(tokens),
            "logits": model.logits(images, tokens)[0]}


def read_back(path: Path, name: str | ModelConfig) -> list[torch.nn.Module]:
    """The export loaded the two ways README promises: the file alone, and the named architecture."""
    return [load_model(path), clipforge.create_model(name, pretrained=path)]


def open_clip_client(open_clip, weights: Path, sidecar: Path, folder: Path) -> torch.nn.Module:
    """OpenCLIP itself reading an export: its hub layout (`local-dir:`) from the weights and the sidecar."""
    folder.mkdir()
    (folder / "open_clip_config.json").write_bytes(sidecar.read_bytes())
    (folder / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    return open_clip.create_model(f"local-dir:{folder}").float().eval()


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_round_trip_hf(quick_gelu: bool, tmp_path: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    cfg = dataclasses.replace(TINY_VIT, quick_gelu=quick_gelu)
    ours = _ours(cfg)
    export_hf(ours, tmp_path / "hf")
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = inputs(cfg)
    expected = hf_outputs(hf, images, tokens)
    assert_matches(ours, expected, images, tokens)
    for back in read_back(tmp_path / "hf", cfg):
        assert back.config.quick_gelu == quick_gelu
        assert_matches(back, expected, images, tokens)
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "hf")  # the preprocessing travels too
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 32}


@pytest.mark.parametrize("cfg", [TINY_RN, TINY_VIT], ids=["resnet", "vit"])
def test_round_trip_openai(cfg: ModelConfig, tmp_path: Path, open_clip) -> None:
    ours = _ours(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # OpenAI's conventions hold for these: no note
        export_openai(ours, tmp_path / "openai.pt")
    ref = openai_model_module().build_model(torch.load(tmp_path / "openai.pt", weights_only=True)).float().eval()
    images, tokens = inputs(cfg)
    expected = reference_outputs(ref, images, tokens)
    assert_matches(ours, expected, images, tokens)
    for back in read_back(tmp_path / "openai.pt", cfg):
        assert_matches(back, expected, images, tokens)
    client = open_clip_client(open_clip, tmp_path / "openai.pt", tmp_path / "openai.pt.json", tmp_path / "oc")
    assert_matches(client, {k: expected[k] for k in ("image", "text")}, images, tokens)


@pytest.mark.parametrize("cfg", [TINY_RN, TINY_VIT, small("ViT-B-32")], ids=["resnet", "vit", "vit-b-32-1-block"])
def test_round_trip_openclip(cfg: ModelConfig, tmp_path: Path, open_clip) -> None:
    ours = _ours(cfg)
    export_openclip(ours, tmp_path / "openclip.pt")
    ref = openclip_clip(cfg)
    ref.load_state_dict(torch.load(tmp_path / "openclip.pt", weights_only=True)["state_dict"], strict=True)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        expected = {"image": ref.encode_image(images), "text": ref.encode_text(tokens)}
    assert_matches(ours, expected, images, tokens)
    for back in read_back(tmp_path / "openclip.pt", cfg):
        assert back.config.quick_gelu == cfg.quick_gelu
        assert_matches(back, expected, images, tokens)
    client = open_clip_client(open_clip, tmp_path / "openclip.pt", tmp_path / "openclip.pt.json", tmp_path / "oc")
    assert_matches(client, expected, images, tokens)


@pytest.mark.parametrize("to", ["openai", "openclip"])
def test_rn_tiny_64_export_keeps_heads_and_activation(to: str, tmp_path: Path, open_clip) -> None:
    """RN-Tiny-64: 8 attention-pooling heads over 1024 channels (OpenAI's rule says 16), GELU. The .pt cannot
    say either; the sidecar does, so the file reads back exactly, in clipforge and in OpenCLIP."""
    cfg = clipforge.get_model_config("RN-Tiny-64")
    ours = _ours(cfg)
    path = tmp_path / f"{to}.pt"
    if to == "openai":
        with pytest.warns(UserWarning, match="8 image attention heads .*builds 16.*GELU .*openai.pt.json"):
            export_openai(ours, path)
    else:
        export_openclip(ours, path)
    images, tokens = inputs(cfg)
    expected = own_outputs(ours, images, tokens)
    for back in read_back(path, "RN-Tiny-64"):
        assert back.config == cfg and back.config.vision_cfg.num_heads == 8
        assert_matches(back, expected, images, tokens)
    client = open_clip_client(open_clip, path, tmp_path / f"{to}.pt.json", tmp_path / "oc")
    assert_matches(client, {k: v for k, v in expected.items() if k != "logits"}, images, tokens)
    # Without the sidecar the file is ambiguous: refused, never read with OpenAI's head rule.
    (tmp_path / f"{to}.pt.json").unlink()
    with pytest.raises(CheckpointFormatError, match="does not say its activation"):
        load_model(path)
    assert_matches(load_model(path, "RN-Tiny-64"), expected, images, tokens)


def test_openclip_hub_folder_export(tmp_path: Path, open_clip) -> None:
    """`export_openclip` to a path without extension: OpenCLIP's hub layout, read by open_clip as it is, with
    OpenCLIP's own preprocessing from `preprocess_cfg` (equal to ours in `openai` mode, bit for bit)."""
    from PIL import Image

    from clipforge.transforms import EvalTransform, PreprocessConfig

    cfg = clipforge.get_model_config("RN-Tiny-64")
    ours = _ours(cfg)
    assert export_openclip(ours, tmp_path / "hub") == tmp_path / "hub"
    images, tokens = inputs(cfg)
    expected = own_outputs(ours, images, tokens)
    client, _, client_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    assert_matches(client.float().eval(), {k: expected[k] for k in ("image", "text")}, images, tokens)
    back = load_model(tmp_path / "hub")
    assert back.config == cfg and back.preprocess_cfg == PreprocessConfig("clipforge", 64)
    assert_matches(back, expected, images, tokens)
    palette = Image.fromarray((torch.arange(90 * 70) % 4).reshape(90, 70).to(torch.uint8).numpy(), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 200, 20] + [0] * 756)
    assert torch.equal(client_preprocess(palette), EvalTransform(64, "openai")(palette))


def test_sidecar_of_other_bytes_is_refused(tmp_path: Path) -> None:
    export_openai(_ours(TINY_VIT), tmp_path / "m.pt")
    torch.save(_ours(TINY_VIT, seed=1).state_dict(), tmp_path / "m.pt")  # replaced after the export
    with pytest.raises(CheckpointFormatError, match="m.pt.json: describes other bytes than m.pt"):
        load_model(tmp_path / "m.pt")


def test_export_openai_of_gelu_model_says_so(tmp_path: Path) -> None:
    """A GELU model: OpenAI's clip.load would build QuickGELU from the file and be off; the export says so, and
    clipforge reads it exactly through the sidecar."""
    cfg = dataclasses.replace(TINY_VIT, quick_gelu=False)
    ours = _ours(cfg)
    with pytest.warns(UserWarning, match="cannot represent GELU"):
        export_openai(ours, tmp_path / "m.pt")
    images, tokens = inputs(cfg)
    expected = own_outputs(ours, images, tokens)
    assert_matches(load_model(tmp_path / "m.pt"), expected, images, tokens)
    ref = openai_model_module().build_model(torch.load(tmp_path / "m.pt", weights_only=True)).float().eval()
    with torch.no_grad():  # what the note warns about: OpenAI's reader builds another model
        assert (ref.encode_text(tokens) - expected["text"]).abs().max() > 1e-3


def test_export_hf_refuses_resnet(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="no ResNet"):
        export_hf(clipforge.create_model(TINY_RN), tmp_path / "hf")


# ---------------------------------------------------------------- architecture checks and bad files


def test_named_architecture_mismatch_names_the_key(tmp_path: Path) -> None:
    torch.save(clipforge.create_model(TINY_VIT).state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointFormatError) as info:
        load_model(tmp_path / "m.pt", dataclasses.replace(TINY_VIT, embed_dim=64))
    message = str(info.value)
    assert "'embed_dim' is 32 in the checkpoint but 64 in the named architecture" in message
    assert str(tmp_path / "m.pt") in message and "\n" not in message
    with pytest.raises(CheckpointFormatError, match="'vision_cfg.layers' is 2 in the checkpoint but 12"):
        load_model(tmp_path / "m.pt", "ViT-B-32")
    export_openai(clipforge.create_model(TINY_RN), tmp_path / "r.pt")  # with its sidecar
    with pytest.raises(CheckpointFormatError, match="'embed_dim' is 32 in the checkpoint but 1024 in the named"):
        load_model(tmp_path / "r.pt", "RN50")
    with pytest.raises(CheckpointFormatError, match="quick_gelu=False contradicts the file's config"):
        load_model(tmp_path / "r.pt", quick_gelu=False)


def test_named_architecture_supplies_heads_and_activation(tmp_path: Path) -> None:
    cfg = clipforge.get_model_config("ViT-Micro-8-32")  # 2 heads of width 32: OpenAI's rule would say 1
    source = _ours(cfg)
    torch.save(source.state_dict(), tmp_path / "m.pt")
    images, tokens = inputs(cfg)
    expected = own_outputs(source, images, tokens)
    assert_matches(load_model(tmp_path / "m.pt", "ViT-Micro-8-32"), expected, images, tokens)
    flipped = load_model(tmp_path / "m.pt", "ViT-Micro-8-32", quick_gelu=not cfg.quick_gelu)
    assert flipped.config.quick_gelu != cfg.quick_gelu
    with pytest.raises(CheckpointFormatError, match="does not say its activation"):
        load_model(tmp_path / "m.pt", quick_gelu=cfg.quick_gelu)  # the heads are still unknown


def test_bare_open_clip_gelu_save_is_not_read_as_quickgelu(tmp_path: Path) -> None:
    """The layout of LAION's open_clip_pytorch_model.bin: a bare state dict of a GELU model. Before, it loaded
    as QuickGELU without a word; now it needs the activation, and reads exactly once given."""
    cfg = dataclasses.replace(small("ViT-B-32"), quick_gelu=False)
    torch.manual_seed(0)
    ref = perturb_(openclip_clip(cfg))
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    images, tokens = inputs(cfg)
    with torch.no_grad():
        expected = {"image": ref.encode_image(images), "text": ref.encode_text(tokens)}
    with pytest.raises(CheckpointFormatError, match="does not say its activation"):
        load_model(tmp_path / "open_clip_pytorch_model.bin")
    wrong = load_model(tmp_path / "open_clip_pytorch_model.bin", small("ViT-B-32"))  # ours is QuickGELU
    with torch.no_grad():
        assert (wrong.encode_text(tokens) - expected["text"]).abs().max() > 1e-3
    right = load_model(tmp_path / "open_clip_pytorch_model.bin", small("ViT-B-32"), quick_gelu=False)
    assert_matches(right, expected, images, tokens)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with (tmp_path / "evil.pkl").open("wb") as handle:
        pickle.dump({"w": _RunsCode(marker)}, handle)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(CheckpointFormatError, match="refused") as info:
            load_model(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    assert "posix.system" in str(pytest.raises(CheckpointFormatError, load_model, tmp_path / "evil.pt").value)


def test_malicious_torchscript_archive_is_refused(tmp_path: Path) -> None:
    """A TorchScript-shaped zip whose data.pkl calls os.system: only its pickle is read, and refused."""
    marker = tmp_path / "executed"
    with zipfile.ZipFile(tmp_path / "evil-jit.pt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_RunsCode(marker), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__/evil.py", "import os\nos.system('touch x')\n")
        archive.writestr("evil/version", "3\n")
    with pytest.raises(CheckpointFormatError, match="refused .*'posix.system'"):
        load_model(tmp_path / "evil-jit.pt")
    assert not marker.exists()


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated-" + path.name)
    out.write_bytes(data[: len(data) // 2])
    return out


def test_truncated_files_name_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = TINY_VIT
    model = clipforge.create_model(cfg)
    export_openai(model, tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    ref = openai_reference(cfg)
    save_torchscript(ref, cfg, tmp_path / "jit.pt")
    for path in (tmp_path / "m.pt", tmp_path / "m.safetensors", tmp_path / "jit.pt"):
        broken = _truncate(path)
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as info:
            load_model(broken)
        assert str(broken) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: torch.save([torch.zeros(1)], p), "expected a state dict"),
        (lambda p: torch.save({"w": 3}, p), "'w' is a int, not a tensor"),
        (lambda p: torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, p), "missing tensor"),
    ],
)
def test_bad_content_errors(make, match: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointFormatError, match=match):
        load_model(path)


def test_unknown_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="no such file"):
        load_model(tmp_path / "nothing.pt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointFormatError, match="model_type is 'bert'"):
        load_model(tmp_path / "bert")
    with pytest.raises(CheckpointFormatError, match="a folder must be"):
        load_model(tmp_path)
