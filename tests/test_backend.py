"""`clipforge embed` / `search` / `serve` with `--backend torch|onnx|onnx-int8`: ONNX embeddings equal PyTorch's
through the embed command, int8 within a bound derived from its measured per-vector error, an index never mixes
backends, a server on an ONNX index answers text and image queries over HTTP, and bad input is one line."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from search_index import running_server

from clipforge.cli import main
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.search.errors import SearchError

pytest.importorskip("onnxruntime")  # [onnx] is part of [test]; this only guards a partial install
pytest.importorskip("faiss")

N = 48
COMMON = ["--workers", "0", "--no-progress", "--part-size", "20", "--batch-size", "7"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP saved to disk, its ONNX export (fp32 + int8), an fp32-only copy of the export, and N synthetic
    scenes as PNG files with caption sidecars."""
    from clipforge import create_model
    from clipforge.checkpoint import save_model
    from clipforge.export.onnx_export import OnnxExportOptions, export_onnx
    from clipforge.export.quantize import CostOptions

    root = tmp_path_factory.mktemp("backend")
    torch.manual_seed(0)
    model = create_model("ViT-Micro-8-32").eval()
    model_path = save_model(model, root / "model.safetensors")
    export_onnx(model, root / "onnx", OnnxExportOptions(int8=True, cost=CostOptions(datasets=())))
    fp32_only = shutil.copytree(root / "onnx", root / "onnx-fp32-only")
    for name in ("visual.int8.onnx", "textual.int8.onnx"):
        (fp32_only / name).unlink()
    world = SyntheticWorld(SyntheticConfig(image_size=model.image_size))
    images = root / "images"
    images.mkdir()
    for i in range(N):
        image, caption = world.pair(STREAM_TRAIN, 7_000 + i)
        image.save(images / f"img_{i:03d}.png")
        (images / f"img_{i:03d}.txt").write_text(caption)
    return {"root": root, "model": model_path, "onnx": root / "onnx", "fp32_only": fp32_only, "images": images}


def embed(setup: dict[str, Path], backend: str, name: str | None = None) -> Path:
    out = setup["root"] / (name or f"emb-{backend}")
    if not (out / "manifest.json").is_file():
        model = setup["model"] if backend == "torch" else setup["onnx"]
        assert main(["embed", str(setup["images"]), "--model", str(model), "--output", str(out),
                     "--backend", backend, *COMMON]) == 0
    return out


def vectors(root: Path, role: str = "img") -> np.ndarray:
    """The stored unit vectors [rows, dim] in float64, parts in order."""
    manifest = json.loads((root / "manifest.json").read_text())
    return np.concatenate([np.load(root / part["files"][role]) for part in manifest["parts"]]).astype(np.float64)


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error:") and "\n" not in err, err
    return err


def test_onnx_embeddings_equal_torch_embeddings_through_the_embed_command(setup) -> None:
    torch_dir, onnx_dir = embed(setup, "torch"), embed(setup, "onnx")
    for role in ("img", "text"):
        a, b = vectors(torch_dir, role), vectors(onnx_dir, role)
        assert a.shape == b.shape == (N, 32)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.9999, (role, cosine.min())
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (torch_dir, onnx_dir)]
    assert [m["backend"] for m in manifests] == ["torch", "onnx"]
    assert [m["fingerprint"]["backend"] for m in manifests] == ["torch", "onnx"]
    assert manifests[1]["model"] == str(setup["onnx"].resolve())
    assert manifests[1]["fingerprint"]["preprocessing"] == json.loads((setup["onnx"] / "preprocess.json").read_text())


def test_fingerprint_covers_the_graph_bytes_and_the_backend(setup, tmp_path) -> None:
    from clipforge.search.encoder import load_encoder

    fp32, int8 = load_encoder(str(setup["onnx"]), "onnx"), load_encoder(str(setup["onnx"]), "onnx-int8")
    assert fp32.fingerprint["files_sha256"] != int8.fingerprint["files_sha256"]
    assert load_encoder(str(setup["fp32_only"]), "onnx").fingerprint == fp32.fingerprint  # same bytes, same id
    changed = shutil.copytree(setup["fp32_only"], tmp_path / "changed")
    info = json.loads((changed / "export.json").read_text())
    (changed / "export.json").write_text(json.dumps({**info, "logit_scale": info["logit_scale"] + 1}))
    assert load_encoder(str(changed), "onnx").fingerprint["files_sha256"] != fp32.fingerprint["files_sha256"]


