"""Tar shards: writer layout, exact-once reading across ranks and workers, seeded shuffling, exact resume,
and corrupt input. Every expected value comes from the generated source images and captions themselves."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.shards import ShardDataset, ShardError, ShardLoader, count_samples, expand_shards
from clipforge.data.writer import write_shards
from clipforge.transforms import EvalTransform, TrainTransform

N_IMAGES = 40


def make_image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    width, height = 20 + (i % 5) * 3, 18 + (i % 3) * 4
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def caption_of(i: int) -> str:
    return f"picture number {i}"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for i in range(N_IMAGES):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        make_image(i).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(caption_of(i) + "\n")
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    pairs = [(make_image(i), caption_of(i)) for i in range(N_IMAGES)]
    buffers = []
    for image, caption in pairs:  # PNG bytes stored as they are, so decoding is pixel-exact
        data = io.BytesIO()
        image.save(data, format="PNG")
        buffers.append((data.getvalue(), caption))
    summary = write_shards(buffers, out, samples_per_shard=7, image_format="keep")
    assert summary.samples == N_IMAGES and len(summary.shards) == 6
    return out


def collect(dataset: ShardDataset, batch_size: int, workers: int) -> list[str]:
    return [c for _, captions in ShardLoader(dataset, batch_size, workers) for c in captions]


def test_writer_uses_img2dataset_layout(shard_dir):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == sorted([f"{i:05d}.tar" for i in range(6)] + [f"{i:05d}_stats.json" for i in range(6)])
    assert [json.loads((shard_dir / f"{i:05d}_stats.json").read_text())["successes"] for i in range(6)] == [7] * 5 + [5]
    with tarfile.open(shard_dir / "00001.tar") as tar:
        members = tar.getnames()
        meta = json.loads(tar.extractfile("000010002.json").read())
        text = tar.extractfile("000010002.txt").read().decode()
    assert members[:3] == ["000010000.png", "000010000.txt", "000010000.json"]
    assert len(members) == 21
    assert text == caption_of(9) and meta["key"] == "000010002" and meta["captions"] == [caption_of(9)]
    assert (meta["width"], meta["height"]) == make_image(9).size
    assert count_samples(shard_dir) == N_IMAGES


def test_writer_is_deterministic_and_reencodes_to_jpeg(tmp_path):
    pairs = [(make_image(i), [caption_of(i), "second caption"]) for i in range(3)]
    a = write_shards(pairs, tmp_path / "a", samples_per_shard=2)
    b = write_shards(pairs, tmp_path / "b", samples_per_shard=2)
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]
    with tarfile.open(a.shards[0]) as tar:
        assert tar.getnames()[0] == "000000000.jpg"
        assert tar.extractfile("000000000.txt").read().decode() == f"{caption_of(0)}\nsecond caption"
        assert Image.open(tar.extractfile("000000000.jpg")).format == "JPEG"


def test_writer_from_folder_command(image_folder, tmp_path):
    from argparse import Namespace

    from clipforge.data.writer import run_shards_command

    result = run_shards_command(Namespace(source=str(image_folder), out=str(tmp_path / "s"), per_shard=16))
    assert result["samples"] == N_IMAGES and len(result["shards"]) == 3
    ds = ShardDataset(tmp_path / "s", EvalTransform(16), epochs=1, caption="first")
    seen = collect(ds, 8, 0)
    assert sorted(seen) == sorted(caption_of(i) for i in range(N_IMAGES))


def test_writer_from_manifest_command_with_a_bad_image(image_folder, tmp_path):
    from argparse import Namespace

    from clipforge.data.manifest import write_manifest
    from clipforge.data.writer import run_shards_command

    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [(str(p), caption_of(int(p.stem[3:])), "train") for p in sorted(image_folder.rglob("*.png"))[:5]]
    write_manifest(tmp_path / "m.tsv", rows + [(str(tmp_path / "broken.png"), "a broken file", "train")],
                   with_label=False)
    args = Namespace(source=str(tmp_path / "m.tsv"), out=str(tmp_path / "s"), per_shard=4, skip_bad=False)
    with pytest.raises(ShardError, match=r"broken\.png: cannot be written to a shard"):
        run_shards_command(args)
    # the unfinished shard is dropped
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["00000.tar", "00000_stats.json"]
    with pytest.raises(ShardError, match=r"already holds 1 shards .*--overwrite"):
        run_shards_command(args)  # the complete shard of the failed attempt is not mixed into a new set
    args.skip_bad, args.output, args.overwrite = True, str(tmp_path / "summary.json"), True
    result = run_shards_command(args)
    assert result["samples"] == 5 and result["skipped"] == [str(tmp_path / "broken.png")]
    assert json.loads((tmp_path / "summary.json").read_text())["samples"] == 5
    assert sorted(collect(ShardDataset(tmp_path / "s", EvalTransform(8), epochs=1), 2, 0)) == sorted(r[1] for r in rows)


def test_writer_keeps_only_the_split_asked_for(image_folder, tmp_path):
    from argparse import Namespace

    from clipforge.data.manifest import write_manifest
    from clipforge.data.writer import run_shards_command

    images = sorted(image_folder.rglob("*.png"))[:6]
    rows = [(str(p), caption_of(int(p.stem[3:])), "test" if i % 3 == 0 else "train") for i, p in enumerate(images)]
    write_manifest(tmp_path / "m.tsv", rows, with_label=False)
    args = Namespace(source=str(tmp_path / "m.tsv"), out=str(tmp_path / "s"), per_shard=4, split="train")
    assert run_shards_command(args)["samples"] == 4
    train = sorted(r[1] for r in rows if r[2] == "train")
    assert sorted(collect(ShardDataset(tmp_path / "s", EvalTransform(8), epochs=1), 2, 0)) == train
    args.split, args.out = "val", str(tmp_path / "v")
    with pytest.raises(ShardError, match=r"--split val: no image of .*m\.tsv is in that split \(its splits: test, train\)"):
        run_shards_command(args)


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(shard_dir):
    transform = EvalTransform(16)
    expected = {caption_of(i): transform(make_image(i)) for i in range(N_IMAGES)}
    seen: list[str] = []
    for rank in range(2):
        ds = ShardDataset(shard_dir, transform, rank=rank, world_size=2, seed=3, shuffle_buffer=5, epochs=2)
        for images, captions in ShardLoader(ds, 3, num_workers=2):
            for image, caption in zip(images, captions):
                torch.testing.assert_close(image, expected[caption], rtol=0, atol=0)  # decoded pixel-exact
            seen.extend(captions)
    assert Counter(seen) == {caption_of(i): 2 for i in range(N_IMAGES)}


def test_shuffle_is_seeded(shard_dir):
    def order(seed: int, buffer: int = 10, shuffle_shards: bool = True) -> list[str]:
        ds = ShardDataset(shard_dir, None, seed=seed, shuffle_buffer=buffer, shuffle_shards=shuffle_shards,
                          epochs=1, caption="first")
        return [caption for _, caption, _ in ds]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(caption_of(i) for i in range(N_IMAGES))
    # No buffer and no shard shuffling: the file order, which the writer made the input order.
    assert order(1, buffer=1, shuffle_shards=False) == [caption_of(i) for i in range(N_IMAGES)]


def test_two_epochs_differ_in_order_and_cover_everything(shard_dir):
    ds = ShardDataset(shard_dir, None, seed=0, shuffle_buffer=8, epochs=2, caption="first")
    samples = [(caption, pos.epoch) for _, caption, pos in ds]
    first = [c for c, e in samples if e == 0]
    second = [c for c, e in samples if e == 1]
    assert sorted(first) == sorted(second) == sorted(caption_of(i) for i in range(N_IMAGES))
    assert first != second


@pytest.mark.parametrize(("workers", "resample", "rank", "world"), [(2, False, 0, 1), (0, True, 0, 1),
                                                                     (2, False, 1, 2)])
def test_resume_from_state_gives_the_same_remaining_stream(shard_dir, workers, resample, rank, world):
    def make() -> ShardLoader:
        ds = ShardDataset(shard_dir, TrainTransform(12, scale=(0.3, 1.0)), rank=rank, world_size=world, seed=7,
                          shuffle_buffer=6, resample=resample)
        return ShardLoader(ds, batch_size=4, num_workers=workers)

    loader = make()
    stream = iter(loader)
    head = [next(stream) for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    tail = [next(stream) for _ in range(12)]  # crosses epoch boundaries of the slots
    del stream

    resumed = make()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for (images, captions), (ref_images, ref_captions) in zip([next(again) for _ in range(12)], tail):
        assert captions == ref_captions
        torch.testing.assert_close(images, ref_images, rtol=0, atol=0)  # augmentations reproduced too
    assert [c for _, cs in head for c in cs] != [c for _, cs in tail[:5] for c in cs]


def test_resume_state_from_another_setup_is_refused(shard_dir):
    loader = ShardLoader(ShardDataset(shard_dir, None, seed=1), batch_size=2, num_workers=2)
    state = loader.state_dict()
    other = ShardLoader(ShardDataset(shard_dir, None, seed=1), batch_size=2, num_workers=1)
    with pytest.raises(ShardError, match="'num_workers' is 2 in the checkpoint but 1 now"):
        other.load_state_dict(state)


def test_too_few_shards_for_the_slots_is_a_clear_error(shard_dir):
    ds = ShardDataset(shard_dir, None, rank=0, world_size=4)
    with pytest.raises(ShardError, match="6 shards cannot feed 4 rank"):
        ShardLoader(ds, batch_size=2, num_workers=2)


def _rewrite_with_bad_image(src: Path, dst: Path, bad_key: str) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == f"{bad_key}.png":
                data = b"not an image at all"
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_corrupt_image_member_raises_or_is_skipped_and_counted(shard_dir, tmp_path):
    for path in sorted(shard_dir.glob("*.tar")):
        target = tmp_path / path.name
        if path.name == "00002.tar":
            _rewrite_with_bad_image(path, target, "000020003")
        else:
            target.write_bytes(path.read_bytes())
    with pytest.raises(ShardError, match=r"00002\.tar: sample '000020003': cannot decode \.png image"):
        collect(ShardDataset(tmp_path, EvalTransform(8), epochs=1, caption="first"), 4, 0)
    loader = ShardLoader(ShardDataset(tmp_path, EvalTransform(8), epochs=1, caption="first", on_error="skip"), 4)
    seen = [c for _, captions in loader for c in captions]
    assert sorted(seen) == sorted(caption_of(i) for i in range(N_IMAGES) if i != 2 * 7 + 3)
    assert loader.skipped == 1


def test_truncated_shard_raises_or_skips_its_tail(shard_dir, tmp_path):
    for path in sorted(shard_dir.iterdir()):  # the tars and their stats files
        (tmp_path / path.name).write_bytes(path.read_bytes())
    last = tmp_path / "00005.tar"
    with tarfile.open(last) as tar:
        third = tar.getmember("000050002.png")
    last.write_bytes(last.read_bytes()[: third.offset_data + 10])  # cut inside the third sample's image
    with pytest.raises(ShardError, match=r"00005\.tar: unreadable tar after member .000050002\.png."):
        collect(ShardDataset(tmp_path, EvalTransform(8), epochs=1, caption="first", shuffle_buffer=1), 4, 0)
    loader = ShardLoader(ShardDataset(tmp_path, EvalTransform(8), epochs=1, caption="first", on_error="skip"), 4)
    seen = [c for _, captions in loader for c in captions]
    # Shard 5 holds images 35..39; the cut keeps 35 and 36 whole.
    assert sorted(seen) == sorted(caption_of(i) for i in range(37))
    assert loader.skipped == 3  # 37, 38 and 39: the stats file says the shard held 5
    (tmp_path / "00005_stats.json").unlink()  # a shard from elsewhere, without stats: its tail counts as one
    loader = ShardLoader(ShardDataset(tmp_path, EvalTransform(8), epochs=1, caption="first", on_error="skip"), 4)
    assert len([c for _, captions in loader for c in captions]) == 37 and loader.skipped == 1


def test_shard_lists(shard_dir):
    assert expand_shards(shard_dir) == [str(shard_dir / f"{i:05d}.tar") for i in range(6)]
    assert expand_shards(f"{shard_dir}/{{00001..00003}}.tar") == [str(shard_dir / f"{i:05d}.tar") for i in (1, 2, 3)]
    assert expand_shards(f"{shard_dir}/0000[45].tar") == [str(shard_dir / f"{i:05d}.tar") for i in (4, 5)]
    with pytest.raises(ShardError, match="00008.tar: shard not found"):
        expand_shards(f"{shard_dir}/{{00008..00009}}.tar")
