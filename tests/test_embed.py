"""`clipforge embed`: layout and values against the model run directly, kill-and-resume at several points
gives byte-identical parts, 1 and 2 ranks (torchrun) give identical output, sources, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from search_helpers import image_folder, save_tiny_model

from clipforge.cli import main
from clipforge.search.errors import SearchError

pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
N = 30
COMMON = ["--part-size", "8", "--batch-size", "3", "--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed")
    return image_folder(root / "images", N), save_tiny_model(root / "model.safetensors")


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{Path(__file__).parent}")


def embed_argv(images: Path, model: Path, out: Path) -> list[str]:
    return ["embed", str(images), "--model", str(model), "--output", str(out), *COMMON]


def files_of(root: Path) -> dict[str, bytes]:
    """Every published file (parts, part records, manifest); run.json and temporaries excluded."""
    names = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "run.json"]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(names)}


@pytest.fixture(scope="module")
def clean(collection, tmp_path_factory) -> Path:
    images, model = collection
    out = tmp_path_factory.mktemp("clean") / "emb"
    assert main(embed_argv(images, model, out)) == 0
    return out


def test_layout_and_values_match_the_model_run_directly(collection, clean):
    from clipforge.convert import load_model
    from clipforge.data.robust import load_image
    from clipforge.tokenizer import BPETokenizer
    from clipforge.transforms import image_transform

    images, model_path = collection
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["rows"] == N and manifest["skipped"] == {"unreadable": 1} and manifest["has_text"]
    assert len(manifest["parts"]) == -(-(N + 1) // 8)  # 31 listed items, 8 per part
    model = load_model(model_path).eval()
    preprocess = image_transform(model.config.vision_cfg.image_size)
    tokenizer = BPETokenizer(context_length=model.context_length)
    for part in manifest["parts"]:
        img = np.load(clean / part["files"]["img"])
        text = np.load(clean / part["files"]["text"])
        meta = pq.read_table(clean / part["files"]["metadata"]).to_pylist()
        assert img.dtype == np.float16 and img.shape == (part["rows"], manifest["dim"]) == text.shape
        assert len(meta) == part["rows"] and all(m["path"] and m["caption"] for m in meta)
        # reference: one image at a time in float64 (a different batch composition from embed's)
        with torch.no_grad():
            ref = model.double().encode_image(torch.stack([preprocess(load_image(m["path"]).convert("RGB"))
                                                           for m in meta]).double(), normalize=True).numpy()
            ref_text = model.encode_text(tokenizer([m["caption"] for m in meta]), normalize=True).numpy()
        model.float()
        # float16 storage: relative rounding 2^-11 per component of unit vectors
        assert np.abs(img.astype(np.float64) - ref).max() < 2e-3
        assert np.abs(text.astype(np.float64) - ref_text).max() < 2e-3
        assert [m["key"] for m in meta] == sorted(m["key"] for m in meta)  # the sorted listing


KILL_DRIVER = """
import os, signal, sys
import clipforge.search.parts as parts
from clipforge.cli import main
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
real_write, real_part = parts.atomic_write, parts.write_part

def write(path, fn):  # killed between writing a temporary file and renaming it
    def inner(tmp):
        fn(tmp)
        calls[0] += 1
        if mode == "tmp" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, inner)

def part(*a, **k):  # killed right after a part is published
    out = real_part(*a, **k)
    if mode == "part" and out.number == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def write_text(path, text):
    return write(path, lambda tmp: tmp.write_text(text))

