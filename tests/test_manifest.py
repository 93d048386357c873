"""Manifests, caption folders, the dataset interfaces and the caption collate function."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.data.base import DatasetError, collate_captions, hash_split
from clipforge.data.folder import FolderDataset
from clipforge.data.manifest import ManifestColumns, ManifestDataset, read_manifest, write_manifest
from clipforge.transforms import EvalTransform


def make_image(path: Path, color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    make_image(tmp_path / "img" / "a.png", (255, 0, 0))
    make_image(tmp_path / "img" / "b.png", (0, 255, 0))
    make_image(tmp_path / "img" / "c.png", (0, 0, 255))
    return tmp_path


def test_tsv_several_rows_per_image(images: Path) -> None:
    manifest = write(
        images / "m.tsv",
        "image\tcaption\tsplit\tlabel\n"
        "img/a.png\ta red square\ttrain\tred\n"
        "img/b.png\ta green square\ttest\tgreen\n"
        "img/a.png\tred\ttrain\tred\n"
        f"{images / 'img' / 'c.png'}\ta blue square\ttrain\tblue\n",
    )
    entries = read_manifest(manifest)
    assert [e.image.name for e in entries] == ["a.png", "b.png", "c.png"]
    assert entries[0].captions == ["a red square", "red"]
    assert entries[2].image.is_absolute()

    train = ManifestDataset(manifest, split="train", transform=EvalTransform(16))
    assert len(train) == 2
    assert train.classnames == ["blue", "green", "red"]  # sorted over all splits, so indices agree
    image, captions = train[0]
    assert image.shape == (3, 16, 16) and captions == ["a red square", "red"]
    texts, owner = train.texts()
    assert texts == ["a red square", "red", "a blue square"] and owner.tolist() == [0, 0, 1]
    zero_shot = train.as_classification()
    assert [zero_shot.label(i) for i in range(len(zero_shot))] == [2, 0]


def test_csv_with_caption_separator_and_custom_columns(images: Path) -> None:
    manifest = write(images / "m.csv", 'filepath,title\nimg/a.png,"red, square|a red thing"\nimg/b.png,green\n')
    dataset = ManifestDataset(manifest, columns=ManifestColumns(image="filepath", caption="title"), caption_sep="|")
    assert dataset.captions(0) == ["red, square", "a red thing"]
    assert dataset.classnames is None
    with pytest.raises(DatasetError, match="no category labels"):
        dataset.as_classification()


def test_missing_column_names_it(images: Path) -> None:
    manifest = write(images / "m.tsv", "image\ttext\nimg/a.png\tx\n")
    with pytest.raises(DatasetError, match=r"m\.tsv: missing column 'caption' \(header has: image, text\)"):
        read_manifest(manifest)


def test_missing_file_names_row(images: Path) -> None:
    manifest = write(images / "m.tsv", "image\tcaption\nimg/a.png\tx\nimg/nope.png\ty\n")
    with pytest.raises(DatasetError, match=r"m\.tsv:3: image file 'img/nope.png' not found"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, check_files=False)) == 2


def test_empty_caption_and_conflicting_split(images: Path) -> None:
    empty = write(images / "e.tsv", "image\tcaption\nimg/a.png\t  \n")
    with pytest.raises(DatasetError, match=r"e\.tsv:2: empty 'caption' for image 'img/a.png'"):
        read_manifest(empty)
    conflict = write(images / "c.tsv", "image\tcaption\tsplit\nimg/a.png\tx\ttrain\nimg/a.png\ty\ttest\n")
    with pytest.raises(DatasetError, match=r"c\.tsv:3: image 'a.png' has split 'test' here but 'train' on line 2"):
        read_manifest(conflict)


def test_unknown_label_split_and_extension(images: Path) -> None:
    manifest = write(images / "m.tsv", "image\tcaption\tsplit\tlabel\nimg/a.png\tx\ttrain\tcat\n")
    with pytest.raises(DatasetError, match=r"m\.tsv:2: label 'cat' is not one of the 2 classes"):
        ManifestDataset(manifest, classnames=["dog", "bird"])
    with pytest.raises(DatasetError, match=r"no image in split 'test' \(splits present: train\)"):
        ManifestDataset(manifest, split="test")
    no_split = write(images / "n.tsv", "image\tcaption\nimg/a.png\tx\n")
    with pytest.raises(DatasetError, match="no 'split' column"):
        ManifestDataset(no_split, split="train")
    with pytest.raises(DatasetError, match="cannot tell the delimiter"):
        read_manifest(write(images / "m.txt", "image,caption\n"))
    with pytest.raises(DatasetError, match="manifest not found"):
        read_manifest(images / "absent.tsv")


def test_write_manifest_round_trip(images: Path) -> None:
    rows = [
        (str(images / "img" / "a.png"), "a caption with\ta tab", "train", "red"),
        (str(images / "img" / "a.png"), 'and "quotes"', "train", "red"),
        (str(images / "img" / "b.png"), "green", "val", ""),
    ]
    path = images / "out" / "manifest.tsv"
    assert write_manifest(path, rows) == 3
    entries = read_manifest(path)
    assert entries[0].captions == ["a caption with\ta tab", 'and "quotes"']
    assert entries[1].split == "val" and entries[1].label is None
    assert entries[0].image.resolve() == (images / "img" / "a.png").resolve()


def test_folder_with_sidecar_captions(tmp_path: Path) -> None:
    for name, color in (("cats/tom", (1, 2, 3)), ("cats/kit", (4, 5, 6)), ("dogs/rex", (7, 8, 9))):
        make_image(tmp_path / f"{name}.png", color)
        write(tmp_path / f"{name}.txt", f"a photo of {name}\n\n  another caption of {name}  \n")
    dataset = FolderDataset(tmp_path, transform=EvalTransform(8), label_from_folder=True)
    assert len(dataset) == 3
    assert dataset.classnames == ["cats", "dogs"]
    assert dataset.captions(0) == ["a photo of cats/kit", "another caption of cats/kit"]
    assert [dataset.records[i].label for i in range(3)] == [0, 0, 1]
    splits = {s: len(FolderDataset(tmp_path, split=s)) for s in ("train", "val", "test") if _has(tmp_path, s)}
    assert sum(splits.values()) == 3

    make_image(tmp_path / "dogs" / "nocaption.png")
    with pytest.raises(DatasetError, match=r"nocaption\.png: caption file nocaption\.txt is missing"):
        FolderDataset(tmp_path)
    assert len(FolderDataset(tmp_path, require_captions=False)) == 3


def _has(root: Path, split: str) -> bool:
    return any(hash_split(p.relative_to(root).as_posix()) == split for p in root.rglob("*.png"))


def test_collate_captions_maps_texts_to_images() -> None:
    batch = [(torch.zeros(3, 4, 4), ["a", "b"]), (torch.ones(3, 4, 4), ["c"]), (torch.zeros(3, 4, 4), ["d", "e", "f"])]
    images, texts, text_to_image = collate_captions(batch)
    assert images.shape == (3, 3, 4, 4)
    assert texts == ["a", "b", "c", "d", "e", "f"]
    assert text_to_image.tolist() == [0, 0, 1, 2, 2, 2]


def test_hash_split_is_fixed_and_proportional() -> None:
    keys = [f"images/{i:05d}.png" for i in range(20000)]
    first = [hash_split(k) for k in keys]
    assert first == [hash_split(k) for k in reversed(keys)][::-1]  # no dependence on order or neighbours
    counts = Counter(first)
    assert abs(counts["val"] / 20000 - 0.1) < 0.01 and abs(counts["test"] / 20000 - 0.1) < 0.01
    assert Counter(hash_split(k, val=0.0, test=0.5) for k in keys)["val"] == 0
