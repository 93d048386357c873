"""Gradient cache: the parameter gradients equal those of one pass over the whole batch with a graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipforge
from clipforge.losses import LossConfig, compute_loss
from clipforge.train import gradcache
from clipforge.train.gradcache import gradcache_backward

EOT = 49407


def make_batch(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, 32, 32] and tokens [B, 16]: random ids, an end-of-text token, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    tokens = torch.zeros(batch, 16, dtype=torch.long)
    for i in range(batch):
        length = int(torch.randint(1, 15, (1,), generator=gen))
        tokens[i, :length] = torch.randint(1, EOT - 1, (length,), generator=gen)
        tokens[i, length] = EOT
    return images, tokens


class NoisyTowers(nn.Module):
    """CLIP's towers behind random augmentation (noise on the pixels) and dropout on the features."""

    def __init__(self, model: nn.Module, p: float = 0.3) -> None:
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(p)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images + 0.2 * torch.randn_like(images)
        image_features = F.normalize(self.dropout(self.model.encode_image(images)), dim=-1)
        text_features = F.normalize(self.dropout(self.model.encode_text(tokens)), dim=-1)
        return image_features, text_features


def _model(bias: float | None = None, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    cfg = clipforge.get_model_config("ViT-Micro-8-32")
    if bias is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, init_logit_bias=bias, init_logit_scale=2.302585092994046)
    return clipforge.create_model(cfg).to(dtype)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def assert_same_grads(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-9) -> None:
    """Max error per parameter within `tol` of its largest gradient. The default is for float64 runs: there an
    algorithmic slip shows as an O(1) relative error and rounding, whatever the CPU's kernels, stays near 1e-13."""
    assert ours.keys() == ref.keys()
    for name, r in ref.items():
        err = (ours[name] - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= tol * scale + 1e-30, f"{name}: max error {err:.3g} vs max |grad| {scale:.3g}"


def assert_no_worse_than_one_pass(ours: dict[str, torch.Tensor], one_pass: dict[str, torch.Tensor],
                                  exact: dict[str, torch.Tensor]) -> None:
    """float32 results judged against a float64 computation: our error may be a few times that of the float32
    one-pass reference on this CPU (how well conditioned each gradient is, measured rather than assumed), plus a
    few units in the last place of the largest gradient."""
    for name, x in exact.items():
        ours_err = (ours[name].double() - x).abs().max().item()
        ref_err = (one_pass[name].double() - x).abs().max().item()
        allowed = 8 * ref_err + 8 * torch.finfo(torch.float32).eps * x.abs().max().item()
        assert ours_err <= allowed, f"{name}: error {ours_err:.3g}, one pass {ref_err:.3g}, allowed {allowed:.3g}"


def _loss_fn(cfg: LossConfig):
    def fn(image_features, text_features, logit_scale, logit_bias=None):
        return compute_loss(cfg, image_features, text_features, logit_scale.exp(), logit_bias)

    return fn


def _loss_params(model: nn.Module) -> list[torch.Tensor]:
    return [model.logit_scale] + ([model.logit_bias] if model.logit_bias is not None else [])


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(), LossConfig(margin_lambda=0.5, margin_form="hinge", margin_target=1.0), LossConfig(name="siglip")],
    ids=["clip", "clip+hinge", "siglip"],
)
def _one_pass_and_gradcache(cfg: LossConfig, dtype: torch.dtype) -> tuple[dict, dict, dict, dict]:
    """(reference grads, reference loss parts, gradcache grads, gradcache loss parts) in `dtype`."""
    model = _model(bias=-10.0 if cfg.name == "siglip" else None, dtype=dtype)
    images, tokens = make_batch(11, seed=1)
    images = images.to(dtype)
    params = _loss_params(model)
    loss_fn = _loss_fn(cfg)

    image_features, text_features, _ = model(images, tokens)  # the whole batch in one graph
    ref_out = loss_fn(image_features, text_features, *params)
    ref_out["loss"].backward()
    ref = _grads(model)

    def encode(im, tok):
        return model(im, tok)[:2]

    out = gradcache_backward(encode, loss_fn, (images, tokens), chunk_size=4, loss_params=params)  # 4, 4, 3
    return ref, {k: v.detach() for k, v in ref_out.items()}, _grads(model), {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(), LossConfig(margin_lambda=0.5, margin_form="hinge", margin_target=1.0), LossConfig(name="siglip")],
    ids=["clip", "clip+hinge", "siglip"],
)
def test_equals_one_full_batch_pass(cfg):
    ref, ref_out, ours, out = _one_pass_and_gradcache(cfg, torch.float64)
    assert_same_grads(ours, ref)
    for key, value in ref_out.items():
        assert torch.allclose(out[key], value, rtol=1e-12, atol=0), key
    # In float32, judged against float64 rather than against the float32 one-pass rounding of one CPU (a
    # tolerance of 1e-5 of the largest gradient failed on an Intel AMX machine: 4.4e-5 for siglip's logit_scale).
    ref32, _, ours32, _ = _one_pass_and_gradcache(cfg, torch.float32)
    assert_no_worse_than_one_pass(ours32, ref32, ref)


