"""Distillation: the loss against a hand computation and open_clip's DistillClipLoss, and a run with a teacher."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.checkpoint import save_model
from clipforge.config import ConfigError
from clipforge.factory import create_model
from clipforge.losses_distill import distill_loss
from clipforge.train.config import load_train_config
from clipforge.train.loop import train


def test_distill_loss_by_hand_on_two_pairs() -> None:
    # Student: image 0 = text 0 = e1, image 1 = e2, text 1 = (e1 + e2)/sqrt 2; scale 1.
    r = 1 / math.sqrt(2)
    s_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s_txt = torch.tensor([[1.0, 0.0], [r, r]])
    # Teacher: identical images and texts e1, e2 (cosines = identity), scale ln 3, so each row's softmax is
    # (3/(3+1), 1/(3+1)) = (3/4, 1/4) on the diagonal: exp(ln3 * 1) = 3, exp(0) = 1.
    t = torch.eye(2)
    loss = distill_loss(s_img, s_txt, 1.0, t, t, math.log(3.0))
    # student logits image->text: [[1, r], [0, r]]; text->image = transpose: [[1, 0], [r, r]]
    def log_softmax(a: float, b: float) -> tuple[float, float]:
        z = math.log(math.exp(a) + math.exp(b))
        return a - z, b - z

    rows_i2t = [log_softmax(1, r), log_softmax(0, r)]
    rows_t2i = [log_softmax(1, 0), log_softmax(r, r)]
    p = [(0.75, 0.25), (0.25, 0.75)]  # teacher rows: target on the diagonal
    ce_i2t = -sum(p[i][0] * rows_i2t[i][0] + p[i][1] * rows_i2t[i][1] for i in range(2)) / 2
    ce_t2i = -sum(p[i][0] * rows_t2i[i][0] + p[i][1] * rows_t2i[i][1] for i in range(2)) / 2
    assert float(loss) == pytest.approx((ce_i2t + ce_t2i) / 2, rel=1e-6)


def test_distill_loss_matches_open_clip_and_kl_gradients() -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch must be installed (--no-deps) for the reference tests")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"  # by path: no torchvision import
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_reference_distill", path)
    reference = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(reference)
    dist_loss = reference.DistillClipLoss().dist_loss
    gen = torch.Generator().manual_seed(0)
    si, st, ti, tt = (F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1) for _ in range(4))
    ours = distill_loss(si, st, 7.0, ti, tt, 11.0)
    ref = dist_loss(11.0 * ti @ tt.t(), 7.0 * si @ st.t())
    ref_t = dist_loss(11.0 * tt @ ti.t(), 7.0 * st @ si.t())
    assert float(ours) == pytest.approx(float((ref + ref_t) / 2), rel=1e-12)
    # the gradient is the KL divergence's (cross-entropy minus the teacher's constant entropy)
    si.requires_grad_(True)
    distill_loss(si, st, 7.0, ti, tt, 11.0).backward()
    grad_ce = si.grad.clone()
    si.grad = None
    logits_s, logits_t = 7.0 * si @ st.t(), 11.0 * ti @ tt.t()
    kl = (F.kl_div(logits_s.log_softmax(1), logits_t.log_softmax(1), log_target=True, reduction="batchmean")
          + F.kl_div(logits_s.t().log_softmax(1), logits_t.t().log_softmax(1), log_target=True,
                     reduction="batchmean")) / 2
    kl.backward()
    torch.testing.assert_close(grad_ce, si.grad, rtol=1e-10, atol=1e-12)


TINY = ["--model=ViT-Micro-8-32", "--data.synthetic.image_size=32", "--batch_size=8", "--precision=fp32",
        "--threads=1", "--steps=3", "--log_every=1", "--data.num_workers=0", "--optim.warmup_steps=1"]


def test_training_with_a_teacher_logs_the_distill_term(tmp_path: Path) -> None:
    torch.manual_seed(1)
    teacher = save_model(create_model("ViT-Tiny-8-64"), tmp_path / "teacher.safetensors")  # 64 px: images resized
    cfg = load_train_config(None, [*TINY, f"--output_dir={tmp_path}", "--run_name=s",
                                   f"--loss.distill.teacher={teacher}", "--loss.distill.weight=0.5"])
    result = train(cfg, progress=False)
    steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "distill" in s]
    assert len(steps) == 3
    for entry in steps:
        assert entry["loss"] == pytest.approx(entry["clip"] + 0.5 * entry["distill"], rel=1e-5)
        assert entry["distill"] > 0


@pytest.mark.parametrize("override, match", [
    ("--loss.distill.weight=-1", "loss.distill.weight"),
    ("--loss.distill.temperature=0", "loss.distill.temperature"),
])
def test_bad_distill_config(override: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [*TINY, "--loss.distill.teacher=t.safetensors", override])