def test_int8_embeddings_agree_within_a_bound_derived_from_their_error(setup) -> None:
    """Through the embed command, int8 vectors stay within cosine 0.99 of fp32 ones (the export tests' int8
    criterion), and int8 keeps top-1 neighbours at least as well as unstructured noise of its own measured size
    would: the floor is the agreement when every fp32 score gets an independent draw from int8's measured
    score errors (the pool of s_int8 - s_fp32 over all pairs), less 3 binomial standard deviations. Errors that
    collapse embeddings or push neighbours apart selectively fall below it; a random-weight model's crowded
    neighbourhoods keep the exact agreement itself below 1 (0.90 measured), so it is not asserted as such."""
    fp32_dir, int8_dir = embed(setup, "onnx"), embed(setup, "onnx-int8")
    x, x8 = vectors(fp32_dir), vectors(int8_dir)
    rng = np.random.default_rng(0)
    agree, predicted = [], []
    for query_role in ("img", "text"):
        q, q8 = vectors(fp32_dir, query_role), vectors(int8_dir, query_role)
        assert (q * q8).sum(1).min() > 0.99, query_role  # the per-vector error itself stays small
        scores, scores8 = q @ x.T, q8 @ x8.T  # [N, N]
        errors = (scores8 - scores)[~np.eye(N, dtype=bool)] if query_role == "img" else (scores8 - scores).ravel()
        if query_role == "img":  # an image's nearest other image: its own row is left out
            np.fill_diagonal(scores, -np.inf)
            np.fill_diagonal(scores8, -np.inf)
        best = scores.argmax(1)  # [N]
        agree.append(best == scores8.argmax(1))
        draws = [(best == (scores + rng.choice(errors, size=scores.shape)).argmax(1)).mean() for _ in range(200)]
        predicted.append(float(np.mean(draws)))
    measured, floor = float(np.concatenate(agree).mean()), float(np.mean(predicted))
    assert measured >= floor - 3 * np.sqrt(floor * (1 - floor) / (2 * N)), (measured, floor)


@pytest.fixture(scope="module")
def indices(setup) -> dict[str, Path]:
    out = {}
    for backend in ("torch", "onnx"):
        out[backend] = setup["root"] / f"index-{backend}"
        assert main(["index", "build", str(embed(setup, backend)), "--index", str(out[backend]), "--kind", "flat",
                     "--queries", "20"]) == 0
    return out


def test_an_index_never_mixes_backends(setup, indices, capsys) -> None:
    capsys.readouterr()
    assert main(["index", "build", str(embed(setup, "torch")), str(embed(setup, "onnx")),
                 "--index", str(setup["root"] / "mixed"), "--kind", "flat"]) == 2
    err = one_line_error(capsys)
    assert "backend mismatch" in err and "--backend torch" in err and "--backend onnx" in err
    assert not (setup["root"] / "mixed").exists()
    assert main(["index", "add", str(indices["onnx"]), str(embed(setup, "onnx-int8"))]) == 2
    assert "backend mismatch" in one_line_error(capsys)
    info = json.loads((indices["onnx"] / "index.json").read_text())
    assert info["backend"] == "onnx" and info["fingerprint"]["backend"] == "onnx"


def test_search_reuses_the_recorded_backend_and_refuses_another(setup, indices, capsys) -> None:
    from clipforge import Searcher
    from clipforge.search.encoder import OnnxEncoder

    searcher = Searcher(indices["onnx"])
    assert searcher.backend == "onnx" and isinstance(searcher.encoder, OnnxEncoder)
    caption = (setup["images"] / "img_005.txt").read_text()
    capsys.readouterr()
    assert main(["search", str(indices["onnx"]), caption, "-k", "3", "--output",
                 str(setup["root"] / "hits.json")]) == 0
    answer = json.loads((setup["root"] / "hits.json").read_text())
    assert [h["id"] for h in answer["results"]] == [h["id"] for h in searcher.search(text=caption, k=3)["results"]]
    assert main(["search", str(indices["onnx"]), "a red circle", "--backend", "torch"]) == 2
    err = one_line_error(capsys)
    assert "--backend torch" in err and "was embedded with --backend onnx" in err
    with pytest.raises(SearchError, match="embedded with --backend torch"):
        Searcher(indices["torch"], backend="onnx-int8")
    # the torch model's fingerprint against the ONNX index: refused on the backend, in one line
    assert main(["search", str(indices["onnx"]), "a red circle", "--model", str(setup["model"])]) == 2
    assert "needs an ONNX export folder" in one_line_error(capsys)


