"""The forms of the margin regularizer R and CyCLIP's terms against explicit float64 loops (values and
gradients), their strip decomposition, and CyCLIP's own normalisation written out from its paper's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import ConfigError
from clipforge.losses import LossConfig, Strip, compute_loss, cyclip_loss, margin_penalty, strip_loss_parts
from clipforge.losses_regularizers import cyclic_terms


def _features(batch: int, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fi = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    ft = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    return fi.requires_grad_(), ft.requires_grad_()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(a.shape[0]))


def loop_r(fi, ft, form, scale):
    """R by an explicit loop over pairs; the scale enters as a plain float (it must carry no gradient)."""
    total = 0.0
    for i in range(fi.shape[0]):
        gap = 1.0 - _dot(fi[i], ft[i])
        total = total + (gap if form.startswith("mean") else gap * gap)
    total = total / fi.shape[0]
    return total * scale if form.endswith("-scaled") else total


def loop_cyclic(fi, ft):
    """(in-modal, cross-modal): Σ_ij (<I_i,I_j> - <T_i,T_j>)² / B and Σ_ij (<I_i,T_j> - <T_i,I_j>)² / B."""
    batch = fi.shape[0]
    in_modal, cross_modal = 0.0, 0.0
    for i in range(batch):
        for j in range(batch):
            in_modal = in_modal + (_dot(fi[i], fi[j]) - _dot(ft[i], ft[j])) ** 2
            cross_modal = cross_modal + (_dot(fi[i], ft[j]) - _dot(ft[i], fi[j])) ** 2
    return in_modal / batch, cross_modal / batch


def _grads(value, *tensors):
    return torch.autograd.grad(value, tensors)


@pytest.mark.parametrize("form", ["mean", "squared", "mean-scaled", "squared-scaled"])
def test_positive_forms_match_loop(form):
    fi, ft = _features(7)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    got = margin_penalty(fi, ft, form, scale)
    ref = loop_r(fi, ft, form, 14.0)
    assert abs(got.item() - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    for g, r in zip(_grads(got, fi, ft), _grads(ref, fi, ft)):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    # The scale is detached: R sends no gradient to the temperature.
    assert not got.requires_grad or torch.autograd.grad(got, scale, allow_unused=True)[0] is None


def test_squared_form_hand_value():
    """Two pairs at angles 0 and 90 degrees: gaps 0 and 1, so mean = 1/2 and squared = 1/2; at 120 degrees
    the gap is 3/2: mean (0 + 3/2)/2 = 3/4, squared (0 + 9/4)/2 = 9/8."""
    fi = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    ft = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2]], dtype=torch.float64)
    assert margin_penalty(fi, ft, "mean").item() == pytest.approx(0.75, abs=1e-15)
    assert margin_penalty(fi, ft, "squared").item() == pytest.approx(1.125, abs=1e-15)
    assert margin_penalty(fi, ft, "squared-scaled", 10.0).item() == pytest.approx(11.25, abs=1e-13)


def test_margin_forms_in_compute_loss_and_strips():
    fi, ft = _features(9, seed=3)
    scale = torch.tensor(20.0, dtype=torch.float64)
    for form in ("mean", "squared", "mean-scaled", "squared-scaled", "hinge"):
        cfg = LossConfig(margin_lambda=0.7, margin_form=form, margin_target=0.5)
        parts = compute_loss(cfg, fi, ft, scale)
        expected = margin_penalty(fi, ft, form, scale, target=0.5)
        assert torch.allclose(parts["margin"], expected, rtol=1e-12)
        assert torch.allclose(parts["loss"], parts["clip"] + 0.7 * expected, rtol=1e-12)
        # Rows [0, 4) and [4, 9) as two ranks would hold them: the parts add up to the whole batch's.
        halves = [strip_loss_parts(cfg, Strip(fi[a:b], ft[a:b], fi, ft, a), 9, scale) for a, b in ((0, 4), (4, 9))]
        for key, whole in parts.items():
            assert torch.allclose(halves[0][key] + halves[1][key], whole, rtol=1e-12), (form, key)


def test_cyclic_terms_match_double_loop():
    fi, ft = _features(6, seed=1)
    in_modal, cross_modal = cyclic_terms(fi, ft)
    ref_in, ref_cross = loop_cyclic(fi, ft)
    assert abs(in_modal.item() - ref_in.item()) <= 1e-12 * ref_in.item()
    assert abs(cross_modal.item() - ref_cross.item()) <= 1e-12 * ref_cross.item()
    for got, ref in ((in_modal, ref_in), (cross_modal, ref_cross)):
        for g, r in zip(_grads(got, fi, ft), _grads(ref, fi, ft)):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_cyclic_terms_follow_cyclips_normalisation():
    """CyCLIP's code: ((s·A - s·B)²).mean() / s² · B, with s the logit scale, A and B the B x B matrices."""
    fi, ft = _features(8, seed=2)
    s, batch = 17.0, 8
    with torch.no_grad():
        in_ref = ((s * fi @ fi.t() - s * ft @ ft.t()) ** 2).mean() / (s * s) * batch
        logits = s * fi @ ft.t()
        cross_ref = ((logits - logits.t()) ** 2).mean() / (s * s) * batch
        in_modal, cross_modal = cyclic_terms(fi, ft)
    assert torch.allclose(in_modal, in_ref, rtol=1e-12)
    assert torch.allclose(cross_modal, cross_ref, rtol=1e-12)


def test_cyclip_loss_total_and_parts():
    fi, ft = _features(6, seed=4)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(name="cyclip")
    parts = compute_loss(cfg, fi, ft, scale)
    ref_in, ref_cross = loop_cyclic(fi, ft)
    assert set(parts) == {"loss", "cyclip", "clip", "cyclic_in_modal", "cyclic_cross_modal"}
    assert torch.allclose(parts["cyclic_in_modal"], ref_in, rtol=1e-12)
    total = cyclip_loss(fi, ft, scale)
    ref_total = parts["clip"] + 0.25 * ref_in + 0.25 * ref_cross
    assert torch.allclose(total, ref_total, rtol=1e-12) and torch.allclose(parts["loss"], total, rtol=1e-12)
    # Gradients, temperature included (only the CLIP part reads it).
    for g, r in zip(_grads(total, fi, ft, scale), _grads(ref_total, fi, ft, scale)):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    halves = [strip_loss_parts(cfg, Strip(fi[a:b], ft[a:b], fi, ft, a), 6, scale) for a, b in ((0, 2), (2, 6))]
    for key, whole in parts.items():
        assert torch.allclose(halves[0][key] + halves[1][key], whole, rtol=1e-12), key


def test_cyclic_terms_vanish_for_identical_towers():
    """Equal image and text features make S symmetric and the two Gram matrices equal: both terms are 0."""
    fi, _ = _features(5)
    in_modal, cross_modal = cyclic_terms(fi.detach(), fi.detach())
    assert in_modal.item() == pytest.approx(0.0, abs=1e-14) and cross_modal.item() == pytest.approx(0.0, abs=1e-14)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="margin_form.*'cubic'"):
        LossConfig(margin_form="cubic").validate("loss")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss.cyclip_in_modal"):
        LossConfig(name="cyclip", cyclip_in_modal=-1.0).validate("loss")
    assert LossConfig(name="cyclip").uses_logit_scale
