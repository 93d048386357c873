"""Shapes, the causal mask, end-of-text pooling and parameter names of the CLIP model."""

import math

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.models.config import VisionConfig


def test_registry_lists_paper_and_tiny_configs():
    names = clipforge.list_models()
    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-Tiny-8-64", "ViT-Micro-8-32"):
        assert name in names


def test_vit_b_32_parameter_count_and_names():
    model = clipforge.create_model("ViT-B-32")
    # OpenAI's released ViT-B/32 has 151,277,313 parameters.
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    keys = set(model.state_dict())
    for key in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.ln_pre.weight", "visual.transformer.resblocks.11.attn.in_proj_weight",
                "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.ln_post.bias", "visual.proj",
                "transformer.resblocks.0.attn.out_proj.weight", "token_embedding.weight",
                "positional_embedding", "ln_final.weight", "text_projection", "logit_scale"):
        assert key in keys, key
    assert "visual.conv1.bias" not in keys  # patch embedding without bias
    assert model.state_dict()["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_output_shapes_and_normalisation(micro_model):
    images = torch.randn(3, 3, 32, 32)
    tokens = clipforge.get_tokenizer("ViT-Micro-8-32")(["a red circle", "a cat", "x"])
    assert tokens.shape == (3, 16)
    img, txt, scale = micro_model(images, tokens)
    assert img.shape == txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    raw = micro_model.encode_image(images)
    assert torch.allclose(F.normalize(raw, dim=-1), img, atol=1e-6)


def test_text_is_causal_and_pooled_at_end_of_text(micro_model):
    tokens = clipforge.get_tokenizer("ViT-Micro-8-32")(["a red circle on the left"])
    eot = int(tokens.argmax())
    base = micro_model.encode_text(tokens)
    # Changing tokens after the end-of-text position must not change the features (causal mask + pooling).
    changed = tokens.clone()
    changed[0, eot + 1:] = 1234
    assert torch.allclose(micro_model.encode_text(changed), base, atol=1e-6)
    # Changing a token before it must.
    earlier = tokens.clone()
    earlier[0, 2] = 999
    assert not torch.allclose(micro_model.encode_text(earlier), base, atol=1e-4)


def test_text_features_equal_manual_forward_with_explicit_mask(micro_model):
    """Recompute the text tower by hand with an explicit -inf upper-triangular mask and gather at argmax."""
    m = micro_model
    tokens = clipforge.get_tokenizer("ViT-Micro-8-32")(["a blue star", "two small green hearts and a cross"])
    x = m.token_embedding(tokens) + m.positional_embedding
    length = tokens.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for block in m.transformer.resblocks:
        h = block.ln_1(x)
        attn = torch.nn.functional.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), h.shape[-1], block.attn.heads,
            block.attn.in_proj_weight, block.attn.in_proj_bias, None, None, False, 0.0,
            block.attn.out_proj.weight, block.attn.out_proj.bias, training=False, attn_mask=mask,
            need_weights=False)[0].transpose(0, 1)
        x = x + attn
        x = x + block.mlp(block.ln_2(x))
    x = m.ln_final(x)
    expected = torch.stack([x[i, tokens[i].tolist().index(49407)] for i in range(2)]) @ m.text_projection
    assert torch.allclose(m.encode_text(tokens), expected, atol=1e-5)


def test_logit_scale_clamp(micro_model):
    with torch.no_grad():
        micro_model.logit_scale.fill_(10.0)
    micro_model.clamp_logit_scale()
    assert micro_model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_too_long_tokens_rejected(micro_model):
    with pytest.raises(ValueError, match="context length 16"):
        micro_model.encode_text(torch.zeros(1, 20, dtype=torch.long))


def test_vision_config_validation():
    from clipforge.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="patch_size"):
        from_dict(VisionConfig, {"image_size": 30, "patch_size": 8})


def test_channels_last_resnet_gives_the_same_features():
    from clipforge.models.resnet import use_channels_last

    torch.manual_seed(0)
    model = clipforge.create_model("RN-Tiny-64").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(images)
        use_channels_last(model.visual)
        after = model.encode_image(images)
    assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(before, after, atol=1e-5)


def test_inference_loaders_give_resnets_channels_last_with_the_same_features_and_fingerprint(tmp_path):
    """`clipforge eval` (eval.resolve) and embed/search (search.encoder) store a ResNet's convolutions NHWC, as
    training does; features match the float64 NCHW model and the index fingerprint ignores the layout."""
    from clipforge.checkpoint import save_model
    from clipforge.convert import load_model
    from clipforge.eval.resolve import resolve_model
    from clipforge.search.encoder import load_encoder
    from clipforge.search.fingerprint import model_fingerprint

    torch.manual_seed(0)
    path = save_model(clipforge.create_model("RN-Tiny-64").eval(), tmp_path / "rn.safetensors")
    plain = load_model(path).eval()
    assert plain.visual.conv1.weight.is_contiguous()  # loaded NCHW
    model, _ = resolve_model(str(path))
    encoder = load_encoder(str(path), "torch", "cpu")
    for loaded in (model, encoder.model):
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in loaded.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert encoder.fingerprint == model_fingerprint(plain)  # indexes built before keep matching
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = plain.double().encode_image(images.double(), normalize=True)
        got = model.encode_image(images, normalize=True)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(encoder.encode_image(images)).double(), want, rtol=0, atol=1e-5)
