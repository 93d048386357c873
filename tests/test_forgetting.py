"""The "before" tasks of the adaptation report (`clipforge.adapt.forgetting`): parsing, the retrieval number's
aggregation against a hand computation, the end-to-end score against a naive reference on a toy manifest, and
the mean ± std table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.adapt.forgetting import BeforeTask, before_score, parse_before, retrieval_r1, summary_table
from clipforge.config import ConfigError
from clipforge.eval.metrics import retrieval_metrics
from clipforge.eval.runner import resolve_model
from clipforge.tokenizer import BPETokenizer
from clipforge.transforms import EvalTransform
from script_loader import load_script



def test_parse_before_accepts_the_three_kinds_and_names_a_bad_spec() -> None:
    assert parse_before("synthetic") == BeforeTask("synthetic")
    assert parse_before("zeroshot:openclipart") == BeforeTask("zeroshot", "openclipart")
    assert parse_before("retrieval:emoji").spec == "retrieval:emoji"
    for bad in ("zeroshot", "retrieval:", "synthetic:x", "linear-probe:fashion-mnist", ""):
        with pytest.raises(ConfigError, match="--before"):
            parse_before(bad)


def test_retrieval_r1_averages_both_directions_as_computed_by_hand() -> None:
    e = torch.eye(4)
    images = F.normalize(torch.stack([e[0], e[1], e[2], e[0] + 0.5 * e[3]]), dim=-1)  # [4, 4]
    texts = F.normalize(torch.stack([e[0], e[1], e[0] + 0.1 * e[2], e[2], e[1] + 0.2 * e[3]]), dim=-1)  # [5, 4]
    owner = torch.tensor([0, 1, 2, 2, 3])
    # caption -> image: t0 finds image 0, t1 image 1, t3 image 2; t2 (of image 2) finds image 0 (0.995 vs 0.0995)
    # and t4 (of image 3) finds image 1 (0.98 vs 0.088): 3 of 5.
    # image -> any caption: images 0, 1, 2 find t0, t1, t3; image 3 finds t0 (0.894), not its t4: 3 of 4.
    metrics = retrieval_metrics(images, texts, owner)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert retrieval_r1(metrics) == pytest.approx(0.5 * (3 / 5 + 3 / 4))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten coloured images, six of them in the test split, two test images with a second caption."""
    folder = tmp_path_factory.mktemp("toy")
    rows = []
    for i in range(10):
        colour = ((41 * i) % 256, (97 * i + 30) % 256, (59 * i + 120) % 256)
        image = Image.new("RGB", (40, 36), colour)
        image.paste(tuple(c // 2 for c in colour), (3 * i, 2 * i, 3 * i + 12, 2 * i + 12))
        image.save(folder / f"i{i}.png")
        split = "test" if i % 5 < 3 else "train"
        rows.append((f"i{i}.png", f"picture {i} of a swatch", split))
        if i in (0, 5):
            rows.append((f"i{i}.png", f"another caption for {i}", split))
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    return path


@torch.no_grad()
def test_before_score_retrieval_matches_a_naive_reference(manifest: Path) -> None:
    model, _ = resolve_model("ViT-Micro-8-32")
    rows = [r for r in csv.DictReader(manifest.open()) if r["split"] == "test"]
    names = list(dict.fromkeys(r["image"] for r in rows))  # the test images, in file order
    owner = [names.index(r["image"]) for r in rows]
    tokenizer = BPETokenizer(context_length=model.context_length)
    images = torch.cat([F.normalize(model.encode_image(EvalTransform(32)(Image.open(manifest.parent / n))[None]),
                                    dim=-1) for n in names])  # [I, D], one image at a time
    texts = torch.cat([F.normalize(model.encode_text(tokenizer([r["caption"]])), dim=-1) for r in rows])  # [T, D]
    scores = texts @ images.t()  # [T, I]
    caption_hits = [int(scores[t].argmax()) == owner[t] for t in range(len(rows))]
    image_hits = [owner[int(scores[:, i].argmax())] == i for i in range(len(names))]
    expected = 0.5 * (sum(caption_hits) / len(rows) + sum(image_hits) / len(names))
    assert len(names) == 6 and len(rows) == 8
    # the recalls are float32; one hit moves them by at least 1/16
    assert before_score(model, BeforeTask("retrieval", str(manifest))) == pytest.approx(expected, abs=1e-6)


def test_summary_table_is_mean_and_sample_std_per_method() -> None:
    seeds = [{"target": {"probe": t, "zero-shot": 0.1}, "before": {"zeroshot:x": {"probe": 0.5, "zero-shot": b}}}
             for t, b in ((0.1, 0.2), (0.2, 0.4), (0.3, 0.9))]
    table = summary_table(seeds, "T top-1", {"zeroshot:x": "x zero-shot top-1"}).splitlines()
    assert table[0] == "| method | target: T top-1 (%) | before: x zero-shot top-1 (%) |"
    assert table[2] == "| probe | 20.0 ± 10.0 | 50.0 ± 0.0 |"  # (0.1, 0.2, 0.3): mean 0.2, sample std 0.1
    # (0.2, 0.4, 0.9): mean 0.5, sample std sqrt((0.09 + 0.01 + 0.16) / 2) = 0.3606
    assert table[3] == "| zero-shot | 10.0 ± 0.0 | 50.0 ± 36.1 |"


def test_report_script_refuses_a_bad_before_task(capsys: pytest.CaptureFixture) -> None:
    script = load_script("adaptation_report")
    args = script.parse_args(["--model", "m.safetensors", "--before", "synthetic", "retrieval:openclipart"])
    assert [t.spec for t in args.before_tasks] == ["synthetic", "retrieval:openclipart"]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--model", "m.safetensors", "--before", "zeroshot"])
    assert exit_info.value.code != 0
    assert "--before 'zeroshot': expected" in capsys.readouterr().err
