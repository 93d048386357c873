"""The zero-shot-initialised head: before training its logits are zero-shot's (class embeddings computed here by
hand from the text tower, times the logit scale); training fits the k-shot set; the file round-trips and is read by
`clipforge eval zeroshot --head` and `clipforge.load_head`; wrong heads are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.adapt.fit import HeadOptions, fit_head
from clipforge.adapt.head import LinearHead, train_head, zeroshot_head
from clipforge.checkpoint import save_model
from clipforge.cli import main
from clipforge.eval.evaluators import EvalOptions, Session
from clipforge.eval.tasks import SourceOptions

OPTS = EvalOptions(source=SourceOptions(per_class=2), cache_dir=None)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    save_model(clipforge.create_model("ViT-Micro-8-32"), path)
    return path


def test_initial_head_is_the_zero_shot_classifier(model_path):
    head, results = fit_head(str(model_path), "synthetic", HeadOptions(shots=1, epochs=0), OPTS)
    model = clipforge.load_model(model_path)
    ev = Session(model, clipforge.get_tokenizer("ViT-Micro-8-32"), None, "synthetic", OPTS)
    data, features, labels = ev.labelled_features("test")
    # by hand: per class, the normalised mean of the normalised prompt embeddings, times exp(logit_scale)
    tokenizer = clipforge.get_tokenizer("ViT-Micro-8-32")
    with torch.no_grad():
        rows = []
        for name in data.prompts:
            emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in data.templates])).double(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=0))
        expected = model.logit_scale.exp().double() * features.double() @ torch.stack(rows).t()  # [N, C]
    torch.testing.assert_close(head(features).double(), expected, rtol=1e-5, atol=1e-5)
    assert head.classnames == list(data.classnames) and torch.equal(head.bias, torch.zeros(len(data.classnames)))
    zeroshot = main_json(["eval", "zeroshot", "--model", str(model_path), "--per-class", "2", "--no-cache"])
    assert results["zeroshot_init"]["acc1"] == results["head"]["acc1"] == zeroshot["acc1"]


def main_json(argv):
    from clipforge.eval.runner import finite_or_none, run_eval  # the CLI's own path, without printing

    assert main([*argv, "--output", "/dev/null"]) == 0
    task, model = argv[1], argv[argv.index("--model") + 1]
    head = argv[argv.index("--head") + 1] if "--head" in argv else None
    per_class = int(argv[argv.index("--per-class") + 1]) if "--per-class" in argv else 20
    return finite_or_none(run_eval(task, model, "synthetic", EvalOptions(source=SourceOptions(per_class=per_class),
                                                                          head=head)))


def test_training_fits_the_shots_and_the_file_round_trips(model_path, tmp_path):
    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(8, 8, generator=gen), dim=-1)  # 8 points in 8-d: any labels separable
    labels = torch.arange(8) % 4
    start = LinearHead(torch.zeros(4, 8), torch.zeros(4), ["a", "b", "c", "d"])
    trained = train_head(start, features, labels, epochs=300, lr=0.05)
    assert torch.equal(trained(features).argmax(1), labels)
    path = trained.save(tmp_path / "h.safetensors")
    loaded = clipforge.load_head(path)
    assert torch.equal(loaded.weight, trained.weight) and loaded.classnames == ["a", "b", "c", "d"]
    assert zeroshot_head(torch.eye(8)[:, :4], 2.0, "abcd").weight.tolist() == (2 * torch.eye(8)[:4]).tolist()


def test_cli_head_used_by_eval_and_errors(model_path, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    assert main(["finetune-head", "--model", str(model_path), "--dataset", "synthetic", "--shots", "2",
                 "--epochs", "20", "--lr", "0.01", "--output", str(head), "--no-cache"]) == 0
    stats = json.loads(capsys.readouterr().out.split("Head written")[0])
    with_head = main_json(["eval", "zeroshot", "--model", str(model_path), "--no-cache", "--head", str(head)])
    assert with_head["head"] == str(head) and with_head["acc1"] == pytest.approx(stats["head"]["acc1"])
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    torch.manual_seed(4)
    save_model(clipforge.create_model("ViT-Micro-8-32"), other)
    for argv, message in [
        (["eval", "zeroshot", "--model", str(other), "--head", str(head)], "fitted on the features of another model"),
        (["eval", "zeroshot", "--model", str(model_path), "--head", str(model_path)], "not a clipforge head"),
        (["eval", "retrieval", "--model", str(model_path), "--head", str(head)], "applies to the zeroshot task"),
        (["finetune-head", "--model", str(model_path), "--dataset", "synthetic", "--lr", "0", "--output",
          str(tmp_path / "x")], "expected --shots >= 0, --epochs >= 0, --lr > 0"),
    ]:
        assert main([*argv, "--no-cache"] if argv[0] == "eval" else argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
