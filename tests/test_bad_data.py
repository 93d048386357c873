"""Bad data: unreadable, truncated, missing and bomb images and bad captions are skipped and counted by kind,
other image modes are converted (checked against hand-computed pixels); a run over 5% bad images trains to the
end and reports the counts, resumes exactly, and stops with a clear error above the threshold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipforge.data.robust import (BadSample, RobustPairs, TooManyBadSamples, clean_caption, convert_to_rgb,
                                   load_image)
from clipforge.train.guard import TrainingAborted
from clipforge.train.loop import train
from clipforge.transforms import EvalTransform, TrainTransform
from run_helpers import assert_bitwise_equal, events, tiny_config, weights


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path, side: int = 30_000) -> None:
    """A PNG whose header declares side x side pixels (far above PIL's limit) with almost no data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b""))
                     + _png_chunk(b"IEND", b""))


def write_truncated_jpeg(path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def make_images(root, count: int, seed: int = 0) -> list:
    """`count` small images cycling through RGB, grayscale, RGBA, palette with transparency, CMYK, 16-bit."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        rgb = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)
        image = Image.fromarray(rgb)
        kind = i % 6
        if kind == 1:
            image = image.convert("L")
        elif kind == 2:
            image = image.convert("RGBA")
            image.putalpha(128)
        elif kind == 3:
            image = image.convert("P")
            image.info["transparency"] = 0
        elif kind == 4:
            image = image.convert("CMYK")
        elif kind == 5:
            image = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
        path = root / f"img{i:03d}.{'jpg' if kind == 4 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


def test_each_kind_of_bad_image_is_named(tmp_path):
    write_bomb(tmp_path / "bomb.png")
    write_truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    Image.new("RGB", (300, 300)).save(tmp_path / "large.png")
    cases = [("missing.png", "missing"), ("bomb.png", "decompression_bomb"), ("cut.jpg", "truncated"),
             ("junk.jpg", "unreadable")]
    for name, kind in cases:
        with pytest.raises(BadSample) as info:
            load_image(tmp_path / name)
        assert info.value.kind == kind and info.value.path == str(tmp_path / name)
    with pytest.raises(BadSample, match=r"300x300 pixels > limit 50000") as info:
        load_image(tmp_path / "large.png", max_pixels=50_000)
    assert info.value.kind == "decompression_bomb"
    assert load_image(tmp_path / "large.png").size == (300, 300)


def test_conversions_match_hand_computed_pixels():
    # Half-transparent red over white: 255 * a + 255 * (1 - a) = 255 for red, 255 * (1 - a) for green and blue.
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent: white
    out, kind = convert_to_rgb(rgba)
    expected = round(255 * (1 - 128 / 255))
    assert kind == "alpha" and np.abs(np.asarray(out, int) - [[[255, expected, expected], [255, 255, 255]]]).max() <= 1
    grey, kind = convert_to_rgb(Image.new("L", (1, 1), 100))
    assert kind == "grayscale" and grey.getpixel((0, 0)) == (100, 100, 100)
    cmyk, kind = convert_to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))  # no cyan, full magenta+yellow: red
    assert kind == "cmyk" and cmyk.getpixel((0, 0)) == (255, 0, 0)
    deep, kind = convert_to_rgb(Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16)))
    assert kind == "high_bit_depth" and np.asarray(deep)[0, :, 0].tolist() == [0, round(1000 / 257), 255]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out, kind = convert_to_rgb(palette)
    assert kind == "palette" and np.asarray(out).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_captions_are_cleaned_or_refused():
    assert clean_caption("  a red circle \n") == "a red circle"
    assert clean_caption("un cœur rouge".encode()) == "un cœur rouge"
    for caption, kind in [("", "empty_caption"), ("  \t", "empty_caption"), (None, "empty_caption"),
                          (b"\xff\xfe caf\xe9", "caption_not_utf8"), ("bad \udcff bytes", "caption_not_utf8")]:
        with pytest.raises(BadSample) as info:
            clean_caption(caption, "x.png")
        assert info.value.kind == kind, caption


def test_a_bad_sample_is_replaced_by_a_fixed_rule(tmp_path):
    good = make_images(tmp_path, 6)
    pairs = [(p, f"caption {i}") for i, p in enumerate(good)] + [(tmp_path / "gone.png", "lost")]
    dataset = RobustPairs(pairs, TrainTransform(32), seed=3)
    image, caption, problems = dataset[6]
    again = dataset[6]
    assert caption == again[1] and (image == again[0]).all()  # the same replacement and augmentation each time
    assert problems[0] == {"kind": "missing", "path": str(tmp_path / "gone.png"), "detail": "no such file"}
    assert caption in {f"caption {i}" for i in range(6)}
    with pytest.raises(TooManyBadSamples, match="all unusable"):
        RobustPairs([(tmp_path / "gone.png", "lost")], EvalTransform(32), max_attempts=3)[0]


def _dataset_with_bad_images(root, total: int, bad: int):
    """`total` pairs of which the first `bad` (spread through the list) are broken in different ways."""
    paths = make_images(root, total - bad)
    write_bomb(root / "bomb.png")
    write_truncated_jpeg(root / "cut.jpg")
    (root / "junk.png").write_bytes(b"\x89PNG not really")
    broken = [root / "missing.jpg", root / "bomb.png", root / "cut.jpg", root / "junk.png"]
    broken = [broken[i % len(broken)] for i in range(bad)]
    pairs = [(p, f"picture number {i}") for i, p in enumerate(paths)]
    for i, path in enumerate(broken):
        pairs.insert(i * (total // bad), (path, f"broken {i}"))
    return pairs


def test_five_percent_bad_images_train_to_the_end_with_counts(tmp_path, capsys):
    pairs = _dataset_with_bad_images(tmp_path, total=100, bad=5)
    # 10 steps of 10 = one epoch: every pair is drawn once (and bad ones replaced)
    cfg = tiny_config(tmp_path, "r", "--steps=10", "--batch_size=10", "--data.num_workers=2")
    result = train(cfg, progress=False, dataset=RobustPairs(pairs, TrainTransform(32), seed=cfg.seed))
    counts = result.bad_data
    assert result.steps == 10
    skipped = {k: v for k, v in counts.items() if k in ("missing", "decompression_bomb", "truncated", "unreadable")}
    assert skipped["missing"] >= 2 and skipped["decompression_bomb"] >= 1 and skipped["truncated"] >= 1
    assert skipped["unreadable"] >= 1
    for kind in ("grayscale", "alpha", "palette", "cmyk", "high_bit_depth"):
        assert counts[kind] >= 15, (kind, counts)  # about a sixth of the 95 good images each
    logged = events(result.run_dir, "bad_sample")
    assert sum(skipped.values()) == len(logged)
    assert {e["path"] for e in logged} == {str(p) for p, c in pairs if c.startswith("broken")}
    (summary,) = events(result.run_dir, "bad_data_summary")
    assert summary["reads"] == 100 + len(logged) and summary["counts"] == counts
    err = capsys.readouterr().err
    assert "skipped unusable sample (missing): " + str(tmp_path / "missing.jpg") in err
    assert "data: %d samples read; skipped: " % summary["reads"] in err


def test_bad_data_run_resumes_exactly(tmp_path):
    pairs = _dataset_with_bad_images(tmp_path, total=40, bad=2)
    common = ["--steps=6", "--save_every=3"]
    full = train(tiny_config(tmp_path, "full", *common), progress=False, dataset=RobustPairs(pairs, TrainTransform(32)))
    checkpoint = full.run_dir / "checkpoints" / "step-00000003"
    resumed = train(tiny_config(tmp_path, "resumed", *common, f"--resume={checkpoint}"), progress=False,
                    dataset=RobustPairs(pairs, TrainTransform(32)))
    assert_bitwise_equal(weights(full.run_dir), weights(resumed.run_dir))
    assert resumed.bad_data == full.bad_data and sum(full.bad_data.values()) > 0


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    pairs = _dataset_with_bad_images(tmp_path, total=30, bad=9)
    cfg = tiny_config(tmp_path, "r", "--steps=20", "--data.bad_min_samples=20", "--data.max_bad_fraction=0.1")
    with pytest.raises(TrainingAborted, match=r"samples read \(\d+\.\d%\) were unusable \(missing=\d+.*above "
                                              r"data.max_bad_fraction=0.1.*checkpoint saved to") as info:
        train(cfg, progress=False, dataset=RobustPairs(pairs, TrainTransform(32)))
    assert "\n" not in str(info.value)


def test_command_line_trains_on_a_manifest_with_bad_images(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.data.manifest import write_manifest
    from clipforge.data.robust import manifest_pairs
    from run_helpers import tiny_args

    pairs = _dataset_with_bad_images(tmp_path, total=40, bad=2)
    rows = [(str(p), c, "train") for p, c in pairs] + [(str(tmp_path / "val.png"), "a held-out caption", "val")]
    write_manifest(tmp_path / "pairs.tsv", rows, with_label=False)
    assert [(str(p), c) for p, c in manifest_pairs(tmp_path / "pairs.tsv")] == [(str(p), c) for p, c in pairs]

    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=5", "--data.source=manifest",
                                                 f"--data.path={tmp_path / 'pairs.tsv'}")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped unusable sample (missing): " + str(tmp_path / "missing.jpg") in err
    assert "data: " in err and "converted: grayscale=" in err


def test_a_data_set_of_only_bad_samples_fails_in_one_line_from_workers(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.data.manifest import write_manifest
    from run_helpers import tiny_args

    write_manifest(tmp_path / "pairs.tsv", [(str(tmp_path / f"gone{i}.png"), "lost", "train") for i in range(20)],
                   with_label=False)
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=2", "--data.source=manifest",
                                                 f"--data.path={tmp_path / 'pairs.tsv'}", "--data.num_workers=1")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("clipforge: error: sample ") and "replacements are all unusable" in err[-1], err
    assert "Traceback" not in "\n".join(err)
