"""Atomic writes, clipforge's own model file format, and verified training-checkpoint directories.

A clipforge model file is a `.safetensors` file whose metadata carries `format = clipforge` and the model's
architecture as JSON, so it is self-describing and loads without pickle. A training checkpoint is a directory
of such files plus JSON, with a manifest of checksums (see `write_checkpoint_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file

from .config import to_dict
from .models.config import ModelConfig
from .transforms import model_preprocess

FORMAT_TAG = "clipforge"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read by setting, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the modes a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def os_errors_named(path: Path, rename: bool = False) -> Iterator[None]:
    """Writers outside Python (safetensors) report a full disk or a read-only file system with their own
    exception type; raise it as the OSError it is, naming the file being written (`rename`: OSErrors too, so
    that the name is the destination rather than a temporary one)."""
    try:
        yield
    except OSError as exc:
        if not rename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except Exception as exc:
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with os_errors_named(path):
            write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _default_mode(tmp, directory=False)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
            else:
                _fsync_dir(child)
        _fsync_dir(tmp)
        _default_mode(tmp, directory=True)
        old = None
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
            old = path.with_name(f".{path.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stored_config_metadata(cfg: ModelConfig) -> dict[str, str]:
    """The safetensors metadata that marks a clipforge model file and carries its architecture."""
    return {"format": FORMAT_TAG, "model_config": json.dumps(to_dict(cfg))}


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the model's weights, architecture and eval preprocessing to one `.safetensors` file, atomically."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("save_model: the model has no clipforge ModelConfig in `.config`")
    metadata = stored_config_metadata(config)
    metadata["preprocess"] = json.dumps(model_preprocess(model).to_dict())
    metadata.update(extra_metadata or {})
    tensors = model_state_for_saving(model)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))



# --- Training checkpoints: verified directories ---------------------------------------------------------------
#
# A training checkpoint is a directory `step-00001234/` holding its files and a MANIFEST.json written last,
# which records each file's size and sha256. The directory is built under a temporary name and renamed into
# place, so a crash leaves either a complete checkpoint or none; the manifest additionally catches files damaged
# after the fact (a truncated copy, a full disk, bit rot).

CHECKPOINT_FORMAT = "clipforge-training-checkpoint"
MANIFEST_NAME = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the path and what is wrong."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint_dir(path: str | Path, step: int, files: dict[str, Callable[[Path], None]]) -> Path:
    """Build checkpoint directory `path` atomically: each `files[name](file_path)` writes one file, then the
    manifest of sizes and checksums is written, everything is fsynced and the directory renamed into place."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        entries = {}
        for name, write in files.items():
            with os_errors_named(path / name, rename=True):
                write(tmp / name)
            entries[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "files": entries}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return path


def verify_checkpoint_dir(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint `path` after checking every file's size and sha256; CheckpointError if not."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST_NAME} (incomplete write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(files, dict):
            raise ValueError("not a clipforge training checkpoint manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST_NAME} ({exc})") from None
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the manifest says {entry['bytes']} "
                                  "(truncated?)")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 checksum (corrupted)")
    return manifest


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory under `root`, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_valid_checkpoint(root: str | Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under `root` that verifies; each newer broken one is reported in one line."""
    candidates = list_checkpoints(root)[::-1]
    for i, (_, path) in enumerate(candidates):
        try:
            verify_checkpoint_dir(path)
        except CheckpointError as exc:
            fallback = candidates[i + 1][1].name if i + 1 < len(candidates) else "no earlier checkpoint"
            report(f"{exc}; falling back to {fallback}")
            continue
        return path
    return None


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint directory; renamed to a hidden name first, so a crash mid-delete never leaves a
    half checkpoint under a real name."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints under `root`; returns what was removed."""
    removed = []
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        remove_checkpoint(path)
        removed.append(path)
    return removed


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete what interrupted writes and deletions left under `root` (hidden `.step-*` entries)."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [c for c in root.iterdir() if c.name.startswith(".step-") and c.name.endswith((".tmp", ".deleting",
                                                                                         ".replaced"))]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
