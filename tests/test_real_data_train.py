"""Training on real image-caption data: a tiny manifest written here, and the offline corpora together."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.data.offline import prepare
from clipforge.train.config import load_train_config
from clipforge.train.data import CaptionPairs, build_train_dataset, shrink
from clipforge.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TrainTransform

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (240, 220, 30),
           "black": (10, 10, 10), "white": (250, 250, 250)}
TINY = ["--model=ViT-Micro-8-32", "--batch_size=4", "--log_every=1", "--data.num_workers=0", "--precision=fp32",
        "--optim.warmup_steps=1"]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Solid-colour images of several sizes; captions name the colour; one image has two captions."""
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 30 * i, 36 + 10 * i), rgb).save(tmp_path / f"{name}.png")
        split = "test" if name == "white" else "train"
        rows.append((f"{name}.png", f"a {name} square", split))
        if name == "red":
            rows.append((f"{name}.png", f"something {name}", split))
    path = tmp_path / "pairs.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    return path


def colour_of(tensor: torch.Tensor) -> str:
    """The name of the colour nearest to the mean pixel of a normalised image tensor [3, H, W]."""
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    rgb = (tensor.mean(dim=(1, 2)) * std + mean) * 255
    return min(COLOURS, key=lambda n: float(((rgb - torch.tensor(COLOURS[n], dtype=torch.float32)) ** 2).sum()))


@pytest.mark.parametrize("preload", [False, True])
def test_manifest_pairs_keep_each_caption_with_its_image(manifest: Path, tmp_path: Path, preload: bool) -> None:
    cfg = load_train_config(None, ["--data.source=manifest", f"--data.path={manifest}", "--data.split=train",
                                   f"--data.preload={str(preload).lower()}", "--model=ViT-Micro-8-32"])
    dataset, shuffle = build_train_dataset(cfg, 32)
    assert shuffle and len(dataset) == 6  # 5 train images, red with two captions
    for index in range(len(dataset)):
        image, caption = dataset[index][:2]  # the bad-data wrapper appends what it converted or skipped
        assert image.shape == (3, 32, 32)
        assert caption.split()[-2 if caption.startswith("a ") else -1] == colour_of(image)
    if preload:
        assert all(min(a.shape[:2]) <= 40 for a in dataset.preloaded)  # ceil(1.25 * 32) = 40


def test_preloaded_images_give_the_same_tensors_when_already_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)).save(paths[-1])
    from clipforge.data.base import CaptionDataset, CaptionRecord

    data = CaptionDataset([CaptionRecord(p, (f"noise {i}",)) for i, p in enumerate(paths)])
    direct = CaptionPairs([data], TrainTransform(16, seed=3))
    cached = CaptionPairs([data], TrainTransform(16, seed=3), preload_size=20)
    for i in range(3):
        assert torch.equal(direct[i][0], cached[i][0]) and direct[i][1] == cached[i][1]


def test_shrink_reduces_the_shorter_side_and_keeps_the_aspect(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGBA", (300, 100), (255, 0, 0, 0)).save(path)  # fully transparent: composited on white
    array = shrink(path, 40)
    assert array.shape == (40, 120, 3) and (array == 255).all()


def test_train_from_a_tiny_manifest_with_the_cli(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    assert main(["train", "--no-progress", "--output", str(out), f"--output_dir={tmp_path}", "--run_name=m",
                 "--data.source=manifest", f"--data.path={manifest}", "--data.split=train", "--steps=4",
                 *TINY]) == 0
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(np.isfinite(e["loss"]) for e in log)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    results = tmp_path / "ret.json"
    assert main(["eval", "retrieval", "--model", str(tmp_path / "m"), "--dataset", str(manifest), "--split",
                 "train", "--no-cache", "--output", str(results)]) == 0
    assert json.loads(results.read_text())["images"] == 5


@pytest.mark.parametrize("overrides,match", [
    (["--data.source=offline"], "list the offline datasets"),
    (["--data.source=manifest"], "'data.path': required"),
    (["--data.source=offline", "--data.datasets=[imagenet]"], "unknown dataset 'imagenet'"),
])
def test_bad_data_configs_are_clear(overrides: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg = load_train_config(None, overrides)
        build_train_dataset(cfg, 32)


def test_manifest_split_that_does_not_exist(manifest: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--no-progress", "--data.source=manifest", f"--data.path={manifest}",
                 "--data.split=validation", "--steps=1", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no rows in split 'validation' (splits present: test, train)" in err


def require(name: str) -> None:
    """Skip a local run that lacks the package `prepare` would install; never skip in CI (test_offline.py)."""
    if os.environ.get("CI"):
        return
    if name == "emoji" and shutil.which("npm") is None:
        pytest.skip("npm not installed (local run)")
    probes = {"tuxpaint": Path("/usr/share/tuxpaint/stamps"),
              "fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")}
    if name in probes and not probes[name].exists() and os.geteuid() != 0:
        pytest.skip(f"Debian package for {name} not installed and not root (local run)")


def test_offline_corpora_train_together(tmp_path: Path) -> None:
    require("emoji")
    require("tuxpaint")
    for name in ("emoji", "tuxpaint"):
        prepare(name, root=tmp_path)
    overrides = ["--data.source=offline", "--data.datasets=[emoji, tuxpaint]", f"--data.root={tmp_path}"]
    cfg = load_train_config(None, overrides + ["--model=ViT-Micro-8-32"])
    dataset, _ = build_train_dataset(cfg, 32)
    info = {n: json.loads((tmp_path / n / "info.json").read_text()) for n in ("emoji", "tuxpaint")}
    images = sum(i["splits"]["train"] for i in info.values())
    assert len(dataset.images) == images and len(dataset) >= images
    assert any("tuxpaint" in str(p) for p in dataset.images) and any("emoji" in str(p) for p in dataset.images)
    assert main(["train", "--no-progress", f"--output_dir={tmp_path}", "--run_name=o", "--steps=2", *overrides,
                 *TINY]) == 0


def test_a_classification_corpus_has_no_captions_to_train_on(tmp_path: Path) -> None:
    require("fashion-mnist")
    prepare("fashion-mnist", root=tmp_path)
    cfg = load_train_config(None, ["--data.source=offline", "--data.datasets=[fashion-mnist]",
                                   f"--data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="'fashion-mnist' has class labels but no captions"):
        build_train_dataset(cfg, 32)
