"""One cell of a study: train, evaluate, write `cells/<id>.json` atomically.

A cell's JSON is written only once everything is measured, by rename, so its presence means "finished";
it records the cell's fingerprint, and a rerun skips a cell only when the stored fingerprint matches.
A cell whose training a signal stopped raises `CellInterrupted` and writes nothing (`study.resume`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..checkpoint import atomic_write_text
from ..config import to_dict
from ..data.synthetic import STREAM_EVAL, SyntheticPairs, SyntheticWorld, render
from ..eval.linear_probe import fit_logistic, linear_probe
from ..eval.margins import diagnose_margins
from ..eval.metrics import classification_metrics
from ..eval.evaluators import Evaluator, run_evaluators
from ..eval.spec import EvalTask
from ..eval.synthetic import headline
from ..eval.zeroshot import encode_images
from ..speed import cpu_description
from ..tokenizer import tokenizer_for
from ..train.loop import BEST_MODEL, Hook, train
from ..transforms import normalize, to_tensor
from .config import Cell, CellEval
from .real import flatten_results
from .resume import CellInterrupted, cell_train_config, last_step_entry, record_spent, spent_before

# Streams of the synthetic world that only the linear probe draws from (training uses 0, evaluation 1-3).
STREAM_PROBE_TRAIN, STREAM_PROBE_TEST = 10, 11


class ProbeImages(Dataset):
    """Single-object images of every colour x shape combination (held-out ones included), labelled 0..63.

    The probe is supervised, so the combinations held out of CLIP training are fair game here: it measures
    how well the frozen image features separate all 64 classes.
    """

    def __init__(self, world: SyntheticWorld, stream: int, per_class: int) -> None:
        self.world, self.stream = world, stream
        self.combos = [tuple(c.split(" ", 1)) for c in world.classnames]
        self.length = per_class * len(self.combos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % len(self.combos)
        objects, rng = self.world.scene(self.stream, index, combos=[self.combos[label]], n_objects=1)
        image = render(objects, rng, self.world.cfg.image_size)
        return normalize(to_tensor(image)), label


def probe_accuracy(model: torch.nn.Module, world: SyntheticWorld, spec: CellEval) -> dict[str, float]:
    """Top-1 of a linear probe on frozen image features (64 classes); C swept or fixed as `spec` says."""
    train_set = encode_images(model, ProbeImages(world, STREAM_PROBE_TRAIN, spec.probe_train_per_class))
    test_set = encode_images(model, ProbeImages(world, STREAM_PROBE_TEST, spec.probe_test_per_class))
    classes = len(world.classnames)
    if spec.probe_C is None:
        result = linear_probe(train_set, test_set, num_classes=classes)
        return {"probe_top1": float(result["acc1"]), "probe_C": float(result["C"])}  # type: ignore[arg-type]
    weights = fit_logistic(*train_set, spec.probe_C, classes)
    metrics = classification_metrics(weights.logits(test_set[0]), test_set[1])
    return {"probe_top1": float(metrics["acc1"]), "probe_C": spec.probe_C}


def evaluate_cell(model: torch.nn.Module, cell: Cell, run_dir: Path) -> tuple[dict[str, float], dict[str, object]]:
    """(metrics, margin report) of a trained cell model; the margin JSON/PNG go into its run directory.

    Not under no_grad as a whole: the probe's L-BFGS needs autograd (the encoders run without it).
    """
    model.eval()
    spec = cell.eval
    world = SyntheticWorld(cell.train.data.synthetic)
    tokenizer = tokenizer_for(model.config)
    tasks = (EvalTask("zeroshot", per_class=spec.zeroshot_per_class, templates="synthetic"),
             EvalTask("retrieval", pairs=spec.retrieval_pairs))  # the demo's evaluators, on the cell's world
    results = run_evaluators([Evaluator.from_task(t, run_dir=run_dir) for t in tasks], model, tokenizer)
    metrics = headline(results["zeroshot/synthetic"], results["retrieval/synthetic"])
    model.eval()
    metrics.update(probe_accuracy(model, world, spec))
    pairs = SyntheticPairs(world, STREAM_EVAL, length=spec.margin_pairs, complete=True)
    margins = diagnose_margins(model, tokenizer, pairs, spec.margin_batch_size, run_dir, "margins")
    for series in ("i2t", "t2i"):
        metrics[f"margin_{series}"] = float(margins[series]["mean"])  # type: ignore[index]
        metrics[f"margin_{series}_frac_negative"] = float(margins[series]["frac_negative"])  # type: ignore[index]
    metrics["positive_similarity"] = float(margins["positive"]["mean"])  # type: ignore[index]
    metrics["temperature"] = float(1.0 / model.logit_scale.detach().exp())
    return metrics, margins


def evaluate_real_cell(model: torch.nn.Module, cell: Cell) -> dict[str, float]:
    """The real-data setting: the flat metrics (`study.real`) of the cell's evaluator tasks on held-out splits,
    and the temperature the model ended with."""
    model.eval()
    tasks = cell.eval.tasks
    results = run_evaluators([Evaluator.from_task(t) for t in tasks], model, tokenizer_for(model.config))
    metrics = flatten_results(tasks, results)
    metrics["temperature"] = float(1.0 / model.logit_scale.detach().exp())
    return metrics


def cell_path(output_dir: str | Path, cell: Cell) -> Path:
    return Path(output_dir) / "cells" / f"{cell.id}.json"


def finished(output_dir: str | Path, cell: Cell) -> bool:
    """Whether the cell's result exists for exactly this configuration (same fingerprint)."""
    path = cell_path(output_dir, cell)
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False  # cannot happen with atomic writes, but a hand-edited file must not stop the study
    return stored.get("fingerprint") == cell.fingerprint()


