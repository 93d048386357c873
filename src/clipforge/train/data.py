"""Training batches as a pure function of the step: the position in the data is the step number."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..config import ConfigError
from ..data.base import CaptionDataset, open_image
from ..data.catalog import get_dataset
from ..data.manifest import ManifestDataset
from ..data.offline import list_offline_datasets
from ..data.synthetic import STREAM_TRAIN, SyntheticPairs, SyntheticWorld
from ..transforms import TrainTransform, to_rgb
from .config import TrainConfig

# Preloaded images keep a shorter side of this many times the model's resolution: the random crop (>= 90% of
# the area) is then still resized down, never up.
PRELOAD_MARGIN = 1.25


class StepBatchSampler(Sampler[list[int]]):
    """Yields the sample indices of steps `start_step .. total_steps - 1`.

    For a finite data set each epoch is a permutation drawn from (seed, epoch); for the infinite synthetic
    stream, step s simply reads samples s*B .. s*B+B-1. Either way a run resumed at step s sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, length: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 shuffle: bool = True) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.total_steps, self.start_step, self.shuffle = total_steps, start_step, shuffle
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_cache = (epoch, rng.permutation(self.length))
        return self._epoch_cache[1]

    def indices_for_step(self, step: int) -> list[int]:
        first = step * self.batch_size
        if not self.shuffle:
            return [(first + j) % self.length for j in range(self.batch_size)]
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.length)
            out.append(int(self._order(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.indices_for_step(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class CaptionPairs(Dataset):
    """(image tensor, caption) for every (image, caption) pair of some caption datasets.

    An image with k captions gives k pairs, as one manifest row per pair does. `pairs` lists (image path,
    caption) in order, for wrappers that read the files themselves. With `preload_size`, every image is
    decoded once here, converted to RGB and shrunk so its shorter side is at most `preload_size` pixels, and
    kept in memory: on small corpora of large drawings this moves the decoding cost (several milliseconds per
    image, every epoch) out of the training loop.
    """

    def __init__(self, datasets: Sequence[CaptionDataset], transform: Callable[[Image.Image], torch.Tensor],
                 preload_size: int | None = None, threads: int = 1) -> None:
        self.images: list[Path] = []
        self.pairs: list[tuple[Path, str]] = []
        self.image_of: list[int] = []  # pair -> index into self.images
        for dataset in datasets:
            for record in dataset.records:
                self.images.append(record.image)
                for caption in record.captions:
                    self.pairs.append((record.image, caption))
                    self.image_of.append(len(self.images) - 1)
        if not self.pairs:
            raise ConfigError("config key 'data': the training datasets hold no image-caption pairs")
        self.transform = transform
        self.preloaded: list[np.ndarray] | None = None
        if preload_size is not None:
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
                self.preloaded = list(pool.map(lambda path: shrink(path, preload_size), self.images))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if self.preloaded is not None:
            image = Image.fromarray(self.preloaded[self.image_of[index]])
        else:
            image = open_image(self.pairs[index][0])
        return self.transform(image), self.pairs[index][1]


def shrink(path: Path, size: int) -> np.ndarray:
    """The image at `path` in RGB, its shorter side reduced to `size` if longer, as uint8 [H, W, 3]."""
    image = to_rgb(open_image(path))
    scale = size / min(image.size)
    if scale < 1:
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def caption_datasets(cfg: TrainConfig) -> list[CaptionDataset]:
    """The caption datasets named by `cfg.data` (source manifest or offline), without transforms."""
    data = cfg.data
    if data.source == "manifest":
        assert data.path is not None  # DataConfig.validate
        return [ManifestDataset(data.path, split=data.split)]
    out = []
    for name in data.datasets:
        if name not in list_offline_datasets():
            raise ConfigError(f"config key 'data.datasets': unknown dataset '{name}' "
                              f"(expected some of {', '.join(list_offline_datasets())})")
        dataset = get_dataset(name, "train", root=data.root)
        if not isinstance(dataset, CaptionDataset):
            raise ConfigError(f"config key 'data.datasets': '{name}' has class labels but no captions to train on")
        out.append(dataset)
    return out


def build_train_dataset(cfg: TrainConfig, image_size: int) -> tuple[Dataset, bool]:
    """(dataset, shuffle): the training pairs named by `cfg.data`.

    `synthetic`: the embedded world's infinite training stream. `manifest`: the pairs of a CSV/TSV manifest
    (`data.split` rows only, if set). `offline`: the train splits of the prepared offline caption corpora in
    `data.datasets`, together. Real images get the training augmentation at the model's resolution.
    """
    data = cfg.data
    if data.source == "synthetic":
        if data.synthetic.image_size != image_size:
            raise ConfigError(
                f"config key 'data.synthetic.image_size': {data.synthetic.image_size} differs from model "
                f"'{cfg.model}' input size {image_size}"
            )
        pairs = SyntheticPairs(SyntheticWorld(data.synthetic), STREAM_TRAIN)
        if data.render_cache:
            from ..data.render_cache import CachedSyntheticPairs  # noqa: PLC0415

            return CachedSyntheticPairs(pairs, data.render_cache), False
        return pairs, False
    if data.source == "manifest" and not data.preload:
        # Files are read lazily through the bad-data wrapper: unreadable or missing images are counted and skipped.
        from ..data.robust import RobustPairs, manifest_pairs  # noqa: PLC0415

        pairs = manifest_pairs(data.path, data.split or "train")
        return RobustPairs(pairs, TrainTransform(image_size), data.max_image_pixels, seed=cfg.seed), True
    if data.source in ("manifest", "offline"):
        preload = math.ceil(PRELOAD_MARGIN * image_size) if data.preload else None
        transform = TrainTransform(image_size, seed=cfg.seed)
        threads = min(4, os.cpu_count() or 1)  # a one-off decoding pass before training starts
        return CaptionPairs(caption_datasets(cfg), transform, preload, threads), True
    raise ConfigError(f"config key 'data.source': '{data.source}' is not available in this build")
