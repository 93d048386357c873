"""The complete state of a training run, written to and read from a verified checkpoint directory.

A checkpoint directory (see `clipforge.checkpoint.write_checkpoint_dir`) holds:
  model.safetensors      the weights, as a clipforge model file (`clipforge eval --model` reads it as is)
  optimizer.safetensors  every tensor of the optimizer's state dict
  extra.safetensors      only when the run has them: tensors of other stateful components (the negative queue)
  state.json             the rest: step, the optimizer's structure and hyper-parameters, RNG states and data
                         position of every rank, counters (bad samples, skipped steps, time), the resolved
                         config, the code version
  MANIFEST.json          size and sha256 of each file, written last
Nothing is pickled, so reading a checkpoint cannot run code. The learning rate is a pure function of the step
(`lr_at`), so the step *is* the schedule's position.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, save_model, verify_checkpoint_dir, write_checkpoint_dir

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
EXTRA_FILE = "extra.safetensors"  # tensors of other stateful run components (the negative queue), when any


@dataclass
class TrainingState:
    """Everything but the tensors of model and optimizer. `rng` and `data` hold one entry per rank."""

    step: int  # optimizer steps completed; the next batch read is batch number `step`
    rng: list[dict[str, Any]]
    data: list[dict[str, Any]]
    config: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    version: dict[str, Any] = field(default_factory=dict)


# --- RNG states -------------------------------------------------------------------------------------------------

def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch (CPU and, if initialised, CUDA) generator states, as plain JSON data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


# --- Nested state dicts <-> (JSON, tensors) ---------------------------------------------------------------------

def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """A JSON-able copy of `obj` with each tensor moved into `tensors` under its path and replaced by a
    reference; tuples, non-string dict keys and non-finite floats are tagged so `join_tensors` restores them."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, tensors, f"{key}.{k}" if key else k) for k, v in obj.items()}
        return {"__items__": [[k, split_tensors(v, tensors, f"{key}.{k}" if key else str(k))] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at '{key}' in a checkpoint")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: join_tensors(v, tensors) for k, v in obj.items()}


# --- Code version ------------------------------------------------------------------------------------------------

def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, timeout=5, capture_output=True, text=True, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict[str, Any]:
    """clipforge's version, the git commit of its source checkout (and whether the package's files differ from
    it) when it runs from one, and torch's version."""
    from .. import __version__  # noqa: PLC0415

    package = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {"clipforge": __version__, "git_commit": None, "torch": torch.__version__}
    top = _git(["rev-parse", "--show-toplevel"], package)
    # Only our own checkout counts, not some repository the package happens to be installed inside.
    if top is None or top.returncode != 0 or Path(top.stdout.strip(), "src", "clipforge").resolve() != package:
        return out
    commit = _git(["rev-parse", "HEAD"], package)
    if commit is not None and commit.returncode == 0:
        out["git_commit"] = commit.stdout.strip()
        dirty = _git(["diff", "--quiet", "HEAD", "--", "."], package)
        out["git_dirty"] = dirty is not None and dirty.returncode == 1
    return out


# --- Saving and loading ------------------------------------------------------------------------------------------

def save_training_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state: TrainingState, extra: dict[str, Any] | None = None) -> Path:
    """Write model, optimizer and `state` as one verified checkpoint directory at `path`, atomically.

    `extra` holds the state dicts of other stateful components by name (tensors go to their own file)."""
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_plain = split_tensors(optimizer.state_dict(), optimizer_tensors)
    payload = {**asdict(state), "optimizer": optimizer_plain}
    extra_tensors: dict[str, torch.Tensor] = {}
    if extra:
        payload["extra"] = split_tensors(extra, extra_tensors)

    def write_state(tmp: Path) -> None:
        tmp.write_text(json.dumps(payload, indent=1))

    files = {
        MODEL_FILE: lambda tmp: save_model(model, tmp, {"step": str(state.step)}),
        OPTIMIZER_FILE: lambda tmp: save_file(optimizer_tensors, str(tmp)),
        STATE_FILE: write_state,
    }
    if extra:
        files[EXTRA_FILE] = lambda tmp: save_file(extra_tensors, str(tmp))
    return write_checkpoint_dir(path, state.step, files)


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: TrainingState
    extra: dict[str, Any] = field(default_factory=dict)


def load_training_checkpoint(path: str | Path, verify: bool = True) -> LoadedCheckpoint:
    """Read checkpoint directory `path`, first verifying it against its manifest unless the caller just did;
    CheckpointError if unusable."""
    path = Path(path)
    if verify:
        verify_checkpoint_dir(path)
    try:
        payload = json.loads((path / STATE_FILE).read_text())
        optimizer_state = join_tensors(payload.pop("optimizer"), load_file(str(path / OPTIMIZER_FILE)))
        extra_plain = payload.pop("extra", None)
        extra = join_tensors(extra_plain, load_file(str(path / EXTRA_FILE))) if extra_plain is not None else {}
        state = TrainingState(**payload)
        model_state = load_file(str(path / MODEL_FILE))
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc})") from None
    return LoadedCheckpoint(path, model_state, optimizer_state, state, extra)


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten_config(value, name))
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], may_change: set[str]) -> list[str]:
    """Dotted keys whose values differ between two plain configs, except keys in (or under) `may_change`."""
    a, b = flatten_config(saved), flatten_config(current)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in may_change):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed.append(key)
    return changed
