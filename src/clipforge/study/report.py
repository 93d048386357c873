"""A study's results: per-variant mean ± std over seeds, paired differences against the baseline, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..checkpoint import atomic_write_text
from ..eval.margins import merge_reports, plot_margin_overlay
from .config import Cell, Study, claim_metrics
from .figures import MarginPanel, plot_margin_panels
from .real import real_columns
from .stats import mean_std, paired_t_interval, verdict

# (key, column header, scale, decimals): accuracies are shown in percent.
COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("zeroshot_seen_top1", "zero-shot seen %", 100.0, 1),
    ("zeroshot_heldout_top1", "zero-shot held-out %", 100.0, 1),
    ("retrieval_i2t_r1", "R@1 i→t %", 100.0, 1),
    ("retrieval_t2i_r1", "R@1 t→i %", 100.0, 1),
    ("probe_top1", "probe %", 100.0, 1),
    ("margin_i2t", "margin i→t", 1.0, 3),
    ("margin_t2i", "margin t→i", 1.0, 3),
    ("positive_similarity", "pos. sim.", 1.0, 3),
    ("temperature", "T (end)", 1.0, 3),
    ("steps_trained", "steps", 1.0, 0),
)
DIFF_KEYS = ("zeroshot_seen_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "probe_top1", "margin_i2t",
             "margin_t2i", "positive_similarity")  # fmt: skip
Column = tuple[str, str, float, int]


MODEL_STEP: Column = ("model_step", "model step", 1.0, 0)  # early_stop.restore_best: the step evaluated


def study_columns(study: Study) -> list[Column]:
    """The results table's columns: the synthetic battery's, or the real-data tasks' flat metrics; with
    early_stop.restore_best, the step whose weights were evaluated after `steps`."""
    if study.eval.tasks:
        columns = real_columns(study.eval.tasks) + [c for c in COLUMNS if c[0] in ("temperature", "steps_trained")]
    else:
        columns = list(COLUMNS)
    if (study.train.get("early_stop") or {}).get("restore_best"):
        columns.append(MODEL_STEP)
    return columns


def load_records(output_dir: str | Path, cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """The finished cells' records (fingerprint matching the current config), by cell id."""
    records = {}
    for cell in cells:
        path = Path(output_dir) / "cells" / f"{cell.id}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("fingerprint") == cell.fingerprint():
                records[cell.id] = record
    return records