def run_cell(cell: Cell, output_dir: str | Path, threads: int | None = None,
             hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train (or resume, see `study.resume`) and evaluate one cell; returns (and writes atomically) its result
    record. `hooks` go to `train`. Raises `CellInterrupted`, writing no record, when a signal stops training."""
    if threads is not None:
        torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train(cell_train_config(cell), progress=False, hooks=hooks)
    # what earlier sessions of a resumed cell spent (a cell trained afresh owes nothing to them)
    earlier = spent_before(result.run_dir) if result.resumed_from is not None else {}
    if result.interrupted:
        record_spent(result.run_dir, time.process_time() - cpu_start, time.perf_counter() - start, earlier)
        checkpoint = str(result.checkpoint) if result.checkpoint is not None else None
        raise CellInterrupted(cell.id, result.interrupted, result.steps, checkpoint)
    assert result.model is not None
    eval_start = time.perf_counter()
    margins: dict[str, object] | None = None  # the synthetic setting's margin report (histograms) only
    if cell.eval.tasks:
        metrics = evaluate_real_cell(result.model, cell)
    else:
        metrics, margins = evaluate_cell(result.model, cell, result.run_dir)
    metrics["train_seconds"] = result.train_seconds
    metrics["steps_trained"] = float(result.steps)
    if result.early_stop is not None:  # 1: the validation signal plateaued within the step budget
        metrics["stopped_early"] = float(result.early_stop["stopped_step"] is not None)
        if "restored_step" in result.early_stop:  # restore_best: the step whose weights were evaluated
            metrics["model_step"] = float(result.early_stop["restored_step"])
    metrics["eval_seconds"] = time.perf_counter() - eval_start
    if not cell.eval.keep_models:  # a study keeps numbers, not dozens of weight files
        for name in ("model.safetensors", BEST_MODEL):
            (result.run_dir / name).unlink(missing_ok=True)
    record = {
        "cell": cell.id,
        "variant": cell.variant.id,
        "name": cell.variant.name,
        "seed": cell.seed,
        "fingerprint": cell.fingerprint(),
        "overrides": cell.variant.overrides,
        "metrics": metrics,
        "final_log": result.last_log or last_step_entry(result.run_dir),
        "early_stop": result.early_stop,
        "margins": margins,
        "config": to_dict(cell.train),
        "wall_seconds": float(earlier.get("wall_seconds", 0.0)) + time.perf_counter() - start,
        # CPU time of this process (and of the cell's interrupted sessions before it): on a shared machine the
        # honest measure of what a cell costs
        "cpu_seconds": float(earlier.get("cpu_seconds", 0.0)) + time.process_time() - cpu_start,
        # where it ran: CPUs round differently (their matmul kernels), so a cell rerun elsewhere differs
        "machine": {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if result.resumed_from is not None:  # time_complete False: an earlier session left no time (a crash)
        record["resumed"] = {"sessions": int(earlier.get("sessions", 0)) + 1, "time_complete": bool(earlier)}
    atomic_write_text(cell_path(output_dir, cell), json.dumps(record, indent=1))
    return record
