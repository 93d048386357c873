"""Shared by the fault-tolerance tests: tiny CPU runs, runs in forked processes that get killed, comparisons."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.train.config import TrainConfig, load_train_config
from clipforge.transforms import normalize, to_tensor

TINY = ["--model=ViT-Micro-8-32", "--data.synthetic.image_size=32", "--batch_size=8", "--precision=fp32",
        "--threads=1", "--log_every=1", "--data.num_workers=0", "--optim.warmup_steps=2"]
TIMING_KEYS = ("samples_per_s", "elapsed_s")


def tiny_args(out: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"--output_dir={out}", f"--run_name={name}", *extra]


def tiny_config(out: Path, name: str, *extra: str) -> TrainConfig:
    return load_train_config(None, tiny_args(out, name, *extra))


def step_log(run_dir: Path) -> list[dict]:
    """The per-step entries of log.jsonl (not events), without the timing fields."""
    entries = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in entries if "loss" in e and "event" not in e]


def events(run_dir: Path, kind: str) -> list[dict]:
    entries = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [e for e in entries if e.get("event") == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    return load_file(path / "model.safetensors" if path.is_dir() else path)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Euclidean distance between two sets of weights (float64), over the floating-point tensors."""
    return sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b if b[k].is_floating_point()) ** 0.5


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str = "") -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{context}: tensors differ: {different[:5]}"


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], steps: int, lr: float = 1e-3,
                         context: str = "") -> None:
    """Two float32 runs of the same training that summed in different orders (ranks vs one process) agree.

    AdamW's update lr * m / (sqrt(v) + eps) is insensitive to rounding where |grad| >> eps, but near |grad| ~ eps
    it multiplies a gradient difference by up to lr / eps (1e3 here), so a few such coordinates may drift by
    ~1e-5 depending on the CPU's summation order. A real fault (a rank on the wrong rows, an unsynchronised
    gradient) moves nearly every weight by ~lr. So: at most 0.1% of the weights differ by more than 1e-5, and
    none by more than AdamW can move a weight in `steps` steps.
    """
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    drifted = (diffs > 1e-5).float().mean().item()
    assert drifted <= 1e-3, f"{context}: {drifted:.2%} of the weights differ by more than 1e-5"
    assert diffs.max().item() <= 10 * lr * steps, f"{context}: largest weight difference {diffs.max().item():.3g}"


def fork_call(target: Callable[[], int | None]) -> int:
    """Run `target()` in a forked child (torch is already imported, so it starts at once); returns its pid.
    The child exits with target's return value (0 for None), or 1 on an exception."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = target() or 0
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def fork_cli(argv: list[str]) -> int:
    """`clipforge <argv>` in a forked child; its pid."""
    from clipforge.cli import main

    return fork_call(lambda: main(argv))


def last_logged_step(run_dir: Path) -> int:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in entry and "event" not in entry:
            step = max(step, entry["step"])
    return step


def wait_for_step(run_dir: Path, step: int, pid: int, timeout: float = 120.0) -> None:
    """Poll the child's log until it has logged `step` (fails if the child exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last_logged_step(run_dir) >= step:
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AssertionError(f"child exited (status {status}) before logging step {step}")
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"child did not reach step {step} in {timeout} s")


def wait_exit(pid: int, timeout: float = 120.0) -> int:
    """The child's wait status, killing it if it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} still running after {timeout} s")


class PairStream(IterableDataset):
    """A streamed dataset obeying `clipforge.train.feed`'s contract, for tests: worker w of W reads synthetic
    pairs w, w + W, w + 2W, ...; its state (worker, stride, next index) fixes the rest of its stream."""

    def __init__(self, image_size: int = 32) -> None:
        self.world = SyntheticWorld(SyntheticConfig(image_size=image_size))
        self.loaded: dict | None = None
        self.position: dict | None = None

    def state_dict(self) -> dict:
        assert self.position is not None, "state_dict() before iteration"
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = dict(state)

    def __iter__(self):
        if self.loaded is not None:
            self.position = dict(self.loaded)
        else:
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            self.position = {"worker": worker, "stride": workers, "next": worker}
        while True:
            index = self.position["next"]
            self.position["next"] += self.position["stride"]  # before yielding: the state is "after this item"
            image, caption = self.world.pair(STREAM_TRAIN, index)
            yield normalize(to_tensor(image)), caption


class NoisyPairs(torch.utils.data.Dataset):
    """Synthetic pairs plus noise drawn from the global Python, NumPy and torch generators (read in the main
    process), so a run over it is only reproducible if those generators' states are saved and restored."""

    def __init__(self, image_size: int = 32) -> None:
        from clipforge.data.synthetic import SyntheticPairs

        self.pairs = SyntheticPairs(SyntheticWorld(SyntheticConfig(image_size=image_size)), STREAM_TRAIN, 10**6)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        import random

        import numpy as np

        image, caption = self.pairs[index]
        noise = 0.1 * torch.rand(()) + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return image + noise, caption


class PairLoader:
    """A loader that keeps its own position (clipforge.train.feed.is_stateful_loader), for tests: consecutive
    synthetic pairs; its state is the number of pairs handed out."""

    def __init__(self, model: str = "ViT-Micro-8-32", batch_size: int = 8, image_size: int = 32) -> None:
        from clipforge.data.synthetic import SyntheticPairs
        from clipforge.tokenizer import get_tokenizer
        from clipforge.train.feed import BatchCollate

        self.pairs = SyntheticPairs(SyntheticWorld(SyntheticConfig(image_size=image_size)), STREAM_TRAIN, 10**6)
        self.collate, self.batch_size, self.next = BatchCollate(get_tokenizer(model)), batch_size, 0

    def __iter__(self):
        while True:
            first = self.next
            self.next += self.batch_size  # before handing the batch out: the state is "after this batch"
            yield self.collate([self.pairs[i] for i in range(first, first + self.batch_size)])

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]
