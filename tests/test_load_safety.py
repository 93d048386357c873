"""A model file is data: loading one never imports or runs anything it names, never allocates what its zip
directory claims before checking it, and every refusal is one line naming the file and what was expected.
Also: every command that takes --model resolves it the same way (a run directory works for export too)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.cli import main
from clipforge.config import ConfigError, to_dict
from clipforge.convert import CheckpointFormatError, load_model
from clipforge.models.config import ModelConfig, TextConfig, VisionConfig

EVIL = "cf_evil_module"  # the module an attacker ships beside the model


def malicious_cwd(folder: Path, marker: Path) -> None:
    """What an attacker leaves in the folder a user runs Python from: a module and a package of that name
    (whichever the import system would find) that create `marker` when imported."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / f"{EVIL}.py").write_text(code)
    (folder / f"{EVIL}_pkg").mkdir()
    (folder / f"{EVIL}_pkg" / "__init__.py").write_text(code)
    (folder / f"{EVIL}_pkg" / "x").mkdir()
    (folder / f"{EVIL}_pkg" / "x" / "__init__.py").write_text(code)
    (folder / f"{EVIL}_pkg" / "x" / "model").mkdir()


def hf_text_file(path: Path, hf_model_path: str) -> Path:
    """A clipforge model file whose stored config puts its text tower in `hf_model_path`."""
    cfg = ModelConfig(embed_dim=16, vision_cfg=VisionConfig(image_size=32, layers=1, width=64, patch_size=8),
                      text_cfg=TextConfig(context_length=8, hf_model_path=hf_model_path))
    metadata = {"format": "clipforge", "model_config": json.dumps(to_dict(cfg))}
    save_file({"logit_scale": torch.tensor(2.0)}, str(path), metadata)
    return path


@pytest.mark.parametrize("target", [f"package:{EVIL}.x/model", f"package:{EVIL}_pkg.x/model",
                                    f"package:{EVIL}_pkg/x/model"])