def test_dropout_and_augmentation_replayed_exactly():
    towers = NoisyTowers(_model())
    images, tokens = make_batch(10, seed=2)
    cfg = LossConfig(margin_lambda=0.3)
    loss_fn = _loss_fn(cfg)
    params = [towers.model.logit_scale]
    chunks = [(images[s : s + 3], tokens[s : s + 3]) for s in range(0, 10, 3)]

    # Reference: the same chunks embedded in order, all in one graph, from the same RNG state.
    torch.manual_seed(123)
    embedded = [towers(*c) for c in chunks]
    loss = loss_fn(torch.cat([e[0] for e in embedded]), torch.cat([e[1] for e in embedded]), *params)["loss"]
    loss.backward()
    ref = _grads(towers)
    rng_after_reference = torch.rand(3)

    torch.manual_seed(123)
    out = gradcache_backward(towers, loss_fn, (images, tokens), chunk_size=3, loss_params=params)
    assert torch.equal(torch.rand(3), rng_after_reference)  # the RNG continues as after one pass
    assert_same_grads(_grads(towers), ref)
    assert torch.allclose(out["loss"], loss.detach(), rtol=1e-6)


def test_replay_without_restoring_the_rng_would_be_wrong(monkeypatch):
    """Negative control: if the second pass drew fresh noise the gradients would differ."""
    towers = NoisyTowers(_model())
    images, tokens = make_batch(8, seed=3)
    loss_fn = _loss_fn(LossConfig())
    params = [towers.model.logit_scale]
    torch.manual_seed(5)
    gradcache_backward(towers, loss_fn, (images, tokens), chunk_size=3, loss_params=params)
    good = _grads(towers)
    monkeypatch.setattr(gradcache._RngState, "restore", lambda self: None)
    torch.manual_seed(5)
    gradcache_backward(towers, loss_fn, (images, tokens), chunk_size=3, loss_params=params)
    bad = _grads(towers)
    with pytest.raises(AssertionError):
        assert_same_grads(bad, good, tol=1e-3)


def test_parameters_closed_over_by_the_loss_get_their_gradient():
    model = _model()
    images, tokens = make_batch(6, seed=4)
    cfg = LossConfig()
    image_features, text_features, scale = model(images, tokens)
    compute_loss(cfg, image_features, text_features, scale)["loss"].backward()
    ref = _grads(model)

    def loss_fn(fi, ft):  # uses model.logit_scale directly instead of through loss_params
        return compute_loss(cfg, fi, ft, model.logit_scale.exp())

    gradcache_backward(lambda im, tok: model(im, tok)[:2], loss_fn, (images, tokens), chunk_size=5)
    assert_same_grads(_grads(model), ref)


def test_bad_arguments():
    model = _model()
    images, tokens = make_batch(4, seed=0)
    encode = lambda im, tok: model(im, tok)[:2]
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_backward(encode, _loss_fn(LossConfig()), (images, tokens), chunk_size=0)
    with pytest.raises(ValueError, match="different batch sizes"):
        gradcache_backward(encode, _loss_fn(LossConfig()), (images, tokens[:3]), chunk_size=2)
    with pytest.raises(ValueError, match="'loss' entry"):
        gradcache_backward(encode, lambda a, b: {"clip": a.sum()}, (images, tokens), chunk_size=2)
