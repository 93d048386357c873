"""`clipforge <command>`: parses arguments, then calls library functions. Errors print one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import ConfigError
from .formats import CheckpointFormatError

Handler = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, Handler] = {}


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from .checkpoint import atomic_write_text  # noqa: PLC0415

        atomic_write_text(path, json.dumps(payload, indent=2))
        print(f"Results written to {path}")


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import run_demo  # noqa: PLC0415

    run_demo(args.output, extra, progress=not args.no_progress, config=args.config)
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .train.config import load_train_config  # noqa: PLC0415
    from .train.loop import train  # noqa: PLC0415

    cfg = load_train_config(args.config, extra)
    result = train(cfg, progress=not args.no_progress)
    print(f"Finished {result.steps} steps in {result.train_seconds:.1f} s; run directory: {result.run_dir}")
    _write_json(args.output, {"run_dir": str(result.run_dir), "train_seconds": result.train_seconds,
                              **{k: v for k, v in result.last_log.items()}})
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from .eval.runner import run_eval  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    results = run_eval(args.task, args.model, args.dataset, args)
    print(json.dumps(results, indent=2))
    _write_json(args.output, results)
    return 0


def cmd_study(args: argparse.Namespace, extra: list[str]) -> int:
    from .study import run_study  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1, got {args.jobs}")
    output_dir = args.output_dir or str(Path("studies") / Path(args.config).stem)
    command = " ".join(["clipforge", "study", args.config, "--output-dir", output_dir, "--jobs", str(args.jobs)]
                       + (["--figures-dir", args.figures_dir] if args.figures_dir else []))
    outcome = run_study(args.config, output_dir, args.jobs, args.figures_dir, args.report_only, command=command)
    _write_json(args.output, outcome.summary)
    return 1 if outcome.failed else 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from . import convert  # noqa: PLC0415
    from .checkpoint import save_model  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    model = convert.load_model(args.model)
    writers = {"hf": convert.export_hf, "openclip": convert.export_openclip, "openai": convert.export_openai,
               "clipforge": save_model}
    written = writers[args.to](model, args.output)
    print(f"Wrote {args.to} format to {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="Train, evaluate and use CLIP models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small CLIP on the embedded data and classify unseen images zero-shot",
                       description="Train a small CLIP on the embedded synthetic data, then evaluate zero-shot. "
                       "Extra --section.key=value arguments override the training config.")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--config", help="a training config YAML to use instead of the demo defaults")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("train", help="train a CLIP from a YAML config",
                       description="Train a CLIP. Any --section.key=value argument overrides the config, "
                       "e.g. --steps=100 --optim.lr=5e-4 --data.synthetic.caption_noise=0.2")
    p.add_argument("--config", help="training config YAML (see configs/); defaults are the demo's")
    p.add_argument("--output", help="write a JSON summary to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model: zeroshot, retrieval",
                       description="Evaluate a model on a dataset.")
    p.add_argument("task", choices=["zeroshot", "retrieval"], help="what to measure")
    p.add_argument("--model", required=True, help="a model file, a run directory, or an architecture name")
    p.add_argument("--dataset", default="synthetic", help="dataset name (default: the embedded synthetic world)")
    p.add_argument("--config", help="training config whose synthetic-world settings to use (default: the run's)")
    p.add_argument("--templates", default=None, help="prompt template set (default: the dataset's)")
    p.add_argument("--per-class", type=int, default=20, help="synthetic images per class for zero-shot")
    p.add_argument("--pairs", type=int, default=1000, help="synthetic pairs for retrieval")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("study", help="train a grid of variants x seeds and report mean ± std of every metric",
                       description="Train every (variant, seed) cell of a study file on the embedded data, "
                       "evaluate each, and write results.md, results.json and figures. Finished cells are "
                       "skipped, so rerunning an interrupted study resumes it.")
    p.add_argument("config", help="study YAML (e.g. configs/study.yaml)")
    p.add_argument("--output-dir", help="where cells, runs and results go (default: studies/<config name>)")
    p.add_argument("--figures-dir", help="where the figures go (default: OUTPUT_DIR/figures)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once, in separate processes")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished cells")
    p.add_argument("--output", help="also write the results summary as JSON to this file")
    p.set_defaults(handler=cmd_study)

    p = sub.add_parser("export", help="write a model in Hugging Face, OpenCLIP, OpenAI or clipforge format",
                       description="Load any checkpoint clipforge reads and write it in another tool's format.")
    p.add_argument("--model", required=True, help="checkpoint to convert (any format load_model reads)")
    p.add_argument("--to", required=True, choices=["hf", "openclip", "openai", "clipforge"],
                   help="hf: a CLIPModel folder; openclip: {'state_dict': ...} .pt; openai: a state-dict .pt; "
                   "clipforge: a self-describing .safetensors. The openai and openclip layouts store no "
                   "architecture: read them back with create_model(NAME, pretrained=PATH)")
    p.add_argument("--output", required=True, help="output file (a folder for --to hf)")
    p.set_defaults(handler=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")
    try:
        return args.handler(args, extra)
    except (ConfigError, UserError, FileNotFoundError, CheckpointFormatError) as exc:
        message = str(exc) if not isinstance(exc, FileNotFoundError) or not exc.filename else \
            f"file not found: {exc.filename}"
        print(f"clipforge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
