"""The modified ResNet tower against OpenAI's clip/model.py, and the architectures' published sizes."""

from __future__ import annotations

import pytest
import torch

import clipforge
from clip_reference import openai_model_module, perturb_
from clipforge.config import ConfigError, from_dict
from clipforge.models.config import ModelConfig, VisionConfig
from clipforge.models.resnet import ModifiedResNet

# Total parameter counts of OpenAI's released models as reported by `clip.load` (sum of model.parameters()).
PUBLISHED_PARAMETERS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}
# The paper's ResNets (Radford et al. 2021, and OpenAI's release): stage depths, stem width, resolution,
# embedding size, text width.
PAPER_RESNETS = {
    "RN50": ((3, 4, 6, 3), 64, 224, 1024, 512),
    "RN101": ((3, 4, 23, 3), 64, 224, 512, 512),
    "RN50x4": ((4, 6, 10, 6), 80, 288, 640, 640),
    "RN50x16": ((6, 8, 18, 8), 96, 384, 768, 768),
    "RN50x64": ((3, 15, 36, 10), 128, 448, 1024, 1024),
}


def _tower_pair(layers: tuple[int, ...], width: int, image_size: int, output_dim: int, seed: int = 0):
    ref_module = openai_model_module()
    torch.manual_seed(seed)
    ref = ref_module.ModifiedResNet(list(layers), output_dim, width * 32 // 64, image_size, width)
    perturb_(ref, seed)
    ours = ModifiedResNet(VisionConfig(image_size=image_size, layers=layers, width=width, patch_size=None), output_dim)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_state_dict_names_and_shapes_match_openai() -> None:
    ref, ours = _tower_pair((3, 4, 6, 3), 64, 224, 1024)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert "layer1.0.downsample.0.weight" in our_shapes and "layer1.0.downsample.1.running_var" in our_shapes


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rn50_tower_matches_openai(mode: str) -> None:
    ref, ours = _tower_pair((3, 4, 6, 3), 64, 224, 1024, seed=1)
    ref.train(mode == "train")
    ours.train(mode == "train")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(images)
        got = ours(images)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if mode == "train":  # batch statistics were used and the running averages moved identically
        torch.testing.assert_close(ours.layer4[0].bn1.running_mean, ref.layer4[0].bn1.running_mean, atol=1e-6, rtol=0)


def test_wide_resnet_tower_matches_openai() -> None:
    # RN50x4's widths, heads and resolution with one block per stage (the full depth runs in test_convert).
    ref, ours = _tower_pair((1, 1, 1, 1), 80, 288, 640, seed=3)
    images = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ref(images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(PAPER_RESNETS))
def test_resnet_configs_are_the_papers(name: str) -> None:
    layers, width, size, embed, text_width = PAPER_RESNETS[name]
    cfg = clipforge.get_model_config(name)
    v = cfg.vision_cfg
    found = (v.layers, v.width, v.image_size, cfg.embed_dim, cfg.text_cfg.width)
    assert found == (layers, width, size, embed, text_width)
    assert v.num_heads == width * 32 // 64 and cfg.text_cfg.heads == text_width // 64 and cfg.quick_gelu


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_openai_release(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = clipforge.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize(
    ("vision", "key"),
    [
        ({"layers": [3, 4, 6], "width": 64, "patch_size": None}, "vision_cfg.layers"),
        ({"layers": [3, 4, 6, 3], "width": 64, "image_size": 200, "patch_size": None}, "vision_cfg.image_size"),
        ({"layers": [3, 4, 6, 3], "width": 64, "heads": 30, "patch_size": None}, "vision_cfg.heads"),
    ],
)
def test_bad_resnet_config_names_the_key(vision: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(ModelConfig, {"vision_cfg": vision}, prefix="")
