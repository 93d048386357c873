"""`clipforge eval TASK`: resolve the model and the data, run the task, return CLIP_benchmark-style metrics.

Tasks: `zeroshot` (prompt ensemble vs a single template), `retrieval` (several captions per image),
`linear-probe` (the CLIP paper's protocol, optionally k-shot), `robustness` (zero-shot under shifts, drop and
effective robustness) and `margins` (per-sample margins within batches). Image features are cached on disk
(`features.cached_image_features`), so a second task on the same images costs only the text side.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..data.base import DatasetError
from ..factory import LoadOptions
from ..factory import resolve_model as resolve_model_spec
from ..tokenizer import BPETokenizer
from ..transforms import model_preprocess
from . import TASKS, plots
from .features import cached_image_features, encode_texts
from .linear_probe import carve_validation, kshot_probe, linear_probe
from .margins import describe, margins_in_batches
from .metrics import classification_metrics, per_class_recall, retrieval_metrics
from .robustness import RobustnessPoint, load_point, point_from_results, summarize
from .tasks import CaptionedImages, LabelledImages, SourceOptions, open_source
from .zeroshot import build_classifier



@dataclass
class EvalOptions:
    """Everything a task needs beyond the model and the dataset name."""

    source: SourceOptions = field(default_factory=SourceOptions)
    split: str = "test"
    shots: tuple[int, ...] = ()  # k-shot linear probes (k examples per class)
    draws: int = 5  # random draws per k
    variants: tuple[str, ...] | None = None  # robustness: shifted variants (default: all of the dataset's)
    baselines: tuple[str, ...] = ()  # robustness: results JSONs or models that define the baseline fit
    batch_size: int = 256  # margins: pairs per batch
    seed: int = 0
    cache_dir: str | None = None  # image features cache; None disables it
    plot: str | None = None  # write this task's figure here (PNG)
    encode_batch: int = 128
    num_workers: int = 0
    device: str | None = None  # where the model runs: "cpu", "cuda", "cuda:1"; None: a GPU if there is one
    load: LoadOptions = field(default_factory=LoadOptions)  # what the model file may not say (--arch, …)
    preprocess: str | None = None  # "openai" or "clipforge" eval pipeline; None: the one stored with the model


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "clipforge" / "features"


def resolve_model(spec: str, device: torch.device | None = None, load: LoadOptions = LoadOptions()
                  ) -> tuple[torch.nn.Module, Path | None]:
    """(model in eval mode, on `device` if given; run directory if any) from a run directory, a checkpoint
    file or an architecture name (`factory.resolve_model`). Evaluation inputs follow the model's device
    (`features.input_device`)."""
    model, run_dir = resolve_model_spec(spec, load)
    return (model.to(device) if device is not None else model), run_dir


class Evaluator:
    """One model on one dataset: encodes (with the cache) and scores."""

    def __init__(self, model: torch.nn.Module, model_spec: str, run_dir: Path | None, dataset: str,
                 opts: EvalOptions) -> None:
        if not hasattr(model, "image_size"):
            raise ConfigError(f"model {model_spec}: its input image size is unknown")
        self.model, self.opts = model, opts
        self.tokenizer = BPETokenizer(context_length=getattr(model, "context_length", 77))
        self.preprocess = opts.preprocess or model_preprocess(model).mode
        source_opts = SourceOptions(**{**vars(opts.source), "run_dir": run_dir, "preprocess": self.preprocess})
        self.source = open_source(dataset, model.image_size, source_opts)

    def image_features(self, data: LabelledImages | CaptionedImages) -> tuple[torch.Tensor, torch.Tensor | None]:
        return cached_image_features(self.model, data.dataset, data.key, self.opts.cache_dir,
                                     batch_size=self.opts.encode_batch, num_workers=self.opts.num_workers)

    def classifier(self, data: LabelledImages, templates: list[str] | None = None) -> torch.Tensor:
        return build_classifier(self.model, self.tokenizer, data.prompts, templates or data.templates)

    def labelled_features(self, split: str, variant: str | None = None) -> tuple[LabelledImages, torch.Tensor,
                                                                                   torch.Tensor]:
        data = self.source.labelled(split, variant)
        features, labels = self.image_features(data)
        assert labels is not None
        return data, features, labels


def scores_with_subsets(logits: torch.Tensor, labels: torch.Tensor, subsets: dict[str, list[int]]) -> dict:
    """classification_metrics over all rows, and over the rows of each subset of classes."""
    out: dict[str, Any] = classification_metrics(logits, labels)
    for name, classes in subsets.items():
        rows = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
        if bool(rows.any()):
            out.setdefault("subsets", {})[name] = classification_metrics(logits[rows], labels[rows])
    return out


def task_zeroshot(ev: Evaluator) -> dict[str, Any]:
    data, features, labels = ev.labelled_features(ev.opts.split)
    logits = features @ ev.classifier(data)  # [N, C]
    out = {"images": len(labels), "classes": len(data.classnames), "templates": len(data.templates),
           **scores_with_subsets(logits, labels, data.subsets)}
    single = scores_with_subsets(features @ ev.classifier(data, data.templates[:1]), labels, data.subsets)
    out["single_template"] = {"template": data.templates[0], **single}
    recalls = per_class_recall(logits, labels, len(data.classnames))
    out["per_class_recall"] = dict(zip(data.classnames, recalls))
    if ev.opts.plot:
        plots.plot_per_class_accuracy(ev.opts.plot, data.classnames, recalls,
                                      title=f"Zero-shot per-class recall ({ev.source.name})")
    return out


def task_retrieval(ev: Evaluator) -> dict[str, Any]:
    data = ev.source.captioned(ev.opts.split)
    image_features, _ = ev.image_features(data)
    text_features = encode_texts(ev.model, ev.tokenizer, data.texts)
    out: dict[str, Any] = {"images": image_features.shape[0], "captions": len(data.texts)}
    out.update(retrieval_metrics(image_features, text_features, data.text_to_image))
    if ev.opts.plot:
        plots.plot_recall_at_k(ev.opts.plot, out, title=f"Retrieval recall@k ({ev.source.name})")
    return out


def _probe_splits(ev: Evaluator) -> tuple[tuple, tuple, tuple, LabelledImages, torch.Tensor]:
    """(train, val, test) feature/label pairs, the test data and its features."""
    if ev.source.single_set:
        raise ConfigError(f"linear-probe on {ev.source.name}: the manifest has no 'split' column, and a probe "
                          "needs separate train and test images")
    _, train_x, train_y = ev.labelled_features("train")
    try:
        _, val_x, val_y = ev.labelled_features("val")
        val = (val_x, val_y)
    except DatasetError:  # no validation split (e.g. a manifest with train/test only): carved from train
        (train_x, train_y), val = carve_validation(train_x, train_y, seed=ev.opts.seed)
    test_data, test_x, test_y = ev.labelled_features(ev.opts.split)
    return (train_x, train_y), val, (test_x, test_y), test_data, test_x


def task_linear_probe(ev: Evaluator) -> dict[str, Any]:
    train, val, test, test_data, test_x = _probe_splits(ev)
    classes = len(test_data.classnames)
    out: dict[str, Any] = {"train_images": len(train[1]), "val_images": len(val[1]),
                           "test_images": len(test[1]), "classes": classes}
    out.update(linear_probe(train, test, val=val, num_classes=classes, seed=ev.opts.seed))
    out["val_scores"] = {f"{c:.3g}": v for c, v in out["val_scores"].items()}  # JSON keys
    zeroshot = classification_metrics(test_x @ ev.classifier(test_data), test[1])
    out["zeroshot"] = zeroshot  # on the same test images, for the zero-shot vs few-shot comparison
    if ev.opts.shots:
        out["kshot"] = {}
        for k in ev.opts.shots:
            run = kshot_probe(train, test, k, val=val, draws=ev.opts.draws,
                              num_classes=classes, seed=ev.opts.seed)
            out["kshot"][str(k)] = run
        if ev.opts.plot:
            means = [out["kshot"][str(k)]["acc1_mean"] for k in ev.opts.shots]
            stds = [out["kshot"][str(k)]["acc1_std"] for k in ev.opts.shots]
            plots.plot_zero_shot_vs_kshot(ev.opts.plot, zeroshot["acc1"], list(ev.opts.shots), means, stds,
                                          title=f"Zero-shot vs k-shot linear probe ({ev.source.name})")
    return out


def robustness_point(ev: Evaluator, variants: tuple[str, ...]) -> tuple[RobustnessPoint, dict[str, Any]]:
    """Zero-shot accuracy in distribution and on each variant (one classifier, the prompt ensemble)."""
    data, features, labels = ev.labelled_features(ev.opts.split)
    classifier = ev.classifier(data)
    detail: dict[str, Any] = {"in_distribution": scores_with_subsets(features @ classifier, labels, data.subsets),
                              "variants": {}}
    for variant in variants:
        _, shifted, shifted_labels = ev.labelled_features(ev.opts.split, variant)
        detail["variants"][variant] = scores_with_subsets(shifted @ classifier, shifted_labels, data.subsets)
    return point_from_results(detail), detail


def task_robustness(ev: Evaluator, dataset: str) -> dict[str, Any]:
    variants = ev.opts.variants or tuple(ev.source.variants)
    unknown = [v for v in variants if v not in ev.source.variants]
    if unknown:
        raise ConfigError(f"--variants: '{unknown[0]}' is not a variant of {ev.source.name} "
                          f"(expected {', '.join(ev.source.variants)})")
    point, detail = robustness_point(ev, variants)
    baselines = [baseline_point(spec, dataset, variants, ev.opts) for spec in ev.opts.baselines]
    summary = summarize(point, baselines)
    for variant in variants:
        detail["variants"][variant].update(summary[variant])
    detail["average"] = summary["average"]
    detail["baselines"] = [b.name for b in baselines]
    return detail


def baseline_point(spec: str, dataset: str, variants: tuple[str, ...], opts: EvalOptions) -> RobustnessPoint:
    """A baseline model's accuracies: read from a robustness results JSON, or measured now for a model."""
    if spec.endswith(".json") and Path(spec).is_file():
        return load_point(spec)
    model, run_dir = resolve_model(spec, eval_device(opts.device))
    sub = EvalOptions(**{**vars(opts), "plot": None})
    point, _ = robustness_point(Evaluator(model, spec, run_dir, dataset, sub), variants)
    return RobustnessPoint(point.acc_in, point.acc_shift, spec)


