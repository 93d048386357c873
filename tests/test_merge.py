"""WiSE-FT: alpha = 0 and 1 give the endpoints bitwise, alpha = 0.5 the hand-computed average (float64, rounded
once); the CLI writes a model every loader reads; different architectures and a bad alpha are one-line errors."""

from __future__ import annotations

import torch

import clipforge
from clipforge.adapt.wiseft import interpolate, plot_sweep, sweep
from clipforge.checkpoint import save_model
from clipforge.cli import main


def _model(seed: int, name: str = "ViT-Micro-8-32") -> torch.nn.Module:
    torch.manual_seed(seed)
    return clipforge.create_model(name).eval()


def test_endpoints_and_midpoint():
    a, b = _model(0), _model(1)
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in interpolate(a, b, 0.0).state_dict().items():
        assert torch.equal(value, sa[key]), key
    for key, value in interpolate(a, b, 1.0).state_dict().items():
        assert torch.equal(value, sb[key]), key
    half = interpolate(a, b, 0.5).state_dict()
    for key in sa:
        by_hand = ((sa[key].double() + sb[key].double()) / 2).float()  # one rounding of the exact average
        assert torch.equal(half[key], by_hand), key
    quarter = interpolate(a, b, 0.25).state_dict()["text_projection"].double()
    torch.testing.assert_close(quarter, 0.75 * sa["text_projection"].double() + 0.25 * sb["text_projection"].double(),
                               rtol=1e-7, atol=1e-8)


def test_cli_merge_and_errors(tmp_path, capsys):
    pa, pb, pc = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    save_model(_model(0), pa)
    save_model(_model(1), pb)
    save_model(_model(2, "ViT-Tiny-8-64"), pc)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--model", str(pa), "--model", str(pb), "--alpha", "0.5", "--output", str(out)]) == 0
    merged = clipforge.load_model(out)
    expected = interpolate(clipforge.load_model(pa), clipforge.load_model(pb), 0.5)
    for key, value in merged.state_dict().items():
        assert torch.equal(value, expected.state_dict()[key])
    capsys.readouterr()
    for argv, message in [
        (["--model", str(pa), "--model", str(pc)], "models A and B have different architectures (embed_dim: 32 vs 192)"),
        (["--model", str(pa), "--model", str(pb), "--alpha", "1.5"], "--alpha 1.5: expected a value in [0, 1]"),
        (["--model", str(pa)], "--model: give exactly two models"),
    ]:
        assert main(["merge", *argv, "--output", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_sweep_and_plot(tmp_path):
    a, b = _model(0), _model(1)
    points = sweep(a, b, [0.0, 0.5, 1.0], lambda m: {"scale": m.logit_scale.item(), "w": m.text_projection[0, 0].item()})
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["w"] == a.text_projection[0, 0].item() and points[2]["w"] == b.text_projection[0, 0].item()
    path = plot_sweep(tmp_path / "s.png", points, "w", "scale", "x", "y", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
