"""clipforge.allocator: freed tensor memory is reused instead of being faulted in again from the kernel."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from clipforge import allocator

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees a 64 MiB tensor, writing into all of it each time, and prints the minor page faults of
# four rounds after 30 warm-up rounds (glibc's heap takes a few rounds to hold enough free blocks of the size
# the aligned allocation asks for). 64 MiB is 16,384 pages of 4 KiB: a fresh mapping faults on each of them,
# and a 64 MiB block is above glibc's largest dynamic mmap threshold (32 MiB), so untuned it is always mapped.
PROBE = """
import json, resource, sys
import torch
from clipforge.allocator import reuse_freed_memory
threshold = reuse_freed_memory() if sys.argv[1] == "on" else None
for _ in range(30):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(16 << 20).fill_(1.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"threshold": threshold, "faults": after - before}))
"""


def _probe(mode: str, env_switch: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_SWITCH}
    if env_switch is not None:
        env[allocator.ENV_SWITCH] = env_switch
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the glibc allocator is what this module tunes")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    plain, kept = _probe("off"), _probe("on")
    pages = 4 * (64 << 20) // 4096  # four rounds of 64 MiB
    assert plain["threshold"] is None
    assert plain["faults"] >= pages * 0.9  # glibc maps each 64 MiB block afresh: a fault per page
    assert kept["threshold"] is not None and kept["threshold"] >= 64 << 20
    assert kept["faults"] < pages * 0.05


@pytest.mark.skipif(not GLIBC_LINUX, reason="the glibc allocator is what this module tunes")
def test_the_environment_switch_turns_it_off():
    off = _probe("on", env_switch="0")
    assert off["threshold"] is None
    assert off["faults"] >= 4 * (64 << 20) // 4096 * 0.9


def test_nothing_changes_where_the_c_library_is_not_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {"mmap_threshold": None})
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.reuse_freed_memory() is None
    assert allocator.set_thresholds(1 << 20, 1 << 20) is False


def test_the_trainer_turns_it_on(monkeypatch, tmp_path):
    from clipforge.train import setup  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(setup, "reuse_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(setup, "place_process", lambda device: (_ for _ in ()).throw(RuntimeError("stop here")))
    from clipforge.train.config import TrainConfig  # noqa: PLC0415

    with pytest.raises(RuntimeError, match="stop here"):
        setup.setup_run(TrainConfig(output_dir=str(tmp_path)), None)
    assert calls == [1]
