"""Each objective against closed forms on orthonormal features, explicit loops, and open_clip's loss.py."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge import losses
from clipforge.config import ConfigError, from_dict
from clipforge.losses import LossConfig, Strip, compute_loss, strip_loss_parts


def _features(batch: int, dim: int = 6, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fi = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    ft = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    return fi.requires_grad_(), ft.requires_grad_()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(a.shape[0]))


# ---- explicit loop references (scalar torch ops, so autograd gives reference gradients too) ----


def loop_clip(fi, ft, scale):
    batch = fi.shape[0]
    total = 0.0
    for i in range(batch):
        row = [scale * _dot(fi[i], ft[j]) for j in range(batch)]
        col = [scale * _dot(ft[i], fi[j]) for j in range(batch)]
        total = total - torch.log(torch.exp(row[i]) / sum(torch.exp(x) for x in row))
        total = total - torch.log(torch.exp(col[i]) / sum(torch.exp(x) for x in col))
    return total / (2 * batch)


def loop_siglip(fi, ft, scale, bias):
    batch = fi.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * _dot(fi[i], ft[j]) + bias)))
    return total / batch


def loop_square(fi, ft):
    batch = fi.shape[0]
    pos = sum((_dot(fi[i], ft[i]) - 1) ** 2 for i in range(batch)) / batch
    neg = sum(_dot(fi[i], ft[j]) ** 2 for i in range(batch) for j in range(batch) if i != j)
    return pos + neg / (batch * (batch - 1))


def loop_margins(fi, ft):
    batch = fi.shape[0]
    i2t = [_dot(fi[i], ft[i]) - max((_dot(fi[i], ft[j]) for j in range(batch) if j != i), key=lambda x: x.item())
           for i in range(batch)]
    t2i = [_dot(ft[i], fi[i]) - max((_dot(ft[i], fi[j]) for j in range(batch) if j != i), key=lambda x: x.item())
           for i in range(batch)]
    return i2t, t2i


def loop_hinge(fi, ft, target):
    i2t, t2i = loop_margins(fi, ft)
    terms = [torch.clamp(target - m, min=0) for m in i2t + t2i]
    return sum(terms) / len(terms)


def loop_triplet(fi, ft, margin):
    i2t, t2i = loop_margins(fi, ft)
    return sum(torch.clamp(margin - a, min=0) + torch.clamp(margin - b, min=0) for a, b in zip(i2t, t2i)) / len(i2t)


def loop_regularizer(fi, ft):
    # The documented identity: 1 - <f, g> = ½‖f - g‖² for unit vectors.
    batch, dim = fi.shape
    return sum(0.5 * sum((fi[i, k] - ft[i, k]) ** 2 for k in range(dim)) for i in range(batch)) / batch


def _assert_same(ours_fn, ref_fn, inputs, rtol=1e-9):
    """Same value, and same gradients wrt the raw features *before* L2 normalisation (what training sees).

    Through the normalisation only the tangential part of a feature gradient matters, which is how the
    regularizer's ½‖f - g‖² form and its 1 - <f, g> form give the same training gradient.
    """
    raw = [x.detach().clone().requires_grad_() for x in inputs]
    results = []
    for fn in (ours_fn, ref_fn):
        value = fn(F.normalize(raw[0], dim=-1), F.normalize(raw[1], dim=-1), *raw[2:])
        results.append((value, torch.autograd.grad(value, raw)))
    (ours, grads), (ref, ref_grads) = results
    assert torch.allclose(ours, ref, rtol=rtol, atol=1e-12), (ours.item(), ref.item())
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("batch", [2, 5])
def test_losses_match_explicit_loops(batch):
    fi, ft = _features(batch, seed=batch)
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    _assert_same(losses.clip_loss, loop_clip, (fi, ft, scale))
    _assert_same(losses.siglip_loss, loop_siglip, (fi, ft, scale, bias))
    _assert_same(losses.square_loss, loop_square, (fi, ft))
    _assert_same(losses.margin_regularizer, loop_regularizer, (fi, ft))
    # Targets above the typical random margin so the hinge is active for most pairs.
    _assert_same(lambda a, b: losses.margin_hinge(a, b, 0.6), lambda a, b: loop_hinge(a, b, 0.6), (fi, ft))
    _assert_same(lambda a, b: losses.triplet_loss(a, b, 0.4), lambda a, b: loop_triplet(a, b, 0.4), (fi, ft))
    i2t, t2i = losses.per_sample_margins(fi, ft)
    ref_i2t, ref_t2i = loop_margins(fi, ft)
    assert torch.allclose(i2t, torch.stack(ref_i2t)) and torch.allclose(t2i, torch.stack(ref_t2i))


def test_closed_forms_on_orthonormal_features():
    batch, scale, bias = 4, 5.0, -3.0
    eye = torch.eye(batch, dtype=torch.float64)
    derange = eye[[1, 2, 3, 0]]  # text i is the basis vector of image i+1: every positive similarity is 0
    # S = I: each row has logit `scale` on the diagonal and 0 elsewhere.
    assert losses.clip_loss(eye, eye, scale).item() == pytest.approx(math.log(math.exp(scale) + batch - 1) - scale)
    assert losses.clip_loss(eye, derange, scale).item() == pytest.approx(math.log(math.exp(scale) + batch - 1))
    softplus = lambda x: math.log1p(math.exp(x))
    expected = softplus(-(scale + bias)) + (batch - 1) * softplus(bias)
    assert losses.siglip_loss(eye, eye, scale, bias).item() == pytest.approx(expected)
    assert losses.square_loss(eye, eye).item() == 0.0
    # Positives all 0 (term 1), one off-diagonal 1 per row: B ones over B(B-1) negatives.
    assert losses.square_loss(eye, derange).item() == pytest.approx(1.0 + 1.0 / (batch - 1))
    assert losses.margin_regularizer(eye, eye).item() == 0.0
    assert losses.margin_regularizer(eye, derange).item() == pytest.approx(1.0)
    i2t, t2i = losses.per_sample_margins(eye, eye)
    assert torch.equal(i2t, torch.ones(batch, dtype=torch.float64)) and torch.equal(t2i, i2t)
    i2t, t2i = losses.per_sample_margins(eye, derange)
    assert torch.equal(i2t, -torch.ones(batch, dtype=torch.float64))
    assert losses.margin_hinge(eye, eye, 0.2).item() == 0.0
    assert losses.margin_hinge(eye, eye, 1.5).item() == pytest.approx(0.5)
    assert losses.triplet_loss(eye, eye, 0.5).item() == 0.0
    assert losses.triplet_loss(eye, derange, 0.5).item() == pytest.approx(2 * 1.5)


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        pytest.fail("open_clip_torch must be installed (--no-deps) for the reference tests")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_and_siglip_match_open_clip():
    ref = _open_clip_loss_module()
    fi, ft = _features(9, dim=16, seed=3, dtype=torch.float32)
    scale, bias = torch.tensor(14.0), torch.tensor(-5.0)
    expected = ref.ClipLoss()(fi, ft, scale)
    assert torch.allclose(losses.clip_loss(fi, ft, scale), expected, rtol=1e-6)
    expected = ref.SigLipLoss(rank=0, world_size=1)(fi, ft, scale, bias)
    assert torch.allclose(losses.siglip_loss(fi, ft, scale, bias), expected, rtol=1e-6)


def test_compute_loss_parts_and_total():
    fi, ft = _features(6, seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    cfg = LossConfig(margin_lambda=0.5)
    out = compute_loss(cfg, fi, ft, scale)
    assert set(out) == {"loss", "clip", "margin"}
    assert torch.allclose(out["clip"], loop_clip(fi, ft, scale))
    assert torch.allclose(out["margin"], loop_regularizer(fi, ft))
    assert torch.allclose(out["loss"], out["clip"] + 0.5 * out["margin"])
    out = compute_loss(LossConfig(margin_lambda=2.0, margin_form="hinge", margin_target=0.7), fi, ft, scale)
    assert torch.allclose(out["margin"], loop_hinge(fi, ft, 0.7))
    assert set(compute_loss(LossConfig(), fi, ft, scale)) == {"loss", "clip"}
    out = compute_loss(LossConfig(name="siglip"), fi, ft, scale, torch.tensor(-10.0, dtype=torch.float64))
    assert torch.allclose(out["siglip"], loop_siglip(fi, ft, scale, -10.0)) and out["loss"] is out["siglip"]
    out = compute_loss(LossConfig(name="triplet", triplet_margin=0.3), fi, ft, scale)
    assert torch.allclose(out["triplet"], loop_triplet(fi, ft, 0.3))
    assert torch.allclose(compute_loss(LossConfig(name="square"), fi, ft, scale)["square"], loop_square(fi, ft))


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(margin_lambda=0.3),
        LossConfig(margin_lambda=0.3, margin_form="hinge", margin_target=0.8, chunk_size=3),
        LossConfig(name="siglip", chunk_size=2),
        LossConfig(name="siglip"),
        LossConfig(name="square"),
        LossConfig(name="triplet", triplet_margin=0.5),
        LossConfig(chunk_size=4),
    ],
    ids=lambda c: f"{c.name}-{c.margin_form}-{c.margin_lambda}-{c.chunk_size}",
)
def test_strips_partitioning_the_rows_sum_to_the_global_loss(cfg):
    """What a distributed rank computes: uneven strips of rows, summed, equal the whole-batch loss."""
    fi, ft = _features(7, seed=5)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    inputs = (fi, ft, scale, bias)
    ref = compute_loss(cfg, fi, ft, scale, bias)
    ref_grads = torch.autograd.grad(ref["loss"], inputs, allow_unused=True)
    bounds = [(0, 3), (3, 4), (4, 7)]
    parts = [strip_loss_parts(cfg, Strip(fi[a:b], ft[a:b], fi, ft, a), 7, scale, bias) for a, b in bounds]
    for key in ref:
        assert torch.allclose(sum(p[key] for p in parts), ref[key], rtol=1e-10), key
    grads = torch.autograd.grad(sum(p["loss"] for p in parts), inputs, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        assert (g is None and r is None) or torch.allclose(g, r, rtol=1e-8, atol=1e-12)


def test_bad_inputs_give_one_line_errors():
    fi, ft = _features(4)
    with pytest.raises(ValueError, match=r"same shape \[B, D\]"):
        losses.clip_loss(fi, ft[:3], 1.0)
    with pytest.raises(ValueError, match="needs a logit_bias"):
        compute_loss(LossConfig(name="siglip"), fi, ft, 10.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        losses.triplet_loss(fi[:1], ft[:1], 0.2)
    with pytest.raises(ValueError, match="shape"):
        compute_loss(LossConfig(), fi, ft[:, :3], 10.0)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"margin_lambda": -0.1}, "loss.margin_lambda"),
        ({"margin_lambda": float("nan")}, "loss.margin_lambda"),
        ({"margin_target": 3.0}, "loss.margin_target"),
        ({"triplet_margin": -1.0}, "loss.triplet_margin"),
        ({"chunk_size": 0}, "loss.chunk_size"),
        ({"name": "infonce"}, "loss.name"),
        ({"margin_form": "sum"}, "loss.margin_form"),
        ({"margin_lamda": 0.1}, "loss.margin_lamda"),
    ],
)
def test_loss_config_rejects_impossible_values(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        from_dict(LossConfig, data, prefix="loss")
    assert "\n" not in str(info.value)


def test_loss_config_loads_and_is_frozen():
    cfg = from_dict(LossConfig, {"name": "siglip", "margin_lambda": 1, "chunk_size": 256}, prefix="loss")
    assert cfg == LossConfig(name="siglip", margin_lambda=1.0, chunk_size=256)
    with pytest.raises(AttributeError):
        cfg.name = "clip"  # type: ignore[misc]
