"""A disk cache of rendered synthetic training pairs, shared by runs that train on the same world.

Rendering a scene and its caption is about a third of a small study cell's time (py-spy on a 32 px tiny-CLIP
cell of configs/study.yaml), and every cell of a study that shares a seed reads the same training stream. With a
cache, the first cell to need a chunk of the stream renders it and the others read it back: the pairs are the
exact uint8 pixels and caption strings the renderer produced, so training is bit-for-bit unchanged.

A chunk's key covers everything its contents depend on: the world's config, the stream, the renderer's source
and the numpy/Pillow versions. Chunks are written atomically; one that fails to load, or holds the wrong shapes,
is rendered again. Files are read with `allow_pickle=False`, so a planted chunk cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL
import torch

from ..config import to_dict
from ..transforms import normalize, to_tensor
from . import synthetic
from .synthetic import SyntheticPairs

CHUNK = 256  # consecutive pairs per file (0.8 MB at 32 px): a short run renders at most this many extra
FORMAT = 1


@lru_cache(maxsize=1)
def _renderer_digest() -> str:
    return hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()


def stream_key(pairs: SyntheticPairs) -> str:
    """The name of a stream's cache folder: a hash of everything its rendered pairs depend on."""
    payload = {"format": FORMAT, "world": to_dict(pairs.world.cfg), "stream": pairs.stream, "complete": pairs.complete,
               "renderer": _renderer_digest(), "numpy": np.__version__, "pillow": PIL.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class CachedSyntheticPairs(torch.utils.data.Dataset):
    """The pairs of a SyntheticPairs stream, rendered CHUNK at a time and kept under `cache_dir`."""

    def __init__(self, pairs: SyntheticPairs, cache_dir: str | Path) -> None:
        self.pairs = pairs
        self.folder = Path(cache_dir) / stream_key(pairs)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._loaded: tuple[int, np.ndarray, np.ndarray] | None = None  # (chunk, images [N,S,S,3], captions [N])
        self.rendered = self.read = 0  # chunks rendered here / read back from disk
        self.write_failed = False

    def __len__(self) -> int:
        return len(self.pairs)

    def _render(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        first = chunk * CHUNK
        images, captions = [], []
        for index in range(first, min(first + CHUNK, len(self.pairs))):
            image, caption = self.pairs.world.pair(self.pairs.stream, index, complete=self.pairs.complete)
            images.append(np.asarray(image, dtype=np.uint8))
            captions.append(caption)
        return np.stack(images), np.array(captions, dtype=np.str_)  # [N, S, S, 3], [N]

    def _load(self, path: Path, expected: int) -> tuple[np.ndarray, np.ndarray] | None:
        size = self.pairs.world.cfg.image_size
        try:
            with np.load(path, allow_pickle=False) as data:
                images, captions = data["images"], data["captions"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if images.dtype != np.uint8 or images.shape != (expected, size, size, 3) or captions.shape != (expected,):
            return None
        return images, captions

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if self._loaded is not None and self._loaded[0] == chunk:
            return self._loaded[1], self._loaded[2]
        path = self.folder / f"{chunk:07d}.npz"
        expected = min(CHUNK, len(self.pairs) - chunk * CHUNK)
        loaded = self._load(path, expected) if path.exists() else None
        if loaded is None:
            loaded = self._render(chunk)
            self._store(path, *loaded)
            self.rendered += 1
        else:
            self.read += 1
        self._loaded = (chunk, *loaded)
        return loaded

    def _store(self, path: Path, images: np.ndarray, captions: np.ndarray) -> None:
        """Write beside the target, then rename: a reader never sees half a chunk; two writers of the same chunk
        write the same bytes and the last rename wins. A failed write (a full disk) only costs the caching."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, captions=captions)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if not self.write_failed:
                warnings.warn(f"render cache {self.folder}: cannot write {path.name} ({exc}); rendering without it",
                              stacklevel=2)
            self.write_failed = True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        chunk, offset = divmod(index, CHUNK)
        images, captions = self._chunk(chunk)
        return normalize(to_tensor(images[offset])), str(captions[offset])
