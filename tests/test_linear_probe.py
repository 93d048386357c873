"""Linear probes against scikit-learn's LogisticRegression on the same features and the same C."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from clipforge.eval.linear_probe import (
    carve_validation,
    fit_logistic,
    kshot_probe,
    linear_probe,
    logspace_c,
    sample_k_shot,
    select_C,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def gaussian_clusters(n: int, dim: int = 24, classes: int = 6, noise: float = 1.6, seed: int = 0):
    """Overlapping Gaussian clusters (so the best C is not at an end of the range)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, classes, (n,), generator=generator)
    return centres[labels] + noise * torch.randn(n, dim, generator=generator), labels


def sklearn_accuracy(train, test, C: float, tol: float = 1e-4) -> tuple[float, np.ndarray]:
    model = LogisticRegression(C=C, max_iter=5000, tol=tol)
    model.fit(train[0].numpy(), train[1].numpy())
    return float((model.predict(test[0].numpy()) == test[1].numpy()).mean()), model.coef_


def our_accuracy(train, test, C: float, classes: int, tol: float = 1e-4) -> tuple[float, np.ndarray]:
    model = fit_logistic(*train, C, classes, max_iter=5000, tol=tol)
    accuracy = (model.logits(test[0]).argmax(1) == test[1]).double().mean().item()
    return accuracy, model.weight.T.numpy()


@pytest.mark.parametrize("C", [1e-3, 0.05, 1.0, 100.0])
def test_matches_sklearn_on_gaussian_clusters(C: float) -> None:
    train, test = gaussian_clusters(600), gaussian_clusters(2000, seed=1)
    ours, _ = our_accuracy(train, test, C, 6)  # both at their default tolerance
    theirs, _ = sklearn_accuracy(train, test, C)
    assert abs(ours - theirs) <= 0.005
    # converged tightly, both reach the same minimiser
    _, our_coef = our_accuracy(train, test, C, 6, tol=1e-9)
    _, their_coef = sklearn_accuracy(train, test, C, tol=1e-9)
    scale = np.abs(their_coef).max()
    assert np.abs(our_coef - their_coef).max() <= 0.02 * scale  # the same minimiser, not just similar accuracy


def test_matches_sklearn_on_real_fashion_mnist_pixels() -> None:
    if not FASHION_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_DIR} missing: CI must install the Debian package dataset-fashion-mnist")
        pytest.skip("dataset-fashion-mnist not installed (local run)")
    from clipforge.data.sources.fashion_mnist import read_idx

    images = torch.from_numpy(read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:3000].astype(np.float32))
    labels = torch.from_numpy(read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")[:3000].astype(np.int64))
    pooled = torch.nn.functional.avg_pool2d(images[:, None] / 255.0, 4).flatten(1)  # [N, 49] real features
    features = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-6)
    train, test = (features[:2000], labels[:2000]), (features[2000:], labels[2000:])
    for C in (0.01, 1.0):
        ours, _ = our_accuracy(train, test, C, 10)
        theirs, _ = sklearn_accuracy(train, test, C)
        assert abs(ours - theirs) <= 0.005
        assert ours > 0.6  # a real signal, far above the 0.1 of chance


def test_parametric_search_finds_the_grid_optimum() -> None:
    train, val = gaussian_clusters(200, dim=12, noise=2.0), gaussian_clusters(2000, dim=12, noise=2.0, seed=2)
    sweep = select_C(train, val, 6)
    assert len(sweep.scores) <= 15  # 7 coarse points + 2 per halving, far fewer than the 97-point grid
    grid, model = {}, None
    for C in logspace_c(8):  # exhaustive, warm-started from the previous C to keep it quick
        model = fit_logistic(*train, C, 6, init=model)
        grid[C] = (model.logits(val[0]).argmax(1) == val[1]).double().mean().item()
    best_grid = max(grid.values())
    assert max(sweep.scores.values()) == pytest.approx(best_grid, abs=0.002)
    assert 1e-6 < sweep.C < 1e6


def test_linear_probe_protocol_and_kshot() -> None:
    train, test = gaussian_clusters(800), gaussian_clusters(1000, seed=1)
    result = linear_probe(train, test, num_classes=6)
    assert set(result) >= {"acc1", "acc5", "mean_per_class_recall", "C", "val_scores"}
    # refit on train + val at the chosen C equals sklearn at that C
    theirs, _ = sklearn_accuracy(train, test, result["C"])
    assert abs(result["acc1"] - theirs) <= 0.005

    (tr, val) = carve_validation(*train, fraction=0.25, seed=0)
    assert len(tr[1]) + len(val[1]) == 800 and len(val[1]) == 200

    shots = kshot_probe(train, test, k=4, val=val, draws=3, num_classes=6, seed=0)
    assert len(shots["draws"]) == 3
    accs = torch.tensor([d["acc1"] for d in shots["draws"]], dtype=torch.float64)
    assert shots["acc1_mean"] == pytest.approx(accs.mean().item())
    assert shots["acc1_std"] == pytest.approx(accs.std().item())
    assert 1 / 6 < shots["acc1_mean"] < result["acc1"]  # better than chance, worse than the full probe
    with pytest.raises(ValueError, match="validation set"):
        kshot_probe(train, test, k=1)


def test_sample_k_shot_takes_k_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    chosen = sample_k_shot(labels, 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [5, 3, 5]  # class 1 has only 3
    assert len(set(chosen.tolist())) == len(chosen)