def summarise(study: Study, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant: each metric's mean ± std over its finished seeds, and paired differences vs the baseline."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {v.id: {} for v in study.variants}
    for record in records.values():
        if record["variant"] in by_variant:
            by_variant[record["variant"]][int(record["seed"])] = record
    base = by_variant.get(study.baseline or "", {})
    columns = study_columns(study)
    variants = []
    for v in study.variants:
        runs = by_variant[v.id]
        entry: dict[str, Any] = {"id": v.id, "name": v.name, "groups": list(v.groups), "overrides": v.overrides,
                                 "seeds": sorted(runs), "metrics": {}, "vs_baseline": {}}  # fmt: skip
        if runs:
            entry["metrics"] = _metric_stats(runs, columns)
            paired = sorted(set(runs) & set(base))
            if study.baseline and v.id != study.baseline and paired:
                for key in claim_metrics(study.eval):
                    if not all(key in runs[s]["metrics"] and key in base[s]["metrics"] for s in paired):
                        continue
                    diffs = [runs[s]["metrics"][key] - base[s]["metrics"][key] for s in paired]
                    ci = paired_t_interval(diffs)
                    entry["vs_baseline"][key] = {**mean_std(diffs), "values": diffs,
                                                 "ci95": [ci.low, ci.high] if ci.n > 1 else None}
        variants.append(entry)
    _baseline_on_fewer_seeds(variants, base, study.baseline, columns)
    # a resumed cell whose earlier sessions left no time (a crash) counts only its last: left out of the mean
    timed = [r for r in records.values() if "cpu_seconds" in r and r.get("resumed", {}).get("time_complete", True)]
    diff_keys = DIFF_KEYS if not study.eval.tasks else claim_metrics(study.eval)
    return {"columns": [list(c) for c in columns], "diff_keys": list(diff_keys),
            "claims": judge_claims(study, variants), "baseline": study.baseline, "seeds": list(study.seeds), "variants": variants,
            "cells_finished": len(records), "cells_total": study.cell_count(),
            "wall_seconds_sum": sum(float(r.get("wall_seconds", 0.0)) for r in records.values()),
            "cpu_seconds": {"cells": len(timed), "sum": sum(float(r["cpu_seconds"]) for r in timed)}}  # fmt: skip


def _metric_stats(runs: dict[int, dict[str, Any]], columns: Sequence[Column]) -> dict[str, Any]:
    keys = [k for k, *_ in columns] + ["train_seconds", "eval_seconds", "probe_C", "stopped_early",
                                       "margin_i2t_frac_negative", "margin_t2i_frac_negative"]
    out = {}
    for key in keys:
        values = [r["metrics"][key] for _, r in sorted(runs.items()) if key in r["metrics"]]
        if values:
            out[key] = {**mean_std(values), "values": values}
    return out


def _baseline_on_fewer_seeds(variants: list[dict[str, Any]], base: dict[int, dict[str, Any]],
                             baseline: str | None, columns: Sequence[Column]) -> None:
    """The baseline's stats again over each smaller seed set another variant ran (`on_seeds`), so that a
    table whose baseline ran extra seeds still has a row comparable with the others' means."""
    entry = next((v for v in variants if v["id"] == baseline), None)
    if entry is None:
        return
    subsets = {tuple(v["seeds"]) for v in variants
               if v["id"] != baseline and v["seeds"] and set(v["seeds"]) < set(base)}
    entry["on_seeds"] = [{"seeds": list(seeds), "metrics": _metric_stats({s: base[s] for s in seeds}, columns)}
                         for seeds in sorted(subsets)]


def judge_claims(study: Study, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per claim and member variant: the paired difference, its 95% t interval and the verdict."""
    by_id = {v["id"]: v for v in variants}
    out = []
    for claim in study.claims:
        rows = []
        for variant_id in claim.members([v.id for v in study.variants]):
            diff = by_id[variant_id]["vs_baseline"].get(claim.metric)
            if diff is None:
                continue
            ci = paired_t_interval(diff["values"])
            rows.append({"variant": variant_id, "name": by_id[variant_id]["name"], "n": ci.n, "mean": ci.mean,
                         "ci95": diff["ci95"], "verdict": verdict(ci, claim.sign)})
        out.append({"id": claim.id, "text": claim.text, "metric": claim.metric, "sign": claim.sign, "rows": rows})
    return out


def claims_markdown(claims: list[dict[str, Any]], columns: Sequence[Column] = COLUMNS) -> list[str]:
    """A table per claim: paired difference vs the baseline, its 95% t interval, the verdict."""
    lines: list[str] = []
    scales = {k: (s, d) for k, _, s, d in columns}
    for claim in claims:
        scale, decimals = scales.get(claim["metric"], (100.0, 1) if "top1" in claim["metric"] else (1.0, 3))
        unit = " (points)" if scale == 100.0 else ""
        lines += [f"### claim `{claim['id']}`: {claim['text']}", "",
                  f"Δ {claim['metric']}{unit}, variant − baseline on the same seed; claimed sign "
                  f"{'+' if claim['sign'] > 0 else '−'}.", "",
                  "| variant | n | Δ mean | 95% CI (t) | verdict |", "|---|---:|---:|---:|---|"]
        for row in claim["rows"]:
            ci = row["ci95"]
            interval = f"[{ci[0] * scale:+.{decimals}f}, {ci[1] * scale:+.{decimals}f}]" if ci else "–"
            lines.append(f"| {row['name']} | {row['n']} | {row['mean'] * scale:+.{decimals}f} | {interval} | "
                         f"{row['verdict']} |")
        if not claim["rows"]:
            lines.append("| (no variant of this claim has finished cells paired with the baseline) | | | | |")
        lines.append("")
    return lines


def _cell(stat: dict[str, float] | None, scale: float, decimals: int, signed: bool = False) -> str:
    if stat is None:
        return "–"
    sign = "+" if signed else ""
    return f"{stat['mean'] * scale:{sign}.{decimals}f} ± {stat['std'] * scale:.{decimals}f}"


def markdown_tables(summary: dict[str, Any], groups: Sequence[str]) -> str:
    """One results table per group (mean ± std over seeds) and one of paired differences vs the baseline."""
    lines = [(f"Finished cells: {summary['cells_finished']} of {summary['cells_total']}. "
              "Each entry: mean ± sample standard deviation over seeds (n = seeds finished)."), ""]
    cpu = summary.get("cpu_seconds", {})
    if cpu.get("cells"):
        lines[-1:] = [(f"CPU time per cell (train + evaluate, 1 thread): {cpu['sum'] / cpu['cells']:.0f} s on "
                       f"average over the {cpu['cells']} cells that recorded all of it (a resumed cell counts every "
                       "session)."), ""]
    columns: list[Column] = [tuple(c) for c in summary.get("columns", COLUMNS)]  # type: ignore[misc]
    header = "| variant | n | " + " | ".join(h for _, h, _, _ in columns) + " |"
    rule = "|---|---:|" + "---:|" * len(columns)
    variants = summary["variants"]
    for group in groups:
        members = [v for v in variants if group in v["groups"]]
        lines += [f"### {group}", "", header, rule]
        for v in members:
            cells = [_cell(v["metrics"].get(k), s, d) for k, _, s, d in columns]
            lines.append(f"| {v['name']} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
            for sub in v.get("on_seeds", []):
                cells = [_cell(sub["metrics"].get(k), s, d) for k, _, s, d in columns]
                seeds = ", ".join(str(seed) for seed in sub["seeds"])
                lines.append(f"| {v['name']}, seeds {seeds} only | {len(sub['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["baseline"]:
        base = next(v["name"] for v in variants if v["id"] == summary["baseline"])
        lines += [f"### paired differences vs {base} (same seed; mean ± std of the per-seed difference)", ""]
        diff_cols = [c for c in columns if c[0] in summary.get("diff_keys", DIFF_KEYS)]
        lines += ["| variant | n | " + " | ".join(f"Δ {h}" for _, h, _, _ in diff_cols) + " |",
                  "|---|---:|" + "---:|" * len(diff_cols)]  # fmt: skip
        for v in variants:
            if v["vs_baseline"]:
                n = next(iter(v["vs_baseline"].values()))["n"]
                cells = [_cell(v["vs_baseline"].get(k), s, d, signed=True) for k, _, s, d in diff_cols]
                lines.append(f"| {v['name']} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += claims_markdown(summary.get("claims", []), columns)
    return "\n".join(lines)


def plot_group_metrics(path: Path, entries: Sequence[dict[str, Any]], title: str,
                       columns: Sequence[Column] = COLUMNS) -> Path:
    """Bars with std error bars per variant: accuracies, margins, and positive similarity (own scales)."""
    from ..eval.plots import _save  # noqa: PLC0415 - the shared PNG writer

    kinds = (([c for c in columns if c[2] == 100.0], "accuracy (%)", 3),
             ([c for c in columns if c[0].startswith("margin")], "mean margin", 1),
             ([c for c in columns if c[0] == "positive_similarity"], "mean positive similarity", 1))
    kinds = tuple(k for k in kinds if k[0])
    figure = Figure(figsize=(max(11.0, 1.6 * len(entries) + 6), 5.0))
    grid = figure.add_gridspec(1, sum(width for *_, width in kinds))
    panels, start = [], 0
    for cols, ylabel, width in kinds:
        panels.append((figure.add_subplot(grid[0, start:start + width]), cols, ylabel))
        start += width
    x = np.arange(len(entries))
    for ax, cols, ylabel in panels:
        width = 0.8 / len(cols)
        for k, (key, header, scale, _) in enumerate(cols):
            stats = [e["metrics"].get(key) for e in entries]
            means = [s["mean"] * scale if s else math.nan for s in stats]
            stds = [s["std"] * scale if s else 0.0 for s in stats]
            ax.bar(x + (k - (len(cols) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=header)
        ax.set_xticks(x, [e["name"] for e in entries], rotation=35, ha="right", fontsize="x-small")
        ax.set_ylabel(ylabel)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize="x-small", ncol=min(len(cols), 3), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    figure.suptitle(f"{title} (mean ± std over seeds)", y=0.99)
    return _save(figure, path)


def write_report(study: Study, cells: Sequence[Cell], output_dir: str | Path,
                 figures_dir: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """results.json, results.md and, per group, study-<group>.png and study-margins-<group>.png."""
    output_dir = Path(output_dir)
    figures = Path(figures_dir) if figures_dir is not None else output_dir / "figures"
    records = load_records(output_dir, cells)
    summary = summarise(study, records)
    groups = study.groups() or ["all"]
    if not study.groups():
        for v in summary["variants"]:
            v["groups"] = ["all"]
    written = []
    for group in groups:
        entries = [v for v in summary["variants"] if group in v["groups"] and v["seeds"]]
        if len(entries) < 2:
            continue  # nothing to compare yet
        written.append(plot_group_metrics(figures / f"study-{group}.png", entries, f"Study: {group}",
                                          study_columns(study)))
        if study.eval.tasks:
            continue  # margin histograms are the synthetic setting's (its cells store their counts)
        reports = {}
        for v in entries:
            cell_reports = [records[f"{v['id']}--seed{s}"]["margins"] for s in v["seeds"]]
            reports[f"{v['name']} (n={len(cell_reports)})"] = merge_reports(cell_reports)
        written.append(plot_margin_overlay(figures / f"study-margins-{group}.png", reports,
                                           f"Margin and positive similarity: {group} (seeds pooled)"))
        panels = [MarginPanel(label, report, v["metrics"].get("temperature", {}).get("mean"))
                  for (label, report), v in zip(reports.items(), entries)]
        written.append(plot_margin_panels(figures / f"study-margin-histograms-{group}.png", panels,
                                          f"In-batch margins: {group} (seeds pooled)"))
    summary["figures"] = [str(p) for p in written]
    if command:
        summary["command"] = command
    atomic_write_text(output_dir / "results.json", json.dumps(summary, indent=1))
    text = markdown_tables(summary, groups)
    if command:
        text = f"Reproduce with: `{command}`\n\n" + text
    atomic_write_text(output_dir / "results.md", text + "\n")
    return summary
