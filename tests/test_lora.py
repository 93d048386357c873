"""LoRA: zero adapters equal the base model; the adapted weight is W + (alpha / r) B A (checked in float64 by hand);
only adapters train; the run's file and its exports load as plain models equal to the adapted model; bad targets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoint import save_model
from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.models.lora import add_lora, has_lora, match_targets, merge_lora, merge_lora_state_dict
from clipforge.train.loop import train
from run_helpers import tiny_config
from test_dist import make_batch


def _model(name: str = "ViT-Micro-8-32") -> torch.nn.Module:
    torch.manual_seed(0)
    return clipforge.create_model(name).eval()


@pytest.mark.parametrize("name", ["ViT-Micro-8-32", "RN-Tiny-64"])
def test_zero_adapters_equal_the_base_model(name):
    base, adapted = _model(name), _model(name)
    chosen = add_lora(adapted, rank=4, alpha=8.0, targets=["attn", "mlp"])
    assert chosen and has_lora(adapted)
    images, tokens = make_batch()
    images = torch.nn.functional.interpolate(images, size=base.image_size)
    with torch.no_grad():
        for a, b in zip(base(images, tokens), adapted(images, tokens)):
            # B = 0: W + 0 is W exactly; the ResNet's CPU convolutions are not bitwise repeatable between calls
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(chosen)


def test_adapted_weight_is_w_plus_scaled_ba():
    model = _model()
    add_lora(model, rank=2, alpha=6.0, targets=["text.attn"])
    block = model.transformer.resblocks[0].attn
    lora = block.parametrizations.in_proj_weight[0]
    with torch.no_grad():
        lora.lora_B.normal_()
    w = block.parametrizations.in_proj_weight.original.double()
    expected = w + 3.0 * lora.lora_B.double() @ lora.lora_A.double()  # alpha / r = 3
    torch.testing.assert_close(block.in_proj_weight.double(), expected, rtol=1e-6, atol=1e-6)
    # only the text tower: no adapter in the image tower
    assert not any("parametrizations" in n for n, _ in model.visual.named_parameters())


def test_targets_select_towers_and_patterns():
    model = _model()
    assert all(n.startswith("visual.") for n in match_targets(model, ["visual.mlp"]))
    assert match_targets(model, ["text_projection"]) == ["text_projection"]
    assert len(match_targets(model, ["*.resblocks.0.mlp.c_fc.weight"])) == 2  # both towers


def test_bad_targets_name_the_available_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'finetune.lora_targets': 'q_proj' matches no weight matrix .*available: "
                                          r"attn, mlp, .*transformer\.resblocks\.\*\.attn\.in_proj_weight"):
        add_lora(_model(), 4, 8.0, ["q_proj"])
    with pytest.raises(ConfigError, match="'finetune.lora_rank': LoRA already freezes"):
        tiny_config(tmp_path, "r", "--finetune.lora_rank=2", "--finetune.lock_image=true")
    code = main(["train", "--no-progress", "--model=ViT-Micro-8-32", "--data.synthetic.image_size=32",
                 f"--output_dir={tmp_path}", "--finetune.lora_rank=2", "--finetune.lora_targets=[nothing]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "'nothing' matches no weight matrix" in err


def test_lora_run_trains_adapters_only_and_its_files_load_as_plain_models(tmp_path):
    init = tmp_path / "init.safetensors"
    save_model(_model(), init)
    cfg = tiny_config(tmp_path, "lora", "--steps=4", f"--finetune.init={init}", "--finetune.lora_rank=2",
                      "--finetune.lora_alpha=4", "--optim.lr=0.05")
    result = train(cfg, progress=False)
    stored = load_file(str(result.run_dir / "model.safetensors"))
    base = load_file(str(init))
    originals = {k: v for k, v in stored.items() if k.endswith(".original")}
    assert originals and not any(torch.equal(v, torch.zeros_like(v)) for k, v in stored.items() if "lora_B" in k)
    for key, value in stored.items():  # every base weight unchanged, bitwise
        plain = key.replace("parametrizations.", "").replace(".original", "")
        if key.endswith(".original") or "parametrizations" not in key:
            assert torch.equal(value, base[plain]), key

    adapted = _model()
    add_lora(adapted, 2, 4.0, ["attn", "mlp"])
    adapted.load_state_dict(stored)
    loaded = clipforge.load_model(result.run_dir / "model.safetensors")  # merged on reading
    assert not has_lora(loaded) and set(loaded.state_dict()) == set(base)
    out = tmp_path / "exported.pt"
    assert main(["export", "--model", str(result.run_dir / "model.safetensors"), "--to", "openclip",
                 "--output", str(out)]) == 0
    exported = clipforge.create_model("ViT-Micro-8-32", pretrained=str(out)).eval()
    images, tokens = make_batch()
    with torch.no_grad():
        want = adapted(images, tokens)
        for model in (loaded, exported, merge_lora(adapted)):
            for a, b in zip(want, model(images, tokens)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(merge_lora_state_dict(stored)) == set(base)
