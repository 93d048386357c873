"""What the evaluation tasks read from `--dataset`: labelled images, captioned images, shifted copies.

`open_source(spec, image_size, options)` resolves a dataset name (the embedded synthetic world, an offline
corpus, a .csv/.tsv manifest or an image folder) into a source with two views:

- `labelled(split, variant)` -> `LabelledImages`: (image, label) items, class names, prompt templates;
- `captioned(split)` -> `CaptionedImages`: (image, captions) items and the flattened captions.

Both carry a `key` naming exactly the images, for the features cache. `limit` keeps a seeded random subset
(the same one every time), so quick runs stay class-balanced even where files are sorted by class.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..config import ConfigError, from_dict, read_yaml_mapping
from ..data.base import CaptionDataset, DatasetError
from ..data.catalog import get_dataset
from ..data.offline import data_root, is_prepared, list_offline_datasets, prepare_command
from ..data.synthetic import (
    STREAM_EVAL, ZEROSHOT_VARIANTS, SyntheticConfig, SyntheticWorld, SyntheticZeroShot, render,
)
from ..transforms import EvalTransform, normalize, to_tensor
from .robustness import REAL_SHIFTS, ShiftedTransform
from .synthetic import with_article
from .templates import load_templates

GREY_DATASETS = {"fashion-mnist"}  # a grayscale shift changes nothing on these


@dataclass
class SourceOptions:
    """Settings that choose the images (not how they are scored)."""

    limit: int | None = None  # at most this many images per split (a seeded random subset)
    templates: str | None = None  # a template set name or file instead of the dataset's own
    root: str | None = None  # data root of the offline datasets
    language: str = "en"
    config: str | None = None  # training config whose synthetic world to use
    run_dir: Path | None = None  # the model's run directory, whose config.yaml describes its world
    per_class: int = 20  # synthetic images per class and split
    pairs: int = 1000  # synthetic image-caption pairs for retrieval and margins
    captions_per_image: int = 1  # synthetic captions per retrieval image
    preprocess: str = "clipforge"  # eval pipeline for image files: "clipforge" or "openai" (transforms)


@dataclass
class LabelledImages:
    dataset: Dataset  # (image tensor [3, S, S], label)
    classnames: list[str]
    prompts: list[str]  # what fills the templates' {} (synthetic: "a red circle")
    templates: list[str]
    key: str
    subsets: dict[str, list[int]] = field(default_factory=dict)  # groups of classes also reported alone


@dataclass
class CaptionedImages:
    dataset: Dataset  # (image tensor [3, S, S], captions)
    texts: list[str]
    text_to_image: torch.Tensor  # [T]
    key: str


def subset_indices(length: int, limit: int | None, seed: int = 0) -> list[int] | None:
    """A seeded random choice of `limit` indices in order, or None when the whole set is kept."""
    if limit is None or limit >= length:
        return None
    if limit <= 0:
        raise ConfigError(f"--limit: expected a positive number of images, got {limit}")
    chosen = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(chosen.tolist())


def _limited(dataset: Dataset, limit: int | None) -> tuple[Dataset, list[int] | None]:
    keep = subset_indices(len(dataset), limit)  # type: ignore[arg-type]
    return (dataset if keep is None else Subset(dataset, keep)), keep


class SyntheticCaptions(Dataset):
    """Synthetic evaluation scenes with `k` complete captions each (different wordings of the same scene)."""

    def __init__(self, world: SyntheticWorld, length: int, captions_per_image: int) -> None:
        self.world, self.length, self.k = world, length, captions_per_image

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        objects, rng = self.world.scene(STREAM_EVAL, index)
        image = render(objects, rng, self.world.cfg.image_size)
        # the first caption is the one `world.pair(STREAM_EVAL, index, complete=True)` gives
        captions = [self.world.describe(objects, rng, complete=True) for _ in range(self.k)]
        return normalize(to_tensor(image)), captions


def synthetic_config(opts: SourceOptions, image_size: int) -> SyntheticConfig:
    """The synthetic world the model was trained on: from --config, else the run's config.yaml, else defaults.

    A world drawn at another resolution than the model's input is a mismatch, not something to resize away.
    """
    source = Path(opts.config) if opts.config else (opts.run_dir / "config.yaml" if opts.run_dir else None)
    data: dict[str, Any] = {}
    if source is not None:
        if not source.exists():
            raise FileNotFoundError(str(source))
        loaded = read_yaml_mapping(source, "config file")
        data = dict(((loaded.get("data") or {}).get("synthetic")) or {})
        size = data.get("image_size", SyntheticConfig.image_size)
        if size != image_size:
            raise ConfigError(
                f"{source}: data.synthetic.image_size is {size} but the model takes {image_size}x{image_size} "
                "images (is this the model's own config?)"
            )
    data["image_size"] = image_size
    return from_dict(SyntheticConfig, data, prefix="data.synthetic")


class SyntheticSource:
    """The embedded world: splits are disjoint ranges of scenes; variants are drawn shifts."""

    name = "synthetic"
    single_set = False
    variants = ZEROSHOT_VARIANTS[1:]
    SPLIT_OFFSETS = {"test": 0, "val": 1, "train": 2}  # in units of 10^6 scenes (a multiple of 64)

    def __init__(self, opts: SourceOptions, image_size: int) -> None:
        self.opts = opts
        self.world = SyntheticWorld(synthetic_config(opts, image_size))

    def labelled(self, split: str, variant: str | None = None) -> LabelledImages:
        if split not in self.SPLIT_OFFSETS:
            raise ConfigError(f"--split: the synthetic world has splits {', '.join(self.SPLIT_OFFSETS)}, not '{split}'")
        world = self.world
        combos = [(c, s) for c, s in (name.split() for name in world.classnames)]  # all 64, in label order
        offset = self.SPLIT_OFFSETS[split] * 64 * 15625  # 10^6
        full = SyntheticZeroShot(world, combos, self.opts.per_class, variant or "default", offset)
        dataset, _ = _limited(full, self.opts.limit)
        heldout = {" ".join(c) for c in world.heldout}
        subsets = {"seen": [i for i, n in enumerate(world.classnames) if n not in heldout],
                   "heldout": [i for i, n in enumerate(world.classnames) if n in heldout]}
        templates = load_templates(self.opts.templates or "synthetic")
        key = (f"synthetic-{world.cfg.seed}-{world.cfg.image_size}px/{split}/{variant or 'default'}/"
               f"{self.opts.per_class}/{self.opts.limit}")
        return LabelledImages(dataset, list(world.classnames), [with_article(c) for c in world.classnames],
                              templates, key, subsets)

    def captioned(self, split: str) -> CaptionedImages:
        if split != "test":
            raise ConfigError("--split: synthetic retrieval and margins use the evaluation stream (--split test)")
        if self.opts.captions_per_image < 1:
            raise ConfigError(f"--captions-per-image: expected at least 1, got {self.opts.captions_per_image}")
        full = SyntheticCaptions(self.world, self.opts.pairs, self.opts.captions_per_image)
        dataset, _ = _limited(full, self.opts.limit)
        texts: list[str] = []
        owner: list[int] = []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            captions = dataset[i][1]  # renders the image too; cheap for the synthetic world
            texts.extend(captions)
            owner.extend([i] * len(captions))
        cfg = self.world.cfg
        key = (f"synthetic-{cfg.seed}-{cfg.image_size}px/eval/{self.opts.pairs}x{self.opts.captions_per_image}/"
               f"{self.opts.limit}")
        return CaptionedImages(dataset, texts, torch.tensor(owner, dtype=torch.long), key)


def _has_split_column(path: Path) -> bool:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    return "split" in header


class CatalogSource:
    """An offline corpus by name, or a manifest / image folder by path (`data.catalog.get_dataset`)."""

    def __init__(self, spec: str, opts: SourceOptions, image_size: int) -> None:
        self.spec, self.opts, self.image_size = spec, opts, image_size
        if spec in list_offline_datasets() and not is_prepared(spec, opts.root):
            command = prepare_command(spec) + (f" --root {opts.root}" if opts.root else "")
            raise DatasetError(f"dataset '{spec}' is not prepared under {data_root(opts.root)} (run: {command})")
        self.name = spec if spec in list_offline_datasets() else Path(spec).name
        self.variants = tuple(s for s in REAL_SHIFTS if not (s == "grayscale" and spec in GREY_DATASETS))

    @property
    def single_set(self) -> bool:
        """True for a manifest without a split column: one evaluation set, every row, whatever --split says."""
        path = Path(self.spec)
        is_manifest = self.spec not in list_offline_datasets() and path.suffix.lower() in (".csv", ".tsv")
        return is_manifest and path.is_file() and not _has_split_column(path)

    def _split(self, split: str) -> str | None:
        return None if self.single_set else split

    def _open(self, split: str, variant: str | None) -> Any:
        transform = ShiftedTransform(self.image_size, variant) if variant else \
            EvalTransform(self.image_size, self.opts.preprocess)
        return get_dataset(self.spec, self._split(split), transform, root=self.opts.root, language=self.opts.language)

    def _key(self, view: str, split: str, variant: str | None) -> str:
        """Names the images of a view exactly: the labelled view may hold fewer images than the captioned one,
        and a re-prepared dataset or an edited manifest (a newer file) must never hit an old cache entry."""
        if self.spec in list_offline_datasets():
            where, stamp = self.spec, data_root(self.opts.root) / self.spec / "info.json"
        else:
            where, stamp = str(Path(self.spec).resolve()), Path(self.spec)
        version = stamp.stat().st_mtime_ns if stamp.exists() else 0
        return (f"{where}@{version}/{view}/{self.opts.language}/{self._split(split)}/{variant or 'plain'}/"
                f"{self.image_size}px/{self.opts.limit}")

    def labelled(self, split: str, variant: str | None = None) -> LabelledImages:
        dataset = self._open(split, variant)
        if isinstance(dataset, CaptionDataset):
            dataset = dataset.as_classification()  # DatasetError when there are no category labels
        classnames = list(dataset.classnames or [])
        if not classnames:
            raise DatasetError(f"{self.name}: the class list is empty, so there is nothing to classify")
        templates = load_templates(self.opts.templates) if self.opts.templates else list(dataset.templates)
        limited, _ = _limited(dataset, self.opts.limit)
        return LabelledImages(limited, classnames, classnames, templates, self._key("labelled", split, variant))

    def captioned(self, split: str) -> CaptionedImages:
        dataset = self._open(split, None)
        if not isinstance(dataset, CaptionDataset):
            raise DatasetError(f"{self.name}: has class labels but no captions; retrieval and margins need captions")
        limited, keep = _limited(dataset, self.opts.limit)
        texts: list[str] = []
        owner: list[int] = []
        for position, index in enumerate(keep if keep is not None else range(len(dataset))):
            captions = dataset.captions(index)
            texts.extend(captions)
            owner.extend([position] * len(captions))
        key = self._key("captioned", split, None)
        return CaptionedImages(limited, texts, torch.tensor(owner, dtype=torch.long), key)


def open_source(spec: str, image_size: int, opts: SourceOptions) -> SyntheticSource | CatalogSource:
    """The source behind `--dataset spec` for a model taking `image_size` pixels square."""
    if spec == "synthetic":
        return SyntheticSource(opts, image_size)
    return CatalogSource(spec, opts, image_size)
