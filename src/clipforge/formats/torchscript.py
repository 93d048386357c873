"""The tensors of a TorchScript archive (OpenAI's released `.pt` files), read without running any of its code.

A TorchScript archive is a zip holding `<name>/data.pkl` (the module tree, pickled), `<name>/data/<key>` (raw
tensor storages) and `<name>/code/` (Python-like source that `torch.jit.load` would compile and run). We read
only `data.pkl`, with an unpickler that resolves nothing but tensor rebuilding, storage types and plain
containers; every scripted module becomes an inert record of its attributes. Any other global in the pickle is
refused, so a crafted archive cannot execute code here.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from . import CheckpointFormatError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptObject:
    """An inert stand-in for a scripted module or class: it only remembers the state it was pickled with."""

    type_name = "?"

    def __new__(cls, *args: Any) -> "ScriptObject":
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _script_class(type_name: str) -> type[ScriptObject]:
    return type("ScriptObject", (ScriptObject,), {"type_name": type_name})


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool = False, *_: Any
) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset)


def _identity_tag(value: Any, *_: Any) -> Any:
    return value


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity_tag,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise CheckpointFormatError(
            f"{self.path}: refused to load this TorchScript archive: its pickle names '{module}.{name}', "
            "which is not a tensor or container (its code is never run)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self.path}: unexpected persistent id {pid!r} in the TorchScript pickle")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self.path}: unknown storage type in the TorchScript pickle")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) < numel * itemsize:
                raise CheckpointFormatError(f"{self.path}: storage {key} is truncated")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype, count=numel)
            self.storages[key] = flat
        return self.storages[key]


def is_torchscript_archive(names: list[str]) -> bool:
    """A zip listing with a top-level `data.pkl` plus compiled `code/` or `constants.pkl`: TorchScript."""
    return any(n.endswith("/data.pkl") for n in names) and any(
        n.endswith("/constants.pkl") or "/code/" in n for n in names
    )


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree, by dotted name (like `module.state_dict()`)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if data_pkl is None:
            raise CheckpointFormatError(f"{path}: TorchScript archive without a top-level data.pkl")
        prefix = data_pkl.split("/", 1)[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointFormatError(f"{path}: big-endian TorchScript archives are not supported")
        unpickler = _TensorsOnlyUnpickler(archive.read(data_pkl), archive, prefix, path)
        root = unpickler.load()
    if not isinstance(root, ScriptObject):
        raise CheckpointFormatError(f"{path}: the TorchScript pickle does not hold a module")
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors, depth=0)
    return {name: tensor.clone() for name, tensor in tensors.items()}  # detach from the shared raw buffers


def _collect(obj: ScriptObject, prefix: str, out: dict[str, torch.Tensor], depth: int) -> None:
    if depth > 64:
        raise CheckpointFormatError("TorchScript module tree is nested more than 64 levels deep")
    state = obj.state
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", out, depth + 1)
