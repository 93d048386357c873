"""The tiled losses against the dense computation: same values and gradients, any batch and tile shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge import losses
from clipforge.losses_chunked import (
    chunked_clip_loss,
    chunked_siglip_loss,
    hardest_negatives,
    tiled_cross_entropy_sum,
    tiled_sigmoid_sum,
)


def _features(batch: int, dim: int = 12, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    fi = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    ft = F.normalize(fi + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    return fi.to(dtype).requires_grad_(), ft.to(dtype).requires_grad_()


def _dense_clip(fi, ft, scale):
    """An independent dense reference: log-softmax of the full matrix, both directions, by hand."""
    logits = scale * fi @ ft.t()  # [B, B]
    diag = torch.diagonal(logits)
    return 0.5 * ((torch.logsumexp(logits, 1) - diag).mean() + (torch.logsumexp(logits, 0) - diag).mean())


def _dense_siglip(fi, ft, scale, bias):
    logits = scale * fi @ ft.t() + bias  # [B, B]
    signs = 2 * torch.eye(fi.shape[0], dtype=fi.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / fi.shape[0]


def _value_and_grads(fn, inputs):
    value = fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs)


def _assert_close(a, b, tol=1e-5):
    """Values within `tol` (absolute: losses are O(1)); each gradient within `tol` of its largest entry."""
    (va, ga), (vb, gb) = a, b
    assert abs(va.item() - vb.item()) <= tol * max(1.0, abs(vb.item())), (va.item(), vb.item())
    for x, y in zip(ga, gb):
        assert x.dtype == y.dtype and x.shape == y.shape
        err = (x - y).abs().max().item()
        assert err <= tol * max(y.abs().max().item(), 1e-6), (err, y.abs().max().item())


CASES = [(1, 1), (7, 3), (16, 16), (16, 5), (33, 8), (33, (4, 11)), (64, (16, 7)), (50, 1000), (19, (19, 1))]


@pytest.mark.parametrize("batch, chunk", CASES)
def test_chunked_clip_equals_dense_fp32(batch, chunk):
    fi, ft = _features(batch, seed=batch)
    scale = torch.tensor(20.0, requires_grad=True)
    dense = _value_and_grads(_dense_clip, (fi, ft, scale))
    _assert_close(_value_and_grads(lambda a, b, s: chunked_clip_loss(a, b, s, chunk), (fi, ft, scale)), dense)
    # The public entry point routes chunk_size to the same path.
    _assert_close(_value_and_grads(lambda a, b, s: losses.clip_loss(a, b, s, chunk_size=chunk), (fi, ft, scale)), dense)
    _assert_close(_value_and_grads(losses.clip_loss, (fi, ft, scale)), dense)


@pytest.mark.parametrize("batch, chunk", CASES)
def test_chunked_siglip_equals_dense_fp32(batch, chunk):
    fi, ft = _features(batch, seed=batch + 1)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    dense = _value_and_grads(_dense_siglip, (fi, ft, scale, bias))
    tiled = _value_and_grads(lambda a, b, s, c: chunked_siglip_loss(a, b, s, c, chunk), (fi, ft, scale, bias))
    _assert_close(tiled, dense)
    _assert_close(_value_and_grads(losses.siglip_loss, (fi, ft, scale, bias)), dense)


def test_directions_are_not_confused():
    """Swapping the modalities swaps the two directions; with a non-symmetric matrix each must stay exact."""
    fi, ft = _features(21, seed=4)
    scale = torch.tensor(30.0, requires_grad=True)
    swapped = _value_and_grads(lambda a, b, s: chunked_clip_loss(b, a, s, (5, 8)), (fi, ft, scale))
    dense = _value_and_grads(lambda a, b, s: _dense_clip(b, a, s), (fi, ft, scale))
    _assert_close(swapped, dense)
    # One direction at a time: a strip of rows against all columns, its positives at an offset.
    for rows, cols in ((fi, ft), (ft, fi)):
        def one_way(r, c, s):
            return tiled_cross_entropy_sum(r[6:13], c, s, 6, (3, 4))

        def dense_one_way(r, c, s):
            return F.cross_entropy(s * r[6:13] @ c.t(), torch.arange(6, 13), reduction="sum")

        inputs = (rows, cols, scale)
        _assert_close(_value_and_grads(one_way, inputs), _value_and_grads(dense_one_way, inputs))


def test_sigmoid_strip_with_offset():
    fi, ft = _features(13, seed=8)
    scale, bias = torch.tensor(8.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)

    def dense(a, b, s, c):
        logits = s * a[4:9] @ b.t() + c  # [5, 13]
        signs = -torch.ones(5, 13)
        signs[torch.arange(5), torch.arange(4, 9)] = 1.0
        return -F.logsigmoid(signs * logits).sum()

    tiled = _value_and_grads(lambda a, b, s, c: tiled_sigmoid_sum(a[4:9], b, s, c, 4, (2, 6)), (fi, ft, scale, bias))
    _assert_close(tiled, _value_and_grads(dense, (fi, ft, scale, bias)))


def test_backward_passes_gradcheck_in_fp64():
    fi, ft = _features(6, dim=4, seed=2, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: tiled_cross_entropy_sum(a, b, s, 0, (4, 3), True), (fi, ft, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: tiled_cross_entropy_sum(a[2:5], b, s, 2, 2), (fi, ft, scale))
    assert torch.autograd.gradcheck(lambda a, b, s, c: tiled_sigmoid_sum(a, b, s, c, 0, (5, 2)), (fi, ft, scale, bias))


def test_bf16_features_computed_in_fp32():
    fi, ft = _features(40, dim=16, seed=6, dtype=torch.bfloat16)
    scale = torch.tensor(50.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    value, grads = _value_and_grads(lambda a, b, s: chunked_clip_loss(a, b, s, 16), (fi, ft, scale))
    assert value.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    # Reference: the dense loss in fp32 on exactly the same (bf16-representable) feature values.
    up = [x.detach().float().requires_grad_() for x in (fi, ft)]
    ref_value, ref_grads = _value_and_grads(_dense_clip, (*up, scale))
    assert torch.allclose(value, ref_value, rtol=1e-5)
    assert torch.allclose(grads[2], ref_grads[2], rtol=1e-4)
    for g, r in zip(grads[:2], ref_grads[:2]):
        # The only difference left is rounding the fp32 gradient to bf16 (8 significant bits).
        assert torch.allclose(g.float(), r, rtol=2**-7, atol=1e-6)
    value, grads = _value_and_grads(lambda a, b, s, c: chunked_siglip_loss(a, b, s, c, 7), (fi, ft, scale, bias))
    ref_value, ref_grads = _value_and_grads(_dense_siglip, (*up, scale, bias))
    assert torch.allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads[:2], ref_grads[:2]):
        assert torch.allclose(g.float(), r, rtol=2**-7, atol=1e-6)


def test_float_scale_and_no_grad_inputs():
    fi, ft = _features(9, seed=3)
    expected = _dense_clip(fi, ft, 12.0)
    assert torch.allclose(chunked_clip_loss(fi, ft, 12.0, 4), expected, rtol=1e-6)
    with torch.no_grad():
        assert torch.allclose(chunked_clip_loss(fi, ft, torch.tensor(12.0), 4), expected.detach(), rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 3, (2, 5)])
def test_hardest_negatives_match_masked_argmax(chunk):
    fi, ft = _features(17, seed=9)
    sims = fi @ ft.t()
    expected = sims.masked_fill(torch.eye(17, dtype=torch.bool), float("-inf")).argmax(dim=1)
    assert torch.equal(hardest_negatives(fi, ft, 0, chunk), expected)
    strip = sims[5:11].clone()
    strip[torch.arange(6), torch.arange(5, 11)] = float("-inf")
    assert torch.equal(hardest_negatives(fi[5:11], ft, 5, chunk), strip.argmax(dim=1))


@pytest.mark.parametrize("name", ["margin_hinge", "triplet_loss"])
def test_chunked_margin_search_gives_dense_gradients(name):
    fi, ft = _features(23, seed=11)
    fn = getattr(losses, name)
    dense = _value_and_grads(lambda a, b: fn(a, b, 0.9), (fi, ft))
    _assert_close(_value_and_grads(lambda a, b: fn(a, b, 0.9, chunk_size=(4, 6)), (fi, ft)), dense)


@pytest.mark.parametrize("bad", [0, -2, (3,), (4, 0), 2.5, True])
def test_bad_chunk_size_is_rejected(bad):
    fi, ft = _features(4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_clip_loss(fi, ft, 1.0, bad)


def _wide_range_features():
    """Texts near e1; half the images near e1, half near -e1: at scale 100 their rows span 200 nats."""
    gen = torch.Generator().manual_seed(12)
    base = torch.zeros(16, 8)
    base[:, 0] = 1.0
    text = F.normalize(base + 0.05 * torch.randn(16, 8, generator=gen), dim=-1)
    sign = torch.ones(16, 1)
    sign[::2] = -1.0
    image = F.normalize(sign * base + 0.05 * torch.randn(16, 8, generator=gen), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def test_tiles_with_a_wide_logit_range_stay_exact():
    fi, ft = _wide_range_features()
    scale = torch.tensor(100.0, requires_grad=True)
    dense = _value_and_grads(_dense_clip, (fi, ft, scale))
    _assert_close(_value_and_grads(lambda a, b, s: chunked_clip_loss(a, b, s, (4, 8)), (fi, ft, scale)), dense)


def test_wide_range_needs_the_exact_fallback(monkeypatch):
    """Negative control: with the one-shift path forced on every tile, the same inputs come out wrong."""
    from clipforge import losses_chunked

    fi, ft = _wide_range_features()
    monkeypatch.setattr(losses_chunked, "_SHARED_SHIFT_RANGE", float("inf"))
    value = chunked_clip_loss(fi, ft, 100.0, (4, 8))
    assert not torch.isclose(value, _dense_clip(fi, ft, 100.0), rtol=1e-3)
