"""The command line as a user calls it: train a few steps, evaluate, run a tiny demo, and clear errors."""

import json

import pytest
import torch

from clipforge.cli import main
from clipforge.train.config import load_train_config

TINY = ["--model=ViT-Micro-8-32", "--data.synthetic.image_size=32", "--batch_size=8", "--steps=3",
        "--log_every=1", "--data.num_workers=0", "--precision=fp32", "--optim.warmup_steps=1"]


def test_train_then_eval_zeroshot_and_retrieval(tmp_path, capsys):
    summary = tmp_path / "train.json"
    assert main(["train", "--no-progress", f"--output_dir={tmp_path}", "--run_name=r", "--output", str(summary),
                 *TINY]) == 0
    run = tmp_path / "r"
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(key in log[0] for key in ("loss", "lr", "temperature", "samples_per_s"))
    assert json.loads(summary.read_text())["run_dir"] == str(run)

    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--model", str(run), "--per-class", "1", "--output", str(out)]) == 0
    zs = json.loads(out.read_text())
    for split in ("seen", "heldout"):
        for scores in (zs, zs["single_template"]):
            assert 0.0 <= scores["subsets"][split]["acc1"] <= scores["subsets"][split]["acc5"] <= 1.0
    out = tmp_path / "ret.json"
    assert main(["eval", "retrieval", "--model", str(run / "model.safetensors"), "--pairs", "20",
                 "--output", str(out)]) == 0
    ret = json.loads(out.read_text())
    assert 0.0 <= ret["image_retrieval_recall@1"] <= ret["image_retrieval_recall@5"] <= 1.0


def test_demo_numbers_are_reproduced_exactly_by_clipforge_eval(tmp_path, capsys):
    out = tmp_path / "demo.json"
    tasks = "--eval.tasks=[{task: zeroshot, per_class: 2}, {task: retrieval, pairs: 20}]"
    assert main(["demo", "--no-progress", "--output", str(out), f"--output_dir={tmp_path}", "--run_name=demo",
                 *TINY, tasks]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    for key in ("zeroshot_seen_top1", "zeroshot_heldout_top1", "zeroshot_seen_top1_single_template",
                "zeroshot_heldout_top1_single_template", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= results[key] <= 1.0
    assert results["train_seconds"] > 0

    # The same model, read back from its run directory by `clipforge eval`, gives the same numbers, exactly.
    run = tmp_path / "demo"
    # trained with the demo's recipe (its weight decay), not the trainer's bare defaults
    assert load_train_config(run / "config.yaml").optim.weight_decay == 3.0
    zs_file, ret_file = tmp_path / "zs.json", tmp_path / "ret.json"
    assert main(["eval", "zeroshot", "--model", str(run), "--per-class", "2", "--no-cache", "--output",
                 str(zs_file)]) == 0
    assert main(["eval", "retrieval", "--model", str(run), "--pairs", "20", "--no-cache", "--output",
                 str(ret_file)]) == 0
    header = ("task", "model", "dataset", "split", "preprocess", "seconds")
    zs = {k: v for k, v in json.loads(zs_file.read_text()).items() if k not in header}
    ret = {k: v for k, v in json.loads(ret_file.read_text()).items() if k not in header}
    assert zs == results["evaluators"]["zeroshot/synthetic"]
    assert ret == results["evaluators"]["retrieval/synthetic"]
    assert results["zeroshot_heldout_top1"] == zs["subsets"]["heldout"]["acc1"]
    assert results["zeroshot_seen_top1_single_template"] == zs["single_template"]["subsets"]["seen"]["acc1"]
    assert results["retrieval_t2i_r1"] == ret["image_retrieval_recall@1"]
    seen, heldout = zs["subsets"]["seen"], zs["subsets"]["heldout"]
    assert (f"| zero-shot top-1, held-out combinations | {100 * zs['single_template']['subsets']['heldout']['acc1']:.1f}%"
            f" | {100 * heldout['acc1']:.1f}% |") in printed
    assert f"| zero-shot top-5, seen combinations | " in printed and f"{100 * seen['acc5']:.1f}% |" in printed


def test_same_seed_gives_the_same_run(tmp_path):
    for name in ("a", "b"):
        assert main(["train", "--no-progress", f"--output_dir={tmp_path}", f"--run_name={name}", *TINY]) == 0
    logs = [(tmp_path / n / "log.jsonl").read_text() for n in ("a", "b")]
    strip = [[{k: v for k, v in json.loads(l).items() if k not in ("samples_per_s", "elapsed_s")}
              for l in log.splitlines()] for log in logs]
    assert strip[0] == strip[1]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,match", [
    (["train", "--optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--config", "missing.yaml"], "missing.yaml does not exist"),
    (["train", "--batch_size=abc"], "'batch_size': expected an integer"),
    (["eval", "zeroshot", "--model", "no/such/model.pt"], "no/such/model.pt"),
    (["eval", "zeroshot", "--model", "ViT-Micro-8-32", "--dataset", "nowhere"], "unknown dataset 'nowhere'"),
])
def test_errors_are_one_clear_line(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_empty_class_list_is_a_clear_error(micro_model):
    from clipforge import get_tokenizer
    from clipforge.config import ConfigError
    from clipforge.eval.zeroshot import build_classifier

    with pytest.raises(ConfigError, match="class list is empty"):
        build_classifier(micro_model, get_tokenizer("ViT-Micro-8-32"), [], ["a {}."])


def test_export_to_each_format_and_back(tmp_path):
    import clipforge
    from clipforge.checkpoint import save_model

    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Micro-8-32").eval()
    source = save_model(model, tmp_path / "m.safetensors")
    images = torch.randn(2, 3, 32, 32)
    expected = model.encode_image(images)
    for fmt, out in (("hf", tmp_path / "hf"), ("openclip", tmp_path / "oc.pt"), ("openai", tmp_path / "oa.pt"),
                     ("clipforge", tmp_path / "cf.safetensors")):
        assert main(["export", "--model", str(source), "--to", fmt, "--output", str(out)]) == 0
        # The OpenAI and OpenCLIP layouts hold no architecture (heads, activation): the sidecar OUT.json does.
        for reloaded in (clipforge.load_model(out), clipforge.create_model("ViT-Micro-8-32", pretrained=out)):
            assert torch.allclose(reloaded.encode_image(images), expected, atol=1e-5), fmt


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["export", "--model", str(bad), "--to", "hf", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.pt" in err, err


def test_data_shards_then_train_on_them(tmp_path):
    from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld

    world = SyntheticWorld(SyntheticConfig(image_size=32))
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(24):
        image, caption = world.pair(STREAM_TRAIN, i)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    out = tmp_path / "shards"
    assert main(["data", "shards", "--from", str(folder), "--out", str(out), "--per-shard", "10"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert main(["train", "--no-progress", f"--output_dir={tmp_path}", "--run_name=s", "--data.source=shards",
                 f"--data.path={out}", *TINY]) == 0
    assert (tmp_path / "s" / "model.safetensors").is_file()
