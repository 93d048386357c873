"""The end of `clipforge demo`: new synthetic images embedded, indexed and searched, and the serve command."""

from __future__ import annotations

from clipforge.cli import main
from clipforge.data.synthetic import SyntheticConfig

TINY = ["--model=ViT-Micro-8-32", "--data.synthetic.image_size=32", "--batch_size=8", "--steps=2",
        "--data.num_workers=0", "--precision=fp32", "--optim.warmup_steps=1"]


def test_search_demo_embeds_indexes_and_searches(tmp_path, capsys):
    from clipforge import Searcher
    from clipforge.search.demo_search import run_search_demo

    assert main(["train", "--no-progress", f"--output_dir={tmp_path}", "--run_name=r", *TINY]) == 0
    run = tmp_path / "r"
    lines = run_search_demo(run, SyntheticConfig(image_size=32), count=150, k=3, progress=False)
    assert capsys.readouterr().out.strip().endswith(lines[-1])
    assert "embedded and indexed 150 new images" in lines[0]
    searches = [line for line in lines if line.startswith(("  text search", "  image search"))]
    assert len(searches) == 3
    assert lines[-1].strip().startswith(f"Open them in the browser:  clipforge serve {run / 'search' / 'index'}")
    searcher = Searcher(run / "search" / "index")
    assert len(searcher) == 150
    top = searcher.search(text="a red circle", k=3)["results"]
    block = lines[lines.index(searches[0]) + 1: lines.index(searches[0]) + 4]
    assert [line.split()[1] for line in block] == [h["key"] for h in top]  # the printed top 3 are the index's
    # run again: the finished images and embedding parts are reused, the answer is the same
    assert run_search_demo(run, SyntheticConfig(image_size=32), count=150, k=3, progress=False)[1:] == lines[1:]
