"""Feature extraction and its disk cache, with a small real CLIP model and images made here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.data.base import CaptionDataset, CaptionRecord
from clipforge.eval.features import cache_path, cached_image_features, encode_images, model_checksum
from clipforge.factory import create_model
from clipforge.registry import list_models
from clipforge.transforms import EvalTransform

TINY = "ViT-Micro-8-32" if "ViT-Micro-8-32" in list_models() else "ViT-Tiny-8-64"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(TINY).eval()


@pytest.fixture()
def dataset(tmp_path: Path, model) -> CaptionDataset:
    records = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 36), (40 * i, 255 - 40 * i, 17 * i)).save(path)
        records.append(CaptionRecord(path, (f"colour {i}",), label=i % 2))
    return CaptionDataset(records, EvalTransform(model.image_size), classnames=["a", "b"], name="toy")


def test_encode_images_matches_the_model(model, dataset) -> None:
    features, targets = encode_images(model, dataset, batch_size=2)
    assert features.shape[0] == 5 and targets == [[f"colour {i}"] for i in range(5)]
    with torch.no_grad():
        direct = model.encode_image(torch.stack([dataset[i][0] for i in range(5)]))
    torch.testing.assert_close(features, torch.nn.functional.normalize(direct, dim=-1), rtol=1e-5, atol=1e-5)


def test_cache_hit_and_invalidation(model, dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    classification = dataset.as_classification()
    first, labels = cached_image_features(model, classification, "toy/test", cache)
    assert labels.tolist() == [0, 1, 0, 1, 0]
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("toy-test-")

    # a hit must come from the file, without running the model
    calls = []
    original = model.encode_image
    model.encode_image = lambda images, **kw: calls.append(1) or original(images, **kw)  # type: ignore[method-assign]
    try:
        again, again_labels = cached_image_features(model, classification, "toy/test", cache)
    finally:
        del model.encode_image
    assert calls == [] and again_labels.tolist() == labels.tolist()
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    changed = create_model(TINY).eval()
    changed.load_state_dict(model.state_dict())
    assert model_checksum(changed) == model_checksum(model)
    with torch.no_grad():
        changed.visual.conv1.weight.add_(0.5)
    assert model_checksum(changed) != model_checksum(model)
    moved, _ = cached_image_features(changed, classification, "toy/test", cache)
    assert len(list(cache.glob("*.safetensors"))) == 2  # new weights, new entry
    assert not torch.allclose(moved, first)


def test_cache_key_covers_preprocessing_and_size() -> None:
    a = cache_path("/c", "emoji/test", "abc", EvalTransform(32), 10)
    assert a != cache_path("/c", "emoji/test", "abc", EvalTransform(64), 10)
    assert a != cache_path("/c", "emoji/test", "abc", EvalTransform(32), 11)
    assert a != cache_path("/c", "emoji/val", "abc", EvalTransform(32), 10)
    assert a != cache_path("/c", "emoji/test", "abd", EvalTransform(32), 10)
    assert a == cache_path("/c", "emoji/test", "abc", EvalTransform(32), 10)


def test_inputs_go_to_the_device_of_the_model_unless_told():
    from clipforge.eval.features import input_device

    on_meta = torch.nn.Linear(2, 2, device="meta")  # stands in for a model on a GPU: not the CPU
    assert input_device(on_meta) == torch.device("meta")
    assert input_device(on_meta, "cpu") == torch.device("cpu")
    assert input_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters: the CPU