def task_margins(ev: Evaluator) -> dict[str, Any]:
    data = ev.source.captioned(ev.opts.split)
    image_features, _ = ev.image_features(data)
    first = torch.ones(len(data.texts), dtype=torch.bool)
    first[1:] = data.text_to_image[1:] != data.text_to_image[:-1]  # the first caption of each image
    text_features = encode_texts(ev.model, ev.tokenizer, [t for t, keep in zip(data.texts, first) if keep])
    try:
        i2t, t2i, order = margins_in_batches(image_features, text_features, ev.opts.batch_size, ev.opts.seed)
    except ValueError as exc:
        raise ConfigError(f"margins on {ev.source.name}: {exc}") from None
    return {"batch_size": ev.opts.batch_size, "batches": len(order) // ev.opts.batch_size,
            "pairs": len(order), "pairs_available": image_features.shape[0],
            "i2t": describe(i2t), "t2i": describe(t2i),
            "per_sample": {"pair": order.tolist(), "i2t": i2t.tolist(), "t2i": t2i.tolist()}}


def check_options(task: str, opts: EvalOptions) -> None:
    """Options that cannot work for `task`, refused before any model or data is loaded."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    if opts.plot and task in ("robustness", "margins"):
        raise ConfigError(f"--plot: {task} has no figure; its numbers are in the JSON")
    if opts.plot and task == "linear-probe" and not opts.shots:
        raise ConfigError("--plot for linear-probe draws the zero-shot vs k-shot curve: give --shots too")
    if any(k < 1 for k in opts.shots) or opts.draws < 1:
        raise ConfigError("--shots and --draws: expected positive integers")


def eval_device(requested: str | None) -> torch.device:
    """The device to evaluate on: the one asked for, else the first GPU when CUDA is available, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
    return device


def run_eval(task: str, model_spec: str, dataset: str, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Run `task` for the model `model_spec` on `dataset`; returns the results dict written as JSON."""
    opts = opts or EvalOptions()
    check_options(task, opts)
    device = eval_device(opts.device)  # a bad --device stops before the model is loaded
    start = time.perf_counter()
    model, run_dir = resolve_model(model_spec, device, opts.load)
    ev = Evaluator(model, model_spec, run_dir, dataset, opts)
    handlers: dict[str, Callable[[], dict[str, Any]]] = {
        "zeroshot": lambda: task_zeroshot(ev), "retrieval": lambda: task_retrieval(ev),
        "linear-probe": lambda: task_linear_probe(ev), "robustness": lambda: task_robustness(ev, dataset),
        "margins": lambda: task_margins(ev),
    }
    results = handlers[task]()  # not under no_grad: the linear probe fits with autograd
    header = {"task": task, "model": model_spec, "dataset": dataset, "split": ev.opts.split,
              "preprocess": ev.preprocess}
    return {**header, **results, "seconds": round(time.perf_counter() - start, 2)}


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value