def test_hf_model_path_from_a_file_imports_nothing(target: str, tmp_path: Path) -> None:
    """The attack as a user meets it: `python -c 'import clipforge; clipforge.load_model(...)'` in the folder
    holding the downloaded model and the attacker's module (the cwd is first on sys.path under -c)."""
    marker = tmp_path / "executed"
    malicious_cwd(tmp_path, marker)
    hf_text_file(tmp_path / "model.safetensors", target)
    src = Path(clipforge.__file__).resolve().parents[1]
    script = textwrap.dedent(f"""
        import sys
        sys.path.append({str(src)!r})
        import clipforge
        try:
            clipforge.load_model("model.safetensors")
        except Exception as exc:
            print(type(exc).__name__, exc)
        print({EVIL!r} in sys.modules or {EVIL + '_pkg'!r} in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "False", result.stdout  # never imported
    assert lines[0].startswith("CheckpointFormatError") and "model.safetensors" in lines[0]
    assert "pass hf_text_path=DIR" in lines[0] and repr(target) in lines[0]
    assert not marker.exists()


def test_user_named_package_path_is_found_without_importing(tmp_path: Path, monkeypatch) -> None:
    """Even a `package:` location the user passes is looked up as a folder, never imported, and never in the
    current directory."""
    marker = tmp_path / "executed"
    malicious_cwd(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    path = hf_text_file(tmp_path / "model.safetensors", "/somewhere/else")
    with pytest.raises(FileNotFoundError, match=f"package '{EVIL}_pkg' is not installed"):
        load_model(path, hf_text_path=f"package:{EVIL}_pkg/x/model")
    with pytest.raises(FileNotFoundError, match="top-level package name"):
        load_model(path, hf_text_path=f"package:{EVIL}_pkg.x/model")
    assert not marker.exists() and EVIL + "_pkg" not in sys.modules


def test_folder_with_auto_map_is_refused(tmp_path: Path) -> None:
    """A folder whose config asks transformers to run the code it ships (`auto_map`): refused, never run, even
    when the user allowed the folder."""
    marker = tmp_path / "executed"
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "auto_map": {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.C"}
    }))
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    path = hf_text_file(tmp_path / "model.safetensors", str(folder))
    with pytest.raises(ConfigError, match="config.json: has an 'auto_map'.* never runs code"):
        load_model(path, hf_text_path=folder)
    assert not marker.exists()


def test_text_tower_folder_needs_the_callers_permission(tmp_path: Path) -> None:
    path = hf_text_file(tmp_path / "model.safetensors", str(tmp_path / "encoder"))
    with pytest.raises(CheckpointFormatError, match="does not choose folders or code to load"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        load_model(path, hf_text_path=tmp_path / "missing")  # the caller's folder is the one used
    assert main(["export", "--model", str(path), "--to", "clipforge", "--output", str(tmp_path / "o")]) == 2


class _RepeatedZeros:
    """A deflater for blocks of 16 MiB of zeros that deflates only the first: after a full flush the compressor
    starts afresh, so every further block deflates to the same bytes (2 GiB written in about a second)."""

    def __init__(self) -> None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip entries hold it
        self.block = compressor.compress(bytes(1 << 24)) + compressor.flush(zlib.Z_FULL_FLUSH)
        self.end = compressor.flush(zlib.Z_FINISH)

    def compress(self, data: bytes) -> bytes:
        assert len(data) == 1 << 24 and not data.strip(b"\0")
        return self.block

    def flush(self) -> bytes:
        return self.end


def _torchscript_zip_bomb(path: Path) -> None:
    """~2 MB on disk, one entry that inflates to 2 GiB (deflated zeros), in TorchScript's layout."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("m/code/__torch__/m.py", "")
        archive.writestr("m/version", "3\n")
        info = zipfile.ZipInfo("m/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        zeros = bytes(1 << 24)
        with mock.patch.object(zipfile, "_get_compressor", lambda *_: _RepeatedZeros()):
            with archive.open(info, "w", force_zip64=True) as entry:
                for _ in range(128):  # 128 x 16 MiB; zipfile computes the CRC of the real bytes
                    entry.write(zeros)


def test_zip_bomb_is_refused_before_allocating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    _torchscript_zip_bomb(bomb)
    assert bomb.stat().st_size < 4 << 20
    with zipfile.ZipFile(bomb) as archive:  # a real bomb: the entry inflates to what its directory says
        assert archive.getinfo("m/data/0").file_size == 1 << 31
        with archive.open("m/data/0") as entry:
            assert entry.read(1 << 26) == bytes(1 << 26)
    src = Path(clipforge.__file__).resolve().parents[1]
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(src)!r})
        import clipforge
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            clipforge.load_model({str(bomb)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message, grown_mib = result.stdout.strip().splitlines()
    assert message.startswith("CheckpointFormatError") and str(bomb) in message and "2147483648 bytes" in message
    assert int(grown_mib) < 200, f"peak memory grew by {grown_mib} MiB while refusing"


def test_torch_zip_named_safetensors(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError) as info:
        load_model(tmp_path / "model.safetensors")
    message = str(info.value)
    assert str(tmp_path / "model.safetensors") in message and "expected a safetensors file" in message
    assert "torch.save zip archive" in message and "\n" not in message


def test_hf_config_heads_must_divide_width(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip", "projection_dim": 16,
        "text_config": {"hidden_size": 64, "num_attention_heads": 3, "intermediate_size": 256},
        "vision_config": {"hidden_size": 64, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    }))
    with pytest.raises(CheckpointFormatError, match="'text_config.num_attention_heads' is 3, which does not divide "
                                                    "'text_config.hidden_size' 64"):
        load_model(folder)


def _run_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from clipforge.checkpoint import save_model

    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Micro-8-32").eval()
    run = tmp_path / "runs" / "micro"
    save_model(model, run / "model.safetensors")
    (run / "config.yaml").write_text("model: ViT-Micro-8-32\n")
    return run, model


def test_export_takes_a_run_directory_like_eval(tmp_path: Path) -> None:
    run, model = _run_dir(tmp_path)
    assert main(["export", "--model", str(run), "--to", "openclip", "--output", str(tmp_path / "oc.pt")]) == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "oc.pt").encode_image(images), model.encode_image(images),
                                   atol=1e-5, rtol=0)


def test_cli_names_the_architecture_of_a_bare_file(tmp_path: Path, capsys) -> None:
    _, model = _run_dir(tmp_path)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    out = tmp_path / "cf.safetensors"
    assert main(["export", "--model", str(tmp_path / "bare.pt"), "--to", "clipforge", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bare.pt" in err and "--arch NAME" in err
    assert not out.exists()
    assert main(["export", "--model", str(tmp_path / "bare.pt"), "--to", "clipforge", "--output", str(out),
                 "--arch", "ViT-Micro-8-32", "--gelu"]) == 0
    assert load_model(out).config == clipforge.get_model_config("ViT-Micro-8-32")  # GELU is its own activation


def test_export_openai_note_on_the_command_line(tmp_path: Path, capsys) -> None:
    from clipforge.checkpoint import save_model

    save_model(clipforge.create_model("RN-Tiny-64"), tmp_path / "m.safetensors")
    out = tmp_path / "oa.pt"
    assert main(["export", "--model", str(tmp_path / "m.safetensors"), "--to", "openai", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"Architecture and preprocessing in {out}.json" in captured.out
    note = captured.err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("clipforge: note: ") and "8 image attention heads" in note[0]
    assert load_model(out).config.vision_cfg.num_heads == 8
