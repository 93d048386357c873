"""Fine-tuning from a checkpoint (`--init`) and locked towers (LiT) in the trainer."""

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoint import save_model
from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.train.config import load_train_config

RN = ["--model=RN-Tiny-64", "--batch_size=8", "--steps=2", "--log_every=1", "--precision=fp32",
      "--optim.warmup_steps=1", "--optim.lr=1e-2"]


def test_init_loads_the_checkpoint_and_locked_image_tower_stays_frozen(tmp_path):
    torch.manual_seed(123)
    start = clipforge.create_model("RN-Tiny-64")
    init = save_model(start, tmp_path / "init.safetensors")
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    assert main(["train", "--no-progress", "--init", str(init), f"--output_dir={tmp_path}", "--run_name=ft",
                 "--finetune.lock_image=true", *RN]) == 0
    final = load_file(tmp_path / "ft" / "model.safetensors")
    visual = [k for k in initial if k.startswith("visual.")]
    text = [k for k in initial if k.startswith("transformer.") or k == "token_embedding.weight"]
    # every image-tower tensor, BatchNorm running statistics included, is exactly the checkpoint's
    assert all(torch.equal(final[k], initial[k]) for k in visual)
    assert any("running_mean" in k for k in visual)
    # the text tower trained, starting from the checkpoint (not from a fresh init with the same seed)
    assert any(not torch.equal(final[k], initial[k]) for k in text)


def test_partially_unlocked_image_tower_trains_only_its_head(tmp_path):
    torch.manual_seed(0)
    start = clipforge.create_model("RN-Tiny-64")
    init = save_model(start, tmp_path / "init.safetensors")
    assert main(["train", "--no-progress", "--init", str(init), f"--output_dir={tmp_path}", "--run_name=ft",
                 "--finetune.lock_image=true", "--finetune.lock_image_unlocked_groups=1", *RN]) == 0
    final = load_file(tmp_path / "ft" / "model.safetensors")
    initial = start.state_dict()
    assert not torch.equal(final["visual.attnpool.c_proj.weight"], initial["visual.attnpool.c_proj.weight"])
    assert torch.equal(final["visual.layer1.0.conv1.weight"], initial["visual.layer1.0.conv1.weight"])


def test_finetune_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'finetune.init'"):
        load_train_config(None, [f"--finetune.init={tmp_path / 'missing.pt'}"])
    with pytest.raises(ConfigError, match="'finetune.lock_text_unlocked_layers'"):
        load_train_config(None, ["--finetune.lock_text_unlocked_layers=2"])


def test_freeze_bn_stats_keeps_running_statistics_while_every_weight_trains(tmp_path):
    torch.manual_seed(7)
    start = clipforge.create_model("RN-Tiny-64")
    init = save_model(start, tmp_path / "init.safetensors")
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    stats = [k for k in initial if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats
    for name, extra in (("frozen", ["--finetune.freeze_bn_stats=true"]), ("plain", [])):
        assert main(["train", "--no-progress", "--init", str(init), f"--output_dir={tmp_path}",
                     f"--run_name={name}", *RN, *extra]) == 0
    frozen = load_file(tmp_path / "frozen" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(frozen[k], initial[k]) for k in stats)
    assert not all(torch.equal(plain[k], initial[k]) for k in stats)  # without the flag they follow the data
    for key in ("visual.layer1.0.conv1.weight", "visual.bn1.weight", "visual.attnpool.c_proj.weight"):
        assert not torch.equal(frozen[key], initial[key]), key  # the weights (BatchNorm's affine ones too) train
