"""The eval preprocessing is stored with every checkpoint and export, and `eval --preprocess` chooses it: the
images each task encodes are exactly `EvalTransform(size, mode)` of the files (checked on palette and
transparent PNGs, where the two pipelines differ)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoint import save_model
from clipforge.cli import main
from clipforge.convert import export_hf, export_openai, export_openclip, load_model
from clipforge.eval.evaluators import EvalOptions, Session
from clipforge.transforms import EvalTransform, PreprocessConfig

from manifest_helpers import write_pairs_csv

MICRO = "ViT-Micro-8-32"


@pytest.fixture(scope="module")
def palette_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("palette")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        indices = rng.integers(0, 4, (5, 7)).repeat(9, axis=0).repeat(11, axis=1).astype(np.uint8)
        image = Image.fromarray(indices, "P")
        image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 30 * i, 200, 90] + [0] * 756)
        image.info["transparency"] = 3
        image.save(folder / f"p{i}.png", transparency=3)
        rows.append((f"p{i}.png", f"a palette picture number {i}", "test", "warm" if i % 2 else "cold"))
    return write_pairs_csv(folder, rows)


def micro_with(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = clipforge.create_model(MICRO).eval()
    model.preprocess_cfg = PreprocessConfig(mode, model.image_size)
    return model


@pytest.mark.parametrize("mode", ["openai", "clipforge"])
def test_eval_encodes_exactly_the_chosen_pipeline(mode: str, palette_manifest: Path) -> None:
    model = micro_with("clipforge")
    ev = Session(model, clipforge.get_tokenizer(MICRO), None, str(palette_manifest), EvalOptions(preprocess=mode))
    data = ev.source.captioned("test")
    assert ev.preprocess == mode
    for index in range(len(data.dataset)):
        tensor = data.dataset[index][0]
        image = Image.open(palette_manifest.parent / f"p{index}.png")
        assert torch.equal(tensor, EvalTransform(model.image_size, mode)(image))
    other = "clipforge" if mode == "openai" else "openai"
    assert not torch.equal(data.dataset[0][0], EvalTransform(model.image_size, other)(Image.open(
        palette_manifest.parent / "p0.png")))  # the choice matters on these files


def test_default_is_the_stored_pipeline_and_the_json_says_which(palette_manifest: Path, tmp_path: Path) -> None:
    save_model(micro_with("openai"), tmp_path / "m.safetensors")
    for extra, expected in (([], "openai"), (["--preprocess", "clipforge"], "clipforge")):
        out = tmp_path / f"r-{expected}.json"
        assert main(["eval", "retrieval", "--model", str(tmp_path / "m.safetensors"), "--dataset",
                     str(palette_manifest), "--no-cache", "--output", str(out), *extra]) == 0
        assert json.loads(out.read_text())["preprocess"] == expected


def test_preprocessing_travels_with_every_format(tmp_path: Path) -> None:
    """Stored in clipforge files, the sidecar of .pt exports (as OpenCLIP's preprocess_cfg) and HF folders;
    read back by load_model and used by create_model_and_transforms."""
    from clipforge.formats.openclip import sidecar_path

    model = micro_with("openai")
    stored = PreprocessConfig("openai", model.image_size)
    save_model(model, tmp_path / "m.safetensors")
    export_openai(model, tmp_path / "oa.pt")
    export_openclip(model, tmp_path / "oc.pt")
    export_hf(model, tmp_path / "hf")
    for path in (tmp_path / "m.safetensors", tmp_path / "oa.pt", tmp_path / "oc.pt", tmp_path / "hf"):
        assert load_model(path).preprocess_cfg == stored, path
    sidecar = json.loads(sidecar_path(tmp_path / "oc.pt").read_text())
    assert sidecar["preprocess_cfg"] == {"size": 32, "mean": list(stored.mean), "std": list(stored.std),
                                         "interpolation": "bicubic", "resize_mode": "shortest"}
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 32} and processor["resample"] == 3  # PIL bicubic
    _, _, preprocess = clipforge.create_model_and_transforms(MICRO, pretrained=tmp_path / "oc.pt")
    assert repr(preprocess) == "EvalTransform(size=32, mode='openai')"
    fresh = clipforge.create_model(MICRO)  # never loaded: clipforge's own pipeline
    save_model(fresh, tmp_path / "fresh.safetensors")
    assert load_model(tmp_path / "fresh.safetensors").preprocess_cfg == PreprocessConfig("clipforge", 32)