def test_serve_on_an_onnx_index_answers_text_and_image_queries_over_http(setup, indices) -> None:
    import httpx

    from clipforge import Searcher
    from clipforge.search.server import create_app

    searcher = Searcher(indices["onnx"], backend="onnx")  # as `clipforge serve INDEX --backend onnx` builds it
    stored = vectors(embed(setup, "onnx"))
    image_path = setup["images"] / "img_011.png"
    with running_server(create_app(searcher)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):  # bounded: three rounds of both queries
            text = client.get("/api/search", params={"text": "a red circle", "k": 5})
            assert text.status_code == 200, text.text
            direct = searcher.search(text="a red circle", k=5)
            assert [r["id"] for r in text.json()["results"]] == [h["id"] for h in direct["results"]]
            files = {"image": ("q.png", image_path.read_bytes(), "image/png")}
            image = client.post("/api/search", files=files, data={"k": "3"})
            assert image.status_code == 200, image.text
            best = image.json()["results"][0]
            assert best["id"] == 11 and best["score"] == pytest.approx(float(stored[11] @ stored[11]), abs=2e-3)
        info = client.get("/api/info").json()
        assert info["images"] == N and info["backend"] == "onnx" and info["model"] == "onnx"
        bad = client.post("/api/search", files={"image": ("q.png", b"not an image", "image/png")})
        assert bad.status_code == 400 and client.get("/healthz").status_code == 200
    buffer = io.BytesIO()
    from PIL import Image

    Image.open(image_path).save(buffer, format="PNG")
    labels = searcher.classify(buffer.getvalue(), ["a red circle", "a blue square"])
    assert sum(item["probability"] for item in labels) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("case", ["model-file", "no-int8", "no-folder", "not-an-export", "precision", "device"])
def test_bad_backend_input_is_one_line(setup, tmp_path, capsys, case: str) -> None:
    model = {"model-file": setup["model"], "no-int8": setup["fp32_only"], "no-folder": tmp_path / "nowhere",
             "not-an-export": setup["images"]}
    backend = "onnx-int8" if case == "no-int8" else "onnx"
    argv = ["embed", str(setup["images"]), "--model", str(model.get(case, setup["onnx"])), "--output",
            str(tmp_path / "o"), "--backend", backend, *COMMON]
    argv += {"precision": ["--precision", "bf16"], "device": ["--device", "cuda"]}.get(case, [])
    assert main(argv) == 2
    err = one_line_error(capsys)
    expected = {
        "model-file": "--backend onnx needs an ONNX export folder as --model",
        "no-int8": f"--backend onnx-int8 needs {setup['fp32_only'] / 'visual.int8.onnx'}; run clipforge export "
                   "--to onnx --int8",
        "no-folder": "(no such folder); run clipforge export --to onnx --model MODEL --output DIR and pass DIR",
        "not-an-export": f"got {setup['images']} (no export.json)",
        "precision": "--precision bf16 applies to --backend torch",
        "device": "--backend onnx runs on the CPU",
    }[case]
    assert expected in err, err
    assert not (tmp_path / "o").exists()


def test_missing_onnxruntime_names_the_extra(setup, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert main(["embed", str(setup["images"]), "--model", str(setup["onnx"]), "--output", str(tmp_path / "o"),
                 "--backend", "onnx", *COMMON]) == 2
    assert one_line_error(capsys) == ('clipforge: error: onnxruntime is not installed; ONNX export and inference '
                                      'need it: pip install -e ".[onnx]"')


def test_fingerprints_written_before_backends_mean_torch() -> None:
    from clipforge.search.fingerprint import check_fingerprint

    check_fingerprint({"dim": 4}, {"backend": "torch", "dim": 4})
    with pytest.raises(SearchError, match="backend mismatch: index was embedded with --backend torch, this model "
                                          "with --backend onnx-int8"):
        check_fingerprint({"dim": 4}, {"backend": "onnx-int8", "dim": 4})
