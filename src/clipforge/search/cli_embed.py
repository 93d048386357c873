"""Argument parsing for `clipforge embed` and `clipforge index build|add|check|duplicates` (thin wrappers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_embed_parsers"]

INDEX_HELP = """kinds:
  flat   exact inner-product search (float32 vectors in RAM: 4 x dim bytes per vector)
  ivfpq  inverted lists + product-quantised codes (about pq_m + 8 bytes per vector); nprobe tuned
  hnsw   graph search (float32 vectors + links); efSearch tuned
  auto   flat while rows x dim <= 2.6e8 and the vectors fit --memory, else ivfpq within --memory
a captioned collection also gets a caption index of the same kind (search --modality text; flat: a float32 copy
of the captions in RAM, within --memory; --no-caption-index: scan the stored float16 captions instead)"""


def _print_json(payload: Any, output: str | None) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    if output:
        from ..checkpoint import atomic_write_text  # noqa: PLC0415

        atomic_write_text(output, text)
        print(f"Results written to {output}")
    else:
        print(text)


def cmd_embed(args: argparse.Namespace, extra: list[str]) -> int:
    from .embed import EmbedOptions, embed_collection  # noqa: PLC0415

    opts = EmbedOptions(part_size=args.part_size, batch_size=args.batch_size, workers=args.workers,
                        progress=not args.no_progress)
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    summary = embed_collection(args.source, args.model, args.output, opts, split=args.split, data_root=args.root,
                               backend=args.backend, device=args.device, precision=args.precision)
    if summary["rank"] == 0:
        skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
        print(f"Embedded {summary['rows']} images in {summary['parts']} parts into {summary['output']} "
              f"({summary['images_per_s']} images/s on this process; skipped: {skipped})")
    return 0


def _build_options(args: argparse.Namespace) -> Any:
    from .build import BuildOptions, parse_memory  # noqa: PLC0415

    return BuildOptions(kind=args.kind, memory=parse_memory(args.memory) if args.memory else None,
                        target_recall=args.target_recall, queries=args.queries, seed=args.seed,
                        nlist=args.nlist, pq_m=args.pq_m, hnsw_m=args.hnsw_m, train_on=args.train_on,
                        rerank=args.rerank, rerank_max=args.rerank_max, caption_index=not args.no_caption_index)


def _summary(info: dict[str, Any]) -> str:
    recall = ", ".join(f"{m}->image {info['recall'][m]:.3f}" for m in ("image", "text") if m in info["recall"])
    line = (f"{info['kind']} index ({info['build']['factory']}) of {info['rows']} x {info['dim']}, "
            f"{info['bytes_per_vector']} bytes/vector, search {info['search'] or 'exact'}; "
            + (f"{len(info['removed'])} rows removed, {info['live_rows']} searchable; " if info.get("removed") else "")
            + f"{info['recall']['metric']}: {recall}")
    if info["recall"].get("target_met") is False:
        line += (f" (target {info['recall']['target']} not reached: the widest search gains nothing more; "
                 "a larger --pq-m or --kind hnsw/flat can)")
    t = info.get("threshold")
    if t and t.get("score") is None:
        line += f"; no no-match threshold: {t['reason']}"
    elif t:
        line += f"; no-match threshold {t['score']:.3f} (precision {t['precision']:.3f}, recall {t['recall']:.3f})"
    captions = info.get("captions")
    if captions:
        found = ", ".join(f"{m}->caption {captions['recall'][m]:.3f}" for m in ("text", "image")
                          if m in captions["recall"])
        line += (f"; caption index ({captions['build']['factory']}), search {captions['search'] or 'exact'}: "
                 f"{found}")
    return line


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from . import build, check  # noqa: PLC0415

    if args.index_command == "build":
        info = build.build_index(args.embeddings, args.index, _build_options(args))
        print(_summary(info))
    elif args.index_command == "add":
        had_captions = build.index_has_captions(args.index)
        info = build.add_to_index(args.index, args.embeddings)
        print(_summary(info))
        if had_captions and not build.index_has_captions(args.index):
            print("caption search (--modality text) ended: an added folder was embedded without any caption, and it "
                  "needs caption vectors in every folder of the index")
    elif args.index_command == "sync":
        return _sync(args)
    elif args.index_command == "compact":
        from .compact import compact_index  # noqa: PLC0415

        info = compact_index(args.index, args.part_size)
        if info is None:
            print(f"index {args.index}: nothing to compact (no removed rows, one embedding folder)")
        else:
            done = info["compacted"]
            print(f"index {args.index}: compacted {done['rows']} rows from {done['sources']} embedding folders "
                  f"({done['removed']} removed) into {info['rows']} rows in one; " + _summary(info))
    elif args.index_command == "check":
        report = check.check_index(args.index, seed=args.seed, queries=args.queries)
        _print_json(report, args.output)
        if not report["ok"]:
            print("clipforge: index check failed: re-measured recall below the stored value")
            return 1
    else:
        result = check.find_duplicates(args.index, args.threshold, args.k)
        if args.keep_manifest:
            from .filter import write_manifest  # noqa: PLC0415
            from .index import open_index  # noqa: PLC0415

            index = open_index(args.index)
            kept = check.kept_ids(index.removed.live(), [[m["id"] for m in g] for g in result["groups"]])
            write_manifest(index, kept, None, args.keep_manifest)
            print(f"{len(kept)} of {len(index)} images kept (one per group) in {args.keep_manifest}")
        if args.output:
            _print_json(result, args.output)
        else:
            for n, group in enumerate(result["groups"]):
                print(f"group {n} ({len(group)}): " + "  ".join(f"{g['id']}:{g['key']}" for g in group))
            print(f"{len(result['groups'])} groups of near-duplicates (cosine >= {args.threshold})")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from .sync import sync_index  # noqa: PLC0415

    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    report = sync_index(args.index, args.folder, model=args.model, device=args.device, workers=args.workers,
                        progress=not args.no_progress, dry_run=args.dry_run, measure=True if args.measure else None)
    if args.output:
        _print_json(report, args.output)
    files = (f"{report['folder']}: {report['new']} new, {report['changed']} changed, {report['gone']} gone, "
             f"{report['unchanged']} unchanged files")
    if report["images_after"] == report["images_before"] and not (report["new"] + report["changed"] + report["gone"]):
        print(f"{files}; index {args.index} is up to date ({report['images_before']} images)")
    else:
        verb = "would go" if report["dry_run"] else "went"
        unreadable = f" ({report['unreadable']} unreadable files skipped)" if report.get("unreadable") else ""
        stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in report["seconds"].items())
        print(f"{files}; index {args.index} {verb} from {report['images_before']} to {report['images_after']} "
              f"images{unreadable} ({stages})")
        if report.get("measured") is False:
            print(f"recall and threshold kept from the last measurement ({report['unmeasured_changes']} rows added "
                  "or removed since, under 5% of the index; --measure re-measures now)")
    return 0


def _add_build_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--kind", default="auto", choices=["auto", "flat", "ivfpq", "hnsw"], help="index type")
    q.add_argument("--memory", help="RAM budget for the index, e.g. 4G (auto picks within it; sets PQ code size)")
    q.add_argument("--target-recall", type=float, default=0.95,
                   help="tune nprobe/efSearch to reach this 10-recall@10 on image and text queries (default 0.95)")
    q.add_argument("--queries", type=int, default=500, help="held-out query rows per modality (default 500)")
    q.add_argument("--seed", type=int, default=0, help="seed of the training sample and the held-out queries")
    q.add_argument("--nlist", type=int, help="ivfpq: inverted lists (default ~4 sqrt(rows), a power of 2)")
    q.add_argument("--pq-m", type=int, help="ivfpq: PQ code bytes per vector (a divisor of dim)")
    q.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node (default 32)")
    q.add_argument("--train-on", default="image", choices=["image", "mixed"],
                   help="ivfpq: train the quantisers on image vectors (default; measured better for text queries "
                   "too) or on image + caption vectors")
    q.add_argument("--rerank", type=int, default=4,
                   help="ivfpq: rescore k x RERANK candidates exactly with the stored vectors (0: off; default 4); "
                        "doubled, up to --rerank-max, where no nprobe reaches --target-recall without it")
    q.add_argument("--rerank-max", type=int, default=64,
                   help="ivfpq: the deepest rescoring tuning may choose (default 64; equal to --rerank pins it, "
                        "bounding the rows read per query)")
    q.add_argument("--no-caption-index", action="store_true",
                   help="over a captioned collection, do not build the caption index (text-modality search then "
                   "scans every stored caption vector exactly: no RAM for it, ~12x slower than a flat one)")

def _add_maintenance_parsers(index_sub: argparse._SubParsersAction) -> None:
    q = index_sub.add_parser("sync", help="bring an index in step with a folder: embed new and changed files, "
                             "remove rows of deleted ones")
    q.add_argument("index", help="index folder")
    q.add_argument("folder", help="the image folder (as embedded; rows of other sources are left alone)")
    q.add_argument("--model", help="the model (default: the one index.json records; it must match the index)")
    q.add_argument("--device", help="cpu, cuda or cuda:N")
    q.add_argument("--workers", type=int, default=2, help="loader processes decoding images (default 2)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--dry-run", action="store_true", help="only report what a sync would change")
    q.add_argument("--measure", action="store_true", help="re-measure recall and the no-match threshold now "
                   "(default: once the changes since the last measurement pass 5%% of the rows)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--output", help="write the report as JSON to this file")
    q = index_sub.add_parser("compact", help="rewrite an index without its removed rows, over one embedding folder "
                             "(ids are renumbered)")
    q.add_argument("index", help="index folder")
    q.add_argument("--part-size", type=int, default=100_000, help="rows per part of the new folder (default 100000)")


def add_embed_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `embed` and `index` on the top-level subparsers."""
    p = sub.add_parser("embed", help="embed a collection's images (and captions) into resumable parts",
                       description="Embed images (and captions, when the source has them) into "
                       "img_emb/, text_emb/, metadata/ and manifest.json (clip-retrieval's layout). Rerunning "
                       "the same command resumes; under torchrun the parts are split across ranks.")
    p.add_argument("source", help="an image folder, a .csv/.tsv manifest, tar shards (file, glob, {a..b} range "
                   "or a folder of .tar), or a prepared offline dataset name")
    p.add_argument("--model", required=True, help="a model file, a run directory or an architecture name; with "
                   "--backend onnx/onnx-int8, a folder written by `clipforge export --to onnx [--int8]`")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--split", help="manifest / dataset split to embed (default: all rows)")
    p.add_argument("--root", help="data root of the offline datasets")
    p.add_argument("--part-size", type=int, default=10_000, help="images per part (default 10000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=2, help="loader processes decoding images (default 2)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if there is one)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="compute precision of --backend torch")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                   help="model runtime: torch (default), or ONNX Runtime on the CPU with the export's fp32 graphs "
                   "(onnx) or int8 graphs (onnx-int8); recorded in manifest.json, and an index never mixes them")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser("index", help="build, extend, check a vector index; find near-duplicates",
                       description="Vector indices over `clipforge embed` output (faiss).", epilog=INDEX_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=cmd_index, index_command=None)
    index_sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    q = index_sub.add_parser("build", help="build an index over one or more embedding folders")
    q.add_argument("embeddings", nargs="+", help="embedding folder(s) written by `clipforge embed`")
    q.add_argument("--index", required=True, help="output index folder")
    _add_build_arguments(q)
    q = index_sub.add_parser("add", help="append embedding folders to a built index without rebuilding it")
    q.add_argument("index", help="index folder")
    q.add_argument("embeddings", nargs="+", help="new embedding folder(s), embedded with the same model")
    q = index_sub.add_parser("check", help="verify files and re-measure recall and the no-match threshold")
    q.add_argument("index", help="index folder")
    q.add_argument("--seed", type=int, default=1, help="seed of the fresh held-out sample (default 1)")
    q.add_argument("--queries", type=int, help="held-out queries per modality (default: as built)")
    q.add_argument("--output", help="write the report as JSON to this file")
    q = index_sub.add_parser("duplicates", help="groups of near-duplicate images")
    q.add_argument("index", help="index folder")
    q.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    q.add_argument("--k", type=int, default=10, help="neighbours examined per image (default 10)")
    q.add_argument("--output", help="write the groups as JSON to this file")
    q.add_argument("--keep-manifest", metavar="OUT.csv",
                   help="also write a manifest of the collection without its near-duplicates (each group keeps its "
                   "lowest id): a deduplicated dataset for embed/train/data shards")
    _add_maintenance_parsers(index_sub)
