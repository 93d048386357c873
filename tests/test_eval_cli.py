"""`clipforge eval TASK` and `clipforge data` as a user calls them, on small subsets, against naive references.

The references encode one image or caption at a time, straight from the data, with no cache, batching or
subset bookkeeping, so they check the plumbing (which features belong to which image, caption and label).
The real-data tests prepare the offline datasets into a temporary root through the CLI (see test_offline.py
for when they may skip: only outside CI when the package is missing).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.cli import main
from clipforge.data.synthetic import SyntheticConfig, SyntheticWorld
from clipforge.eval.runner import resolve_model
from clipforge.eval.synthetic import with_article
from clipforge.eval.templates import load_templates
from clipforge.tokenizer import BPETokenizer
from clipforge.transforms import EvalTransform, normalize, to_tensor

from manifest_helpers import write_pairs_csv

MICRO = "ViT-Micro-8-32"


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def eval_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"result-{len(list(tmp_path.glob('result-*.json')))}.json"
    assert main(["eval", *args, "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    return json.loads(out.read_text())


@torch.no_grad()
def text_features(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    tokenizer = BPETokenizer(context_length=model.context_length)
    return torch.cat([F.normalize(model.encode_text(tokenizer([t])), dim=-1) for t in texts])  # [T, D]


@torch.no_grad()
def image_feature(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_image(image[None]), dim=-1)[0]  # [D]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-Micro run trained for a few steps on the synthetic world at 32 pixels."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--no-progress", f"--output_dir={out}", "--run_name=r", f"--model={MICRO}",
                 "--data.synthetic.image_size=32", "--batch_size=8", "--steps=2", "--data.num_workers=0",
                 "--precision=fp32", "--optim.warmup_steps=1"]) == 0
    return out / "r"


def test_zeroshot_synthetic_matches_a_naive_classifier(run_dir: Path, tmp_path: Path) -> None:
    results = eval_json(tmp_path, "zeroshot", "--model", str(run_dir), "--per-class", "1")
    model, _ = resolve_model(str(run_dir))
    world = SyntheticWorld(SyntheticConfig(image_size=32))
    templates = load_templates("synthetic")
    weights = []
    for name in world.classnames:
        per_template = text_features(model, [t.format(with_article(name)) for t in templates])
        weights.append(F.normalize(per_template.mean(dim=0), dim=-1))
    weights = torch.stack(weights)  # [C, D]
    hits = []
    for combos in (world.seen, world.heldout):  # the seen combinations' images, then the held-out ones'
        for i in range(len(combos)):
            image, label = world.zeroshot_example(i, combos)
            hits.append(int((weights @ image_feature(model, normalize(to_tensor(image)))).argmax()) == label)
    assert results["images"] == 64 and results["classes"] == 64 and results["templates"] == len(templates)
    assert results["acc1"] == pytest.approx(sum(hits) / len(hits), abs=1e-6)
    assert 0 <= results["acc1"] <= results["acc5"] <= 1
    assert results["single_template"]["template"] == templates[0]
    assert set(results["subsets"]) == {"seen", "heldout"} and len(results["per_class_recall"]) == 64


def write_manifest(folder: Path, rows: list[tuple[str, str, str, str]], colours: dict[str, tuple]) -> Path:
    """Images named after their colour (solid, with a darker square whose place depends on the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, colour) in enumerate(colours.items()):
        image = Image.new("RGB", (48, 40), colour)
        left, top = 4 * (index % 8), 3 * (index // 8)
        image.paste(tuple(c // 3 for c in colour), (left, top, left + 16, top + 16))
        image.save(folder / f"{name}.png")
    return write_pairs_csv(folder, rows)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    colours = {f"c{i}": ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256) for i in range(24)}
    rows = []
    for i, name in enumerate(colours):
        split = "test" if i % 2 else "train"
        label = "warm" if i % 3 else "cold"
        rows.append((f"{name}.png", f"a picture number {i}", split, label))
        if i % 4 == 1:  # some test images have a second caption
            rows.append((f"{name}.png", f"the {i}th colour swatch", split, label))
    return write_manifest(tmp_path_factory.mktemp("manifest"), rows, colours)


def test_retrieval_on_a_manifest_with_several_captions_matches_brute_force(manifest: Path, tmp_path: Path) -> None:
    results = eval_json(tmp_path, "retrieval", "--model", MICRO, "--dataset", str(manifest), "--limit", "9")
    model, _ = resolve_model(MICRO)
    rows = list(csv.DictReader(manifest.open()))
    test_images = sorted({r["image"] for r in rows if r["split"] == "test"}, key=lambda n: int(n[1:-4]))
    from clipforge.eval.tasks import subset_indices  # the documented fixed subset of --limit

    kept = [test_images[i] for i in subset_indices(len(test_images), 9)]
    captions = [(r["caption"], kept.index(r["image"])) for r in rows if r["image"] in kept]
    images = torch.stack([image_feature(model, EvalTransform(32)(Image.open(manifest.parent / n))) for n in kept])
    texts = text_features(model, [c for c, _ in captions])
    hits = {k: 0 for k in (1, 5)}
    for t, (_, owner) in enumerate(captions):  # caption -> image: rank of its own image
        scores = images @ texts[t]  # [I]
        rank = int((scores > scores[owner]).sum())
        for k in hits:
            hits[k] += rank < k
    assert results["images"] == 9 and results["captions"] == len(captions) > 9
    for k in (1, 5):
        assert results[f"image_retrieval_recall@{k}"] == pytest.approx(hits[k] / len(captions), abs=1e-6)
    assert results["image_retrieval_recall@10"] == 1.0  # 9 images: each is within the top 10


def test_margins_match_the_definition(manifest: Path, tmp_path: Path) -> None:
    results = eval_json(tmp_path, "margins", "--model", MICRO, "--dataset", str(manifest), "--batch-size", "4")
    model, _ = resolve_model(MICRO)
    rows = list(csv.DictReader(manifest.open()))
    test_images = list(dict.fromkeys(r["image"] for r in rows if r["split"] == "test"))
    first_caption = {r["image"]: r["caption"] for r in reversed(rows)}
    assert results["pairs_available"] == 12 and results["batches"] == 3 and results["pairs"] == 12
    order = results["per_sample"]["pair"]
    for b in range(3):
        batch = [test_images[i] for i in order[4 * b : 4 * b + 4]]
        f = torch.stack([image_feature(model, EvalTransform(32)(Image.open(manifest.parent / n))) for n in batch])
        g = text_features(model, [first_caption[n] for n in batch])
        s = f @ g.t()  # [4, 4]
        for i in range(4):
            others = [j for j in range(4) if j != i]
            expected_i2t = s[i, i] - s[i, others].max()
            expected_t2i = s[i, i] - s[others, i].max()
            assert results["per_sample"]["i2t"][4 * b + i] == pytest.approx(float(expected_i2t), abs=1e-5)
            assert results["per_sample"]["t2i"][4 * b + i] == pytest.approx(float(expected_t2i), abs=1e-5)
    assert results["i2t"]["positive_fraction"] == pytest.approx(
        sum(v > 0 for v in results["per_sample"]["i2t"]) / 12)


def test_zeroshot_on_manifest_labels_and_plot(manifest: Path, tmp_path: Path) -> None:
    plot = tmp_path / "bars.png"
    # retrieval first, into the same features cache: the captioned view of these images (all labelled) must
    # not be mistaken for the labelled one
    eval_json(tmp_path, "retrieval", "--model", MICRO, "--dataset", str(manifest))
    results = eval_json(tmp_path, "zeroshot", "--model", MICRO, "--dataset", str(manifest), "--templates",
                        "imagenet-simple", "--plot", str(plot))
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert results["classes"] == 2 and results["images"] == 12 and results["templates"] == 7
    assert results["acc5"] == 1.0  # two classes: the label is always among the top 5
    assert set(results["per_class_recall"]) == {"cold", "warm"}
    assert plot.stat().st_size > 1000


def test_linear_probe_kshot_and_plot_on_synthetic(run_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "kshot.png"
    results = eval_json(tmp_path, "linear-probe", "--model", str(run_dir), "--per-class", "2", "--shots", "1", "2",
                        "--draws", "2", "--plot", str(plot))
    assert (results["train_images"], results["val_images"], results["test_images"]) == (128, 128, 128)
    assert set(results["kshot"]) == {"1", "2"} and len(results["kshot"]["2"]["draws"]) == 2
    assert 0 <= results["acc1"] <= results["acc5"] <= 1 and results["C"] > 0
    assert 0 <= results["zeroshot"]["acc1"] <= 1
    assert plot.stat().st_size > 1000


def test_robustness_on_synthetic_variants_with_baselines(run_dir: Path, tmp_path: Path) -> None:
    baselines = []
    for i, (acc_in, acc_shift) in enumerate(((0.2, 0.1), (0.6, 0.4))):
        path = tmp_path / f"base{i}.json"
        path.write_text(json.dumps({"in_distribution": {"acc1": acc_in},
                                    "variants": {v: {"acc1": acc_shift} for v in ("outline", "sizes")}}))
        baselines += ["--baseline", str(path)]
    results = eval_json(tmp_path, "robustness", "--model", str(run_dir), "--per-class", "1",
                        "--variants", "outline", "sizes", *baselines)
    acc_in = results["in_distribution"]["acc1"]
    assert set(results["variants"]) == {"outline", "sizes"}
    for entry in results["variants"].values():
        assert entry["drop"] == pytest.approx(acc_in - entry["acc1"])
        assert "effective_robustness" in entry and "slope" in entry["baseline_fit"]
    assert results["average"]["acc1"] == pytest.approx(
        (results["variants"]["outline"]["acc1"] + results["variants"]["sizes"]["acc1"]) / 2)


@pytest.mark.parametrize("args,match", [
    (["eval", "zeroshot", "--model", MICRO, "--dataset", "nowhere"], "unknown dataset 'nowhere'"),
    (["eval", "robustness", "--model", MICRO, "--variants", "upside-down"], "'upside-down' is not a variant"),
    (["eval", "robustness", "--model", MICRO, "--per-class", "1", "--plot", "x.png"], "robustness has no figure"),
    (["eval", "linear-probe", "--model", MICRO, "--plot", "x.png"], "give --shots too"),
    (["eval", "margins", "--model", MICRO, "--pairs", "10", "--batch-size", "32"], "fewer than one batch of 32"),
    (["eval", "zeroshot", "--model", MICRO, "--templates", "no-such-set"], "no template set 'no-such-set'"),
    (["eval", "zeroshot", "--model", "no/such/model.pt"], "no/such/model.pt"),
    (["data", "prepare", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_errors_are_one_clear_line(args: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    code, err = run(capsys, *args)
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(capsys, "eval", "zeroshot", "--model", MICRO, "--dataset", "emoji", "--root", str(tmp_path))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"(run: clipforge data prepare emoji --root {tmp_path})" in err
    assert main(["data", "list", "--root", str(tmp_path)]) == 0
    assert f"tuxpaint       not prepared (run: clipforge data prepare tuxpaint --root {tmp_path})" in \
        capsys.readouterr().out


def test_mismatched_world_and_missing_labels_are_clear(run_dir: Path, manifest: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "other.yaml"
    config.write_text("data:\n  synthetic:\n    image_size: 64\n")
    code, err = run(capsys, "eval", "zeroshot", "--model", str(run_dir), "--config", str(config))
    assert code == 2 and "data.synthetic.image_size is 64 but the model takes 32x32 images" in err
    unlabelled = manifest.parent / "unlabelled.csv"
    unlabelled.write_text("image,caption\nc0.png,a swatch\nc1.png,another swatch\n")
    code, err = run(capsys, "eval", "zeroshot", "--model", MICRO, "--dataset", str(unlabelled))
    assert code == 2 and len(err.splitlines()) == 1 and "no category labels" in err, err
    code, err = run(capsys, "eval", "linear-probe", "--model", MICRO, "--dataset", str(unlabelled))
    assert code == 2 and "has no 'split' column" in err, err


def test_empty_class_list_is_a_clear_error(manifest: Path, capsys: pytest.CaptureFixture) -> None:
    empty = manifest.parent / "empty-labels.csv"
    empty.write_text("image,caption,label\nc0.png,a swatch,\nc1.png,another swatch,\n")
    code, err = run(capsys, "eval", "zeroshot", "--model", MICRO, "--dataset", str(empty))
    assert code == 2 and len(err.splitlines()) == 1 and "no category labels" in err, err


# --- real offline data, prepared through the CLI into a temporary root ---

def require(name: str) -> None:
    """Skip a local run that lacks the package `prepare` would install; never skip in CI."""
    if os.environ.get("CI"):
        return
    probes = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")}
    if name == "emoji" and shutil.which("npm") is None:
        pytest.skip("npm not installed (local run)")
    if name in probes and not probes[name].exists() and os.geteuid() != 0:
        pytest.skip(f"Debian package for {name} not installed and not root (local run)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clipforge-data")


def prepared(name: str, root: Path) -> Path:
    require(name)
    if not (root / name / "info.json").is_file():
        assert main(["data", "prepare", name, "--root", str(root)]) == 0
    return root


def test_real_caption_data_zeroshot_retrieval_margins(data_root: Path, tmp_path: Path) -> None:
    root = str(prepared("emoji", data_root))
    common = ["--model", MICRO, "--dataset", "emoji", "--root", root, "--limit", "40"]
    zs = eval_json(tmp_path, "zeroshot", *common)
    assert zs["images"] == 40 and zs["classes"] == 9 and zs["templates"] == len(load_templates("emoji"))
    ret = eval_json(tmp_path, "retrieval", *common)
    assert ret["images"] == 40 and ret["captions"] >= 40
    assert 0 <= ret["text_retrieval_recall@1"] <= ret["text_retrieval_recall@5"] <= 1
    margins = eval_json(tmp_path, "margins", *common, "--batch-size", "16")
    assert margins["pairs"] == 32 and len(margins["per_sample"]["t2i"]) == 32


def test_real_classification_probe_and_robustness(data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root = str(prepared("fashion-mnist", data_root))
    common = ["--model", MICRO, "--dataset", "fashion-mnist", "--root", root, "--limit", "60"]
    probe = eval_json(tmp_path, "linear-probe", *common, "--shots", "2", "--draws", "2")
    assert (probe["train_images"], probe["val_images"], probe["test_images"], probe["classes"]) == (60, 60, 60, 10)
    assert probe["kshot"]["2"]["k"] == 2 and 0 <= probe["kshot"]["2"]["acc1_mean"] <= 1
    rob = eval_json(tmp_path, "robustness", *common)
    assert set(rob["variants"]) == {"blur", "low-resolution", "sketch", "inverted"}  # grey already: no grayscale
    assert "effective_robustness" not in rob["variants"]["blur"]  # no baselines, no fit
    code, err = run(capsys, "eval", "retrieval", *common)
    assert code == 2 and "has class labels but no captions" in err


def test_eval_device_is_checked_before_any_work(monkeypatch):
    from clipforge.config import ConfigError
    from clipforge.eval.runner import eval_device

    assert eval_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device gpu0: expected cpu, cuda or cuda:N"):
        eval_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available on this machine"):
        eval_device("cuda")
    assert eval_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device(None) == torch.device("cuda")
