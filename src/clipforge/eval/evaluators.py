"""Evaluators: a task (zero-shot, retrieval, linear probe, robustness, margins) on a dataset with its options,
run on any model with its tokenizer: `Evaluator(...).run(model, tokenizer) -> metrics`.

The same evaluators serve `clipforge eval`, the demo, the study, `scripts/real_data_report.py` and evaluation
during training (`eval.tasks` in a training config), so each of them reads the same images and computes the
same numbers. Image features go through the on-disk cache when `cache_dir` is set (`features`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..data.base import DatasetError
from ..factory import LoadOptions
from ..transforms import model_preprocess
from . import TASKS, plots
from .features import cached_image_features, encode_texts
from .linear_probe import carve_validation, kshot_probe, linear_probe
from .margins import describe, margins_in_batches
from .metrics import (
    classification_metrics,
    mean_margin,
    per_class_recall,
    retrieval_metrics,
)
from .resolve import eval_device, model_tokenizer, resolve_model
from .robustness import RobustnessPoint, load_point, point_from_results, summarize
from .spec import EvalTask
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
    synonyms: bool = False  # zeroshot on the synthetic world: also with synonym class names
    load: LoadOptions = field(default_factory=LoadOptions)  # what the model file may not say (--arch, …)
    preprocess: str | None = None  # "openai" or "clipforge" eval pipeline; None: the one stored with the model
    head: str | None = None  # zeroshot: classify with this trained head (`clipforge finetune-head`) instead


class Session:
    """One model and its tokenizer on one dataset: encodes images (through the cache) and texts."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, run_dir: Path | None, dataset: str,
                 opts: EvalOptions) -> None:
        if not hasattr(model, "image_size"):
            raise ConfigError("the model's input image size is unknown")
        self.model, self.tokenizer, self.opts, self.dataset = model, tokenizer, opts, dataset
        self.preprocess = opts.preprocess or model_preprocess(model).mode
        source_opts = SourceOptions(**{**vars(opts.source), "run_dir": run_dir or opts.source.run_dir,
                                       "preprocess": self.preprocess})
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
    """classification_metrics and the mean margin of the label over the best other class (`mean_margin`), over
    all rows and over the rows of each subset of classes (ranked against all classes)."""
    def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        return {**classification_metrics(logits, labels), "mean_margin": mean_margin(logits, labels)}

    out = scores(logits, labels)
    for name, classes in subsets.items():
        rows = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
        if bool(rows.any()):
            out.setdefault("subsets", {})[name] = scores(logits[rows], labels[rows])
    return out


