"""Training batches as a pure function of the step: the position in the data is the step number."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError
from ..data.synthetic import STREAM_TRAIN, SyntheticPairs, SyntheticWorld
from .config import TrainConfig


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


class Collate:
    """(image tensor, caption) items -> (images [B, 3, H, W], tokens [B, L]); tokenises in the worker."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        tokens = self.tokenizer([caption for _, caption in items])
        return images, tokens


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding/rendering is single-threaded; leave the cores to the model


def build_train_dataset(cfg: TrainConfig, image_size: int) -> tuple[Dataset, bool]:
    """(dataset, shuffle): the training pairs named by `cfg.data`."""
    data = cfg.data
    if data.source == "synthetic":
        if data.synthetic.image_size != image_size:
            raise ConfigError(
                f"config key 'data.synthetic.image_size': {data.synthetic.image_size} differs from model "
                f"'{cfg.model}' input size {image_size}"
            )
        return SyntheticPairs(SyntheticWorld(data.synthetic), STREAM_TRAIN), False
    if data.source == "manifest":
        from ..data.robust import RobustPairs, manifest_pairs  # noqa: PLC0415
        from ..transforms import TrainTransform  # noqa: PLC0415

        pairs = manifest_pairs(data.path)
        return RobustPairs(pairs, TrainTransform(image_size), data.max_image_pixels, seed=cfg.seed), True
    raise ConfigError(f"config key 'data.source': '{data.source}' is not available in this build")


def build_train_loader(cfg: TrainConfig, dataset: Dataset, shuffle: bool, tokenizer: Callable,
                       start_step: int = 0) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, cfg.steps, start_step, shuffle)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collate(tokenizer),
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