parts.atomic_write, parts.atomic_write_text, parts.write_part = write, write_text, part
import clipforge.search.embed as embed
embed.write_part = part
sys.exit(main(sys.argv[3:]))
"""


# four writes per part (img, text, metadata, record), then the manifest: 17 writes in all
@pytest.mark.parametrize("mode,n", [("tmp", 1), ("tmp", 6), ("tmp", 8), ("part", 1), ("part", 3), ("tmp", 17)])
def test_killed_and_restarted_gives_byte_identical_parts(collection, clean, tmp_path, mode, n):
    images, model = collection
    out = tmp_path / "emb"
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, mode, str(n), *embed_argv(images, model, out)],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, at the point asked for
    assert not (out / "manifest.json").exists()
    leftovers = [p for p in out.rglob(".*.tmp")]
    assert leftovers or mode == "part"  # a kill inside a write leaves its temporary file behind
    assert main(embed_argv(images, model, out)) == 0
    assert files_of(out) == files_of(clean)
    assert not list(out.rglob(".*.tmp"))


def test_rerun_of_a_finished_run_skips_everything_and_redoes_a_damaged_part(collection, clean, tmp_path):
    import shutil

    images, model = collection
    out = tmp_path / "emb"
    shutil.copytree(clean, out)
    victim = out / "img_emb" / "img_emb_2.npy"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = {p: p.stat().st_mtime_ns for p in (out / "img_emb").iterdir()}
    assert main(embed_argv(images, model, out)) == 0
    assert files_of(out) == files_of(clean)
    redone = [p.name for p in before if p.stat().st_mtime_ns != before[p]]
    assert redone == ["img_emb_2.npy"]


def test_two_ranks_under_torchrun_give_the_same_bytes_as_one_process(collection, clean, tmp_path):
    images, model = collection
    out = tmp_path / "emb"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            "-m", "clipforge", *embed_argv(images, model, out)]
    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files_of(out) == files_of(clean)
    assert done.stdout.count("Embedded 30 images") == 1  # rank 0 reports, once


def test_two_plain_processes_with_rank_env_split_the_parts(collection, clean, tmp_path):
    images, model = collection
    out = tmp_path / "emb"
    procs = [subprocess.Popen([sys.executable, "-m", "clipforge", *embed_argv(images, model, out)],
                              env=dict(env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert files_of(out) == files_of(clean)
    records = [json.loads(p.read_text()) for p in sorted((out / "done").iterdir())]
    assert len(records) == 4


def test_manifest_and_shard_sources_give_the_folder_vectors(collection, clean, tmp_path):
    from clipforge.data.writer import write_shards

    images, model = collection
    reference = {m["key"]: v for m, v in zip(read_meta(clean), read_vectors(clean))}
    manifest = tmp_path / "pairs.tsv"
    rows = sorted(images.rglob("img*.png"))
    manifest.write_text("image\tcaption\tlabel\n" + "".join(
        f"{p.relative_to(tmp_path) if p.is_relative_to(tmp_path) else p}\t{p.with_suffix('.txt').read_text().strip()}"
        f"\t{p.parent.name}\n" for p in rows))
    out = tmp_path / "from_manifest"
    assert main(["embed", str(manifest), "--model", str(model), "--output", str(out), *COMMON]) == 0
    meta = read_meta(out)
    assert {m["label"] for m in meta} == {"g0", "g1", "g2"}
    for m, v in zip(meta, read_vectors(out)):
        assert np.array_equal(v, reference[Path(m["path"]).relative_to(images).with_suffix("").as_posix()])

    shards = tmp_path / "shards"
    write_shards([(p, p.with_suffix(".txt").read_text().strip()) for p in rows], shards, samples_per_shard=7,
                 image_format="keep")
    out = tmp_path / "from_shards"
    assert main(["embed", str(shards), "--model", str(model), "--output", str(out), *COMMON]) == 0
    meta, vectors = read_meta(out), read_vectors(out)
    assert len(meta) == N and all(m["shard"].endswith(".tar") and m["member"].endswith(".png") for m in meta)
    by_caption = {m["caption"]: v for m, v in zip(read_meta(clean), read_vectors(clean))}
    for m, v in zip(meta, vectors):  # same pixels (PNG kept as is) -> the same vector
        assert np.array_equal(v, by_caption[m["caption"]])


def read_meta(root: Path) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [row for part in manifest["parts"] for row in pq.read_table(root / part["files"]["metadata"]).to_pylist()]


def read_vectors(root: Path) -> np.ndarray:
    manifest = json.loads((root / "manifest.json").read_text())
    return np.concatenate([np.load(root / part["files"]["img"]) for part in manifest["parts"]])


def test_bad_input_is_one_line(collection, tmp_path, capsys):
    images, model = collection
    (tmp_path / "empty").mkdir()
    assert main(embed_argv(tmp_path / "empty", model, tmp_path / "o1")) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(embed_argv(images, tmp_path / "nope.safetensors", tmp_path / "o2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error:") and "\n" not in err
    out = tmp_path / "o3"
    assert main(embed_argv(images, model, out)) == 0
    capsys.readouterr()
    assert main(["embed", str(images), "--model", str(model), "--output", str(out),
                 *COMMON[:1], "5", *COMMON[2:]]) == 2  # another part size into the same folder
    err = capsys.readouterr().err.strip()
    assert "another embedding run" in err and "part_size" in err and "\n" not in err


def test_fp16_on_cpu_is_refused(collection, tmp_path):
    from clipforge.search.embed import embed_collection

    images, model = collection
    with pytest.raises(SearchError, match="fp16 needs a GPU"):
        embed_collection(str(images), str(model), tmp_path / "o", precision="fp16", device="cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_stays_close_to_float64_and_warns_where_it_is_emulated(collection, monkeypatch, native):
    """bf16 weights (8 mantissa bits) give features within 2e-2 of the float64 model; on a CPU without
    native bf16 the explicit request is kept and a RuntimeWarning says it is slower than fp32."""
    import warnings

    from clipforge.convert import load_model
    from clipforge.data.robust import load_image
    from clipforge.search import encoder as encoder_module
    from clipforge.search.encoder import load_encoder

    images, model_path = collection
    monkeypatch.setattr(encoder_module, "bf16_supported", lambda device: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = load_encoder(str(model_path), "torch", "cpu", "bf16")
    emulated = [w for w in caught if "no native bf16" in str(w.message)]
    assert len(emulated) == (0 if native else 1) and all(w.category is RuntimeWarning for w in emulated)
    paths = sorted(p for p in images.rglob("*.png") if p.stat().st_size > 100)[:6]
    pixels = torch.stack([encoder.preprocess(load_image(p).convert("RGB")) for p in paths])
    captions = ["a red square", "two blue circles on a green field"]
    model = load_model(model_path).eval().double()
    with torch.no_grad():
        ref = model.encode_image(pixels.double(), normalize=True).numpy()
        ref_text = model.encode_text(encoder.tokenizer(captions), normalize=True).numpy()
    got, got_text = encoder.encode_image(pixels), encoder.encode_text(captions)
    assert got.dtype == np.float32 and got.shape == ref.shape and got_text.shape == ref_text.shape
    # bf16 rounds weights and activations to 2^-9 relative (measured: 4e-3 at most); fp32 would be ~1e-7
    assert 1e-5 < np.abs(got - ref).max() < 2e-2 and np.abs(got_text - ref_text).max() < 2e-2
    assert (got * ref).sum(1).min() > 0.999 and (got_text * ref_text).sum(1).min() > 0.999


def test_prepared_offline_dataset_by_name(collection, clean, tmp_path):
    """A prepared dataset (info.json + manifest.tsv under the data root, as `clipforge data prepare` leaves
    it) embedded by name, one split, with its category labels as an extra column."""
    images, model = collection
    root = tmp_path / "data"
    (root / "openclipart").mkdir(parents=True)
    (root / "openclipart" / "info.json").write_text(json.dumps({"classnames": ["g0", "g1", "g2"]}))
    rows = sorted(images.rglob("img*.png"))
    (root / "openclipart" / "manifest.tsv").write_text("image\tcaption\tsplit\tlabel\n" + "".join(
        f"{p}\t{p.with_suffix('.txt').read_text().strip()}\t{'test' if i % 2 else 'train'}\t{p.parent.name}\n"
        for i, p in enumerate(rows)))
    out = tmp_path / "emb"
    assert main(["embed", "openclipart", "--root", str(root), "--split", "test", "--model", str(model),
                 "--output", str(out), *COMMON]) == 0
    meta = read_meta(out)
    assert len(meta) == len(rows) // 2 and all(m["label"] == Path(m["path"]).parent.name for m in meta)
    reference = {m["path"]: v for m, v in zip(read_meta(clean), read_vectors(clean))}
    for m, v in zip(meta, read_vectors(out)):
        assert np.array_equal(v, reference[m["path"]])