def head_logits(ev: Session, data: LabelledImages, features: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] of the trained head `ev.opts.head`, refused unless it was fitted on this model and classes."""
    from ..adapt.head import load_head  # noqa: PLC0415
    from .features import model_checksum  # noqa: PLC0415

    head = load_head(ev.opts.head)  # type: ignore[arg-type]
    if head.classnames != list(data.classnames):
        raise ConfigError(f"--head {ev.opts.head}: its classes {head.classnames[:3]}... are not this dataset's "
                          f"{list(data.classnames)[:3]}...")
    if head.info.get("model_checksum") not in (None, model_checksum(ev.model)):
        raise ConfigError(f"--head {ev.opts.head}: fitted on the features of another model")
    return head(features)


def task_zeroshot(ev: Session) -> dict[str, Any]:
    data, features, labels = ev.labelled_features(ev.opts.split)
    if ev.opts.head:
        return {"images": len(labels), "classes": len(data.classnames), "head": ev.opts.head,
                **scores_with_subsets(head_logits(ev, data, features), labels, data.subsets)}
    logits = features @ ev.classifier(data)  # [N, C]
    out = {"images": len(labels), "classes": len(data.classnames), "templates": len(data.templates),
           **scores_with_subsets(logits, labels, data.subsets)}
    single = scores_with_subsets(features @ ev.classifier(data, data.templates[:1]), labels, data.subsets)
    out["single_template"] = {"template": data.templates[0], **single}
    if ev.opts.synonyms:
        if data.synonym_prompts is None:
            raise ConfigError(f"synonyms: {ev.source.name} has no synonym class names (only the synthetic world)")
        classifier = build_classifier(ev.model, ev.tokenizer, data.synonym_prompts, data.templates)
        out["synonyms"] = scores_with_subsets(features @ classifier, labels, data.subsets)
    recalls = per_class_recall(logits, labels, len(data.classnames))
    out["per_class_recall"] = dict(zip(data.classnames, recalls))
    if ev.opts.plot:
        plots.plot_per_class_accuracy(ev.opts.plot, data.classnames, recalls,
                                      title=f"Zero-shot per-class recall ({ev.source.name})")
    return out


def task_retrieval(ev: Session) -> dict[str, Any]:
    data = ev.source.captioned(ev.opts.split)
    image_features, _ = ev.image_features(data)
    text_features = encode_texts(ev.model, ev.tokenizer, data.texts)
    out: dict[str, Any] = {"images": image_features.shape[0], "captions": len(data.texts)}
    out.update(retrieval_metrics(image_features, text_features, data.text_to_image))
    if ev.opts.plot:
        plots.plot_recall_at_k(ev.opts.plot, out, title=f"Retrieval recall@k ({ev.source.name})")
    return out


def _probe_splits(ev: Session) -> tuple[tuple, tuple, tuple, LabelledImages, torch.Tensor]:
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


def task_linear_probe(ev: Session) -> dict[str, Any]:
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


def robustness_point(ev: Session, variants: tuple[str, ...]) -> tuple[RobustnessPoint, dict[str, Any]]:
    """Zero-shot accuracy in distribution and on each variant (one classifier, the prompt ensemble)."""
    data, features, labels = ev.labelled_features(ev.opts.split)
    classifier = ev.classifier(data)
    detail: dict[str, Any] = {"in_distribution": scores_with_subsets(features @ classifier, labels, data.subsets),
                              "variants": {}}
    for variant in variants:
        _, shifted, shifted_labels = ev.labelled_features(ev.opts.split, variant)
        detail["variants"][variant] = scores_with_subsets(shifted @ classifier, shifted_labels, data.subsets)
    return point_from_results(detail), detail


def task_robustness(ev: Session) -> dict[str, Any]:
    variants = ev.opts.variants or tuple(ev.source.variants)
    unknown = [v for v in variants if v not in ev.source.variants]
    if unknown:
        raise ConfigError(f"--variants: '{unknown[0]}' is not a variant of {ev.source.name} "
                          f"(expected {', '.join(ev.source.variants)})")
    point, detail = robustness_point(ev, variants)
    baselines = [baseline_point(spec, ev.dataset, variants, ev.opts) for spec in ev.opts.baselines]
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
    model, run_dir = resolve_model(spec, eval_device(opts.device), opts.load)
    sub = EvalOptions(**{**vars(opts), "plot": None})
    point, _ = robustness_point(Session(model, model_tokenizer(model, spec), run_dir, dataset, sub), variants)
    return RobustnessPoint(point.acc_in, point.acc_shift, spec)


def task_margins(ev: Session) -> dict[str, Any]:
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


TASK_FUNCTIONS: dict[str, Callable[[Session], dict[str, Any]]] = {
    "zeroshot": task_zeroshot, "retrieval": task_retrieval, "linear-probe": task_linear_probe,
    "robustness": task_robustness, "margins": task_margins,
}


@dataclass(frozen=True)
class Evaluator:
    """A task on a dataset with its options; `run(model, tokenizer)` returns its metrics (plain JSON data).

    `run_dir`, when set, is the run whose config.yaml describes the synthetic world the model was trained on.
    """

    task: str
    dataset: str = "synthetic"
    opts: EvalOptions = field(default_factory=lambda: EvalOptions())
    name: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task '{self.task}' (expected one of {', '.join(TASKS)})")
        if not self.name:
            object.__setattr__(self, "name", f"{self.task}/{self.dataset}")

    @classmethod
    def from_task(cls, spec: EvalTask, run_dir: Path | None = None, cache_dir: str | None = None) -> Evaluator:
        """The evaluator of one `eval.tasks` entry of a training config."""
        source = SourceOptions(limit=spec.limit, templates=spec.templates, root=spec.root, language=spec.language,
                               run_dir=run_dir, per_class=spec.per_class, pairs=spec.pairs,
                               captions_per_image=spec.captions_per_image)
        opts = EvalOptions(source=source, split=spec.split, shots=spec.shots, draws=spec.draws,
                           batch_size=spec.batch_size, seed=spec.seed, cache_dir=cache_dir, synonyms=spec.synonyms)
        return cls(spec.task, spec.dataset, opts, spec.key)

    def with_run_dir(self, run_dir: Path | None) -> Evaluator:
        return replace(self, opts=replace(self.opts, source=replace(self.opts.source, run_dir=run_dir)))

    def run(self, model: torch.nn.Module, tokenizer: Callable) -> dict[str, Any]:
        """The task's metrics for `model` read through `tokenizer`; the model's train/eval mode is restored."""
        was_training = model.training
        model.eval()
        try:  # not under no_grad as a whole: the linear probe fits with autograd (the encoders run without)
            return TASK_FUNCTIONS[self.task](Session(model, tokenizer, None, self.dataset, self.opts))
        finally:
            model.train(was_training)


def run_evaluators(evaluators: list[Evaluator], model: torch.nn.Module, tokenizer: Callable) -> dict[str, Any]:
    """{evaluator name: its metrics} for one model."""
    return {ev.name: ev.run(model, tokenizer) for ev in evaluators}


def synthetic_headline(model: torch.nn.Module, tokenizer: Callable, per_class: int = 20, pairs: int = 1000,
                       run_dir: Path | None = None) -> dict[str, float]:
    """The demo's flat numbers (`synthetic.headline`) from the synthetic world's zeroshot and retrieval
    evaluators: the world of `run_dir`'s config, else the default one at the model's resolution."""
    from .synthetic import headline  # noqa: PLC0415

    tasks = (EvalTask("zeroshot", per_class=per_class, templates="synthetic"), EvalTask("retrieval", pairs=pairs))
    results = run_evaluators([Evaluator.from_task(t, run_dir=run_dir) for t in tasks], model, tokenizer)
    return headline(results["zeroshot/synthetic"], results["retrieval/synthetic"])
