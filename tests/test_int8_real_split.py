"""int8 on a real split: a tiny CLIP trained briefly on openclipart's train split, exported with --int8; the
export's own accuracy report must show int8 retrieval R@1 on openclipart's test split within 1 point of fp32
and above a floor that a model scoring at random reaches with probability below 1e-4 (derived from chance with
the split's counts). The Debian openclipart packages are needed (CI installs them); the split is prepared into
a temporary data root, as tests/test_offline.py does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

ALPHA = 1e-4  # the chance a model scoring at random passes the floor is below this
STEPS = 300


def chance_floor(mean_hits: float, queries: int, alpha: float = ALPHA) -> float:
    """The R@1 that random scoring reaches with probability <= alpha. Its hits are a sum of independent
    Bernoulli trials (one per query) with mean `mean_hits`, whose upper tail the Chernoff bound caps:
    P(X >= k) <= exp(-mu) (e mu / k)^k for k > mu; the floor is the smallest such k, over the queries."""
    k = math.floor(mean_hits) + 1
    while math.exp(-mean_hits) * (math.e * mean_hits / k) ** k > alpha:
        k += 1
    return k / queries


def test_chance_floor_against_a_hand_computation() -> None:
    # mu = 1: k = 8 gives e^-1 (e/8)^8 = 6.5e-5 <= 1e-4, k = 7 gives 4.9e-4 > 1e-4
    assert chance_floor(1.0, 500) == 8 / 500
    assert chance_floor(1.0, 500, alpha=1e-3) == 7 / 500  # 4.9e-4 <= 1e-3; k = 6: e^-1 (e/6)^6 = 3.2e-3


def int8_report(root: Path, out: Path, seed: int = 0) -> tuple[dict, int, int]:
    """Prepare openclipart under `root`, train ViT-Micro-8-32 for STEPS steps of 64 pairs on its train split,
    export it with --int8 to `out`/onnx: (the export's int8_accuracy report, test captions, test images)."""
    from clipforge.convert import load_model
    from clipforge.data.offline import prepare
    from clipforge.eval.tasks import SourceOptions, open_source
    from clipforge.export.onnx_export import OnnxExportOptions, export_onnx
    from clipforge.export.quantize import CostOptions
    from clipforge.train.config import load_train_config
    from clipforge.train.loop import train

    prepare("openclipart", root=root)
    cfg = load_train_config(None, ["--model=ViT-Micro-8-32", "--batch_size=64", "--precision=fp32", "--threads=1",
                                   f"--steps={STEPS}", "--optim.lr=2e-3", f"--optim.warmup_steps={STEPS // 10}",
                                   f"--seed={seed}", "--data.source=offline", "--data.datasets=[openclipart]",
                                   f"--data.root={root}", "--data.preload=true", "--data.num_workers=0",
                                   f"--output_dir={out}", "--run_name=oc"])
    model = load_model(train(cfg, progress=False).run_dir / "model.safetensors").eval()
    options = OnnxExportOptions(int8=True, cost=CostOptions(datasets=("openclipart",), root=str(root)))
    report = export_onnx(model, out / "onnx", options)["int8_accuracy"]
    test = open_source("openclipart", model.image_size, SourceOptions(root=str(root))).captioned("test")
    return report, len(test.texts), len(test.dataset)


@pytest.mark.slow  # about 2 minutes on one shared core: training 300 steps, then the export and its scoring
def test_int8_retrieval_on_the_openclipart_test_split(tmp_path_factory: pytest.TempPathFactory) -> None:
    report, captions, images = int8_report(tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("runs"))
    scores = report["splits"]["openclipart"]
    # caption -> image: one right image among `images` per caption; image -> caption: c_i right captions among
    # `captions` for image i, and the c_i sum to `captions`, so random scoring expects one hit in all
    floors = {"image_retrieval_R@1": chance_floor(captions / images, captions),
              "text_retrieval_R@1": chance_floor(1.0, images)}
    print(f"openclipart test: {captions} captions, {images} images; floors {floors}; scores {scores}")  # pytest -s
    for metric, floor in floors.items():
        fp32, int8 = scores["onnx-fp32"][metric], scores["onnx-int8"][metric]
        assert scores["torch-fp32"][metric] == pytest.approx(fp32, abs=1.5 / min(captions, images))  # <= 1 query
        assert fp32 > floor, (metric, fp32, floor)  # the model learned something that int8 could lose
        assert int8 > floor, (metric, int8, floor)
        assert int8 >= fp32 - 0.01, (metric, int8, fp32)  # at most 1 point of R@1 lost
    assert report["int8_recommended"] is True and report["real_splits"] == ["openclipart"]
