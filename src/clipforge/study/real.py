"""The real-data setting of a study: what a cell measures on held-out splits of real corpora, as flat metrics.

A study whose `eval.tasks` lists evaluator tasks (the `eval.tasks` entries of a training config: zero-shot,
retrieval, linear probe, margins on a prepared corpus or a manifest) evaluates each cell with those shared
evaluators instead of the synthetic battery. Each task's result is flattened into a few named numbers:

    zeroshot/<ds>       zeroshot_<ds>_top1, zeroshot_<ds>_mpcr (mean per-class recall)
    retrieval/<ds>      retrieval_<ds>_i2t_r1, retrieval_<ds>_t2i_r1, retrieval_<ds>_i2t_r5, retrieval_<ds>_t2i_r5
    linear-probe/<ds>   probe_<ds>_top1
    margins/<ds>        margin_<ds>_i2t, margin_<ds>_t2i (mean in-batch margins)

`<ds>` is the task's dataset name (the file stem for a manifest path); a task with an explicit `name` uses
that name instead. Kept free of torch: the study config validates claims against these names cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError
from ..eval.spec import EvalTask

# task -> (suffix, path into the evaluator's result, column header, scale, decimals)
_FIELDS: dict[str, tuple[tuple[str, tuple[str, ...], str, float, int], ...]] = {
    "zeroshot": (("top1", ("acc1",), "zero-shot %", 100.0, 1),
                 ("mpcr", ("mean_per_class_recall",), "zero-shot mean per-class recall %", 100.0, 1)),
    "retrieval": (("i2t_r1", ("text_retrieval_recall@1",), "R@1 i→t %", 100.0, 1),
                  ("t2i_r1", ("image_retrieval_recall@1",), "R@1 t→i %", 100.0, 1),
                  ("i2t_r5", ("text_retrieval_recall@5",), "R@5 i→t %", 100.0, 1),
                  ("t2i_r5", ("image_retrieval_recall@5",), "R@5 t→i %", 100.0, 1)),
    "linear-probe": (("top1", ("acc1",), "linear probe %", 100.0, 1),),
    "margins": (("i2t", ("i2t", "mean"), "margin i→t", 1.0, 3), ("t2i", ("t2i", "mean"), "margin t→i", 1.0, 3)),
}  # fmt: skip
_PREFIX = {"zeroshot": "zeroshot", "retrieval": "retrieval", "linear-probe": "probe", "margins": "margin"}


def task_label(task: EvalTask) -> str:
    """The dataset part of a task's metric names: its `name`, else the dataset (a manifest path's stem)."""
    if task.name:
        return task.name
    return Path(task.dataset).stem if "/" in task.dataset or "." in task.dataset else task.dataset


def check_tasks(tasks: Sequence[EvalTask], where: str) -> None:
    """Tasks a study cell can flatten: known tasks, each (task, label) once."""
    seen: set[tuple[str, str]] = set()
    for i, task in enumerate(tasks):
        if task.task not in _FIELDS:
            raise ConfigError(f"config key '{where}.tasks[{i}].task': a study cell flattens {sorted(_FIELDS)}, "
                              f"got '{task.task}'")
        if task.split == "train":
            raise ConfigError(f"config key '{where}.tasks[{i}].split': a study evaluates on held-out images, "
                              "not the training split")
        key = (task.task, task_label(task))
        if key in seen:
            raise ConfigError(f"config key '{where}.tasks[{i}]': two {task.task} tasks are labelled "
                              f"'{key[1]}'; give one a `name`")
        seen.add(key)


def real_columns(tasks: Sequence[EvalTask]) -> list[tuple[str, str, float, int]]:
    """(metric key, column header, scale, decimals) of every flat metric the tasks produce, in task order."""
    columns = []
    for task in tasks:
        label = task_label(task)
        for suffix, _, header, scale, decimals in _FIELDS[task.task]:
            columns.append((f"{_PREFIX[task.task]}_{label}_{suffix}", f"{label} {header}", scale, decimals))
    return columns


def flatten_results(tasks: Sequence[EvalTask], results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The flat metrics of one cell from `run_evaluators`' results ({task key: result}), as `real_columns`."""
    out: dict[str, float] = {}
    for task in tasks:
        result = results[task.key]
        label = task_label(task)
        for suffix, path, *_ in _FIELDS[task.task]:
            value: Any = result
            for part in path:
                value = value[part]
            out[f"{_PREFIX[task.task]}_{label}_{suffix}"] = float(value)
    return out
