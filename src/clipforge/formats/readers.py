"""Reading tensors from files without trusting them.

Pickles go only through `torch.load(weights_only=True)`; TorchScript archives only through our tensors-only
unpickler; everything else is safetensors. Every failure becomes one CheckpointFormatError naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import CheckpointFormatError
from .torchscript import is_torchscript_archive, read_torchscript_tensors

_ZIP_MAGIC = b"PK\x03\x04"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refusal_reason(message: str) -> str:
    """What torch's weights-only unpickler objected to, from its (long, multi-line) message."""
    match = re.search(r"(unsupported GLOBAL [\w.]+)", message, flags=re.IGNORECASE)
    if match:
        return match.group(1)
    match = re.search(r"(Unsupported operand \d+)", message)
    return match.group(1) if match else "a non-tensor object"


def sniff(path: Path) -> str:
    """'zip', 'torchscript', 'safetensors' or 'pickle' for a file, from its first bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    if not head:
        raise CheckpointFormatError(f"{path}: the file is empty")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                _check_entry_sizes(archive.infolist(), path)
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointFormatError(f"{path}: truncated or corrupt zip archive ({_one_line(exc)})") from None
        return "torchscript" if is_torchscript_archive(names) else "zip"
    if len(head) >= 9 and head[8:9] == b"{":  # an 8-byte little-endian header size, then the JSON header
        return "safetensors"
    return "pickle"


def _check_entry_sizes(entries: list[zipfile.ZipInfo], path: Path) -> None:
    """Refuse, from the zip directory alone and before anything is read, an archive whose entries unpack to far
    more bytes than the file holds. torch stores tensors uncompressed (only TorchScript's small code and debug
    entries are deflated), so an entry larger than the file, or entries adding up to more than twice it, are a
    decompression bomb or a corrupt directory; reading them would allocate that much memory first."""
    size = path.stat().st_size
    limit = 2 * size + (1 << 20)
    total = 0
    for entry in entries:
        total += entry.file_size
        if entry.file_size > size or total > limit:
            raise CheckpointFormatError(
                f"{path}: zip entry '{entry.filename}' unpacks to {entry.file_size} bytes (all entries so far: "
                f"{total}) in a file of {size} bytes; refused before reading (torch archives store tensors "
                "uncompressed, so this is a decompression bomb or a corrupt zip directory)"
            )


def load_pickle(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, with clear errors for refused and damaged files. `mmap` (zip-format
    files only) maps tensors from the file instead of reading them all into memory first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; our errors say what matters
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message:
            raise CheckpointFormatError(
                f"{path}: refused to unpickle: it needs {_refusal_reason(message)}, i.e. running code from the "
                "file; only tensors and plain containers are loaded (torch.load weights_only=True)"
            ) from None
        raise CheckpointFormatError(f"{path}: truncated or corrupt pickle ({_one_line(message)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointFormatError(f"{path}: truncated or corrupt checkpoint ({_one_line(exc)})") from None


def load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_torchscript_tensors(path)
    except CheckpointFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointFormatError(f"{path}: truncated or corrupt TorchScript archive ({_one_line(exc)})") from None


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a `.safetensors` file."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: truncated or corrupt safetensors file ({_one_line(exc)})") from None
    return tensors, metadata


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: not readable JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    return data


def load_weights_file(path: Path) -> tuple[Any, dict[str, str], str]:
    """(content, safetensors metadata, kind) for one weights file of any supported kind."""
    kind = sniff(path)
    if path.suffix.lower() == ".safetensors" and kind != "safetensors":
        found = {"torchscript": "a TorchScript archive", "zip": "a torch.save zip archive"}.get(kind, "a pickle")
        raise CheckpointFormatError(
            f"{path}: named .safetensors but holds {found}; expected a safetensors file (an 8-byte header size, "
            "a JSON header, raw tensors); rename it to .pt if it is a torch checkpoint"
        )
    if kind == "torchscript":
        return load_torchscript(path), {}, kind
    if kind == "safetensors":
        tensors, metadata = load_safetensors(path)
        return tensors, metadata, kind
    return load_pickle(path, mmap=kind == "zip"), {}, kind
