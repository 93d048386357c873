"""`clipforge search` and `clipforge serve`: argument parsing and printing; the work is in Searcher / server."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEARCH_EPILOG = """query language:
  TERM [(+|-) TERM]...   each TERM a text, an image file or #ID (an image of the index), optionally WEIGHT:TERM
  clipforge search runs/idx "a red circle"
  clipforge search runs/idx "beach" + photo.jpg - "people"
  clipforge search runs/idx "2:golden retriever" - 0.5:grass -k 20 --output hits.json
  clipforge search runs/idx "a red circle" --dedup 0.95   # near-duplicates listed under a better hit
  clipforge search runs/idx "beach + #42 - #17"            # images of the index by id: like 42, unlike 17
  clipforge search runs/idx "beach" --under 2019/summer    # only the images under one folder (keys or a path)
  clipforge search runs/idx --queries queries.txt --output hits.jsonl   # one query per line, batched
The query vector is the weighted sum of the terms' normalised embeddings, normalised again."""

FILTER_EPILOG = """examples:
  clipforge filter runs/idx "a photo of a cat" --manifest cats.csv            # cut at the index's threshold
  clipforge filter runs/idx "a red circle" --min-score 0.3 --copy-to red/      # copy the matches out
  clipforge filter runs/idx --image query.jpg --min-score 0.9 --limit 500 --manifest similar.csv
  clipforge filter runs/idx "a photo of a cat" --shards cat-shards/              # WebDataset shards for train"""


def add_search_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `search`, `filter` and `serve` (argparse wiring only: nothing heavy is imported here)."""
    _add_search(sub)
    _add_filter(sub)
    _add_serve(sub)


def _query_options(p: argparse.ArgumentParser) -> None:
    """The query terms of `search` and `filter`: words, --image files, --embedding vectors."""
    p.add_argument("index", help="index directory")
    p.add_argument("query", nargs="*", help="query terms (the query language: see `clipforge search --help`)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="add an image to the query")
    p.add_argument("--embedding", action="append", default=[], metavar="F.npy",
                   help="add a query vector saved by numpy.save (one vector, computed by the index's model)")
    p.add_argument("--under", action="append", metavar="FOLDER",
                   help="only images under this folder (repeatable): a directory on this machine (its files' "
                   "paths), or a folder of the collection's keys such as 2019/summer")


def _model_options(p: argparse.ArgumentParser, each: str = "the index") -> None:
    p.add_argument("--model", help="the model to embed queries with (default: the one recorded in index.json)")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"],
                   help=f"the runtime to embed queries with (default, and the only one accepted: the one {each} "
                   "was embedded with, recorded in index.json)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one, else the CPU)")


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index by text, image, or a weighted mix",
                       description="Search an index built by `clipforge index build`.", epilog=SEARCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _query_options(p)
    p.add_argument("--queries", metavar="FILE",
                   help="many queries, one per line in the query language ('-': standard input): embedded in "
                   "batches and searched at once; answers go to --output (.jsonl, or .csv: one row per result) or "
                   "as JSON lines to standard output")
    p.add_argument("-k", type=int, default=10, help="results to show (default: 10)")
    p.add_argument("--modality", choices=["image", "text"], default="image",
                   help="match the query against the images' embeddings (default) or their captions' ('text': "
                   "the stored caption embeddings, through the index's caption index or an exact scan: "
                   "clip-retrieval's text modality)")
    p.add_argument("--dedup", type=float, metavar="COSINE",
                   help="collapse near-duplicates: a result within this cosine of a better one is counted under it "
                   "instead of taking a place in the top k (0.95 is `index duplicates`' default)")
    _model_options(p)
    p.add_argument("--output", metavar="F.json", help="write the answer as JSON to this file (with --queries: "
                   "F.jsonl or F.csv)")
    p.set_defaults(handler=cmd_search, terms_after_options=True)


def _add_filter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="every image a query matches above a score, as a manifest or a folder",
                       description="Write every image of an index whose score against the query is at least "
                       "--min-score (an exact scan of the stored embeddings, whatever the index kind), best first, "
                       "as a manifest CSV that embed/train/data shards read, or copied into a folder with caption "
                       "sidecars.", epilog=FILTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _query_options(p)
    p.add_argument("--min-score", type=float, metavar="COSINE",
                   help="keep images scoring at least this (default, for text queries: the index's calibrated "
                   "no-good-match threshold)")
    p.add_argument("--limit", type=int, metavar="N", help="keep at most the N best (default: all that pass)")
    p.add_argument("--manifest", metavar="OUT.csv", help="write image,caption,score,id,key rows (absolute paths)")
    p.add_argument("--copy-to", metavar="DIR", help="copy the images (tar shard members too) into a new folder, "
                   "with .txt captions and manifest.csv")
    _model_options(p)
    p.add_argument("--shards", metavar="DIR", help="write the matches with their captions as WebDataset tar shards "
                   "(img2dataset's layout; `train` and `embed` read them) into a new folder")
    p.add_argument("--per-shard", type=int, default=1000, metavar="N", help="samples per shard of --shards (1000)")
    p.add_argument("--output", metavar="F.json", help="write a summary (query, threshold, counts, score range)")
    p.set_defaults(handler=cmd_filter, terms_after_options=True)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve one or more indices: HTTP JSON API and a search page",
                       description="Serve indices over HTTP: the search page at / and the JSON API under "
                       "/api (see README, 'Search a collection'). Several indices are chosen by name (index=NAME "
                       "in the API, a menu on the page); the first is the default. Indices embedded by the same "
                       "model load it once.")
    p.add_argument("index", nargs="+", metavar="[NAME=]INDEX",
                   help="index directory, optionally named (default name: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MB (default: 10)")
    _model_options(p, each="each index")
    p.add_argument("--templates", help="prompt templates for /api/classify: a shipped set or a .txt file "
                   "(default: 'a photo of {}.' and three others)")
    p.add_argument("--dedup", type=float, default=0.95, metavar="COSINE",
                   help="the cosine of the page's 'hide near-duplicates' toggle (default: 0.95; API requests give "
                   "their own dedup=)")
    p.add_argument("--reload-interval", type=float, default=2.0, metavar="SECONDS",
                   help="look this often for an index changed by `index add` / `index sync` and serve the new one "
                   "(default: 2; 0: never)")
    p.set_defaults(handler=cmd_serve)


def _searcher(args: argparse.Namespace) -> Any:
    from .searcher import Searcher

    return Searcher(args.index, model=args.model, device=args.device, backend=args.backend)


def format_table(answer: dict[str, Any], width: int | None = None) -> str:
    """rank, score, key, caption, path as aligned columns, long cells cut to fit the terminal."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    dedup = "dedup" in answer
    rows = [(str(n), f"{h['score']:.4f}" + (f" +{len(h['duplicates'])}" if dedup and h["duplicates"] else ""),
             str(h["key"] or ""), str(h["caption"] or ""), str(h["path"] or ""))
            for n, h in enumerate(answer["results"], 1)]
    header = ("rank", "score +dups" if dedup else "score", "key", "caption", "path")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    spare = max(20, width - sum(widths[:3]) - 8)
    widths[3] = min(widths[3], spare // 2)
    widths[4] = min(widths[4], spare - widths[3])

    def cut(text: str, size: int) -> str:
        return text if len(text) <= size else text[: max(0, size - 1)] + "…"

    lines = ["  ".join(cut(c, w).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def no_match_line(answer: dict[str, Any]) -> str | None:
    if not answer["no_good_match"]:
        return None
    best = answer["results"][0]["score"] if answer["results"] else float("nan")
    return (f"No good match: the best score {best:.4f} is under this index's threshold {answer['threshold']:.4f}; "
            "the closest images are listed anyway.")


def cmd_search(args: argparse.Namespace, extra: list[str]) -> int:
    from ..cli_common import UserError
    from ..cli_common import write_json as _write_json
    from .errors import SearchError

    if args.dedup is not None:
        from .dedup import check_threshold

        try:
            check_threshold(args.dedup, "--dedup")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if args.k < 1:
        raise UserError(f"-k: expected a positive integer, got {args.k}")
    if args.queries is not None:
        return _search_many(args, extra)
    try:
        terms = _query_terms("search", args, extra)
        searcher = _searcher(args)
        under = cli_under(args.under)
        answer = searcher.search_terms(terms, args.k, args.dedup, modality=args.modality, under=under)
        scope = searcher.index.scope(under)
    except SearchError as exc:
        raise UserError(str(exc)) from None
    against = "  matched against the images' captions" if args.modality == "text" else ""
    among = f"{len(scope)} of {len(searcher)} images, under {', '.join(scope.folders)}" if scope else \
        f"{len(searcher)} images"
    print(f"Query: {' '.join(t.describe() for t in terms)}  ({among}){against}")
    print(format_table(answer))
    if "dedup" in answer:
        print(f"{answer['hidden']} near-duplicates (cosine >= {answer['dedup']:g} to a better result) hidden; "
              "+N after a score counts those under it (ids in --output)")
    notice = no_match_line(answer)
    if notice:
        print(notice)
    payload = {"query": [t.describe() for t in terms], **answer}
    _write_json(args.output, json.loads(json.dumps(payload, default=str)))
    return 0


def _search_many(args: argparse.Namespace, extra: list[str]) -> int:
    """`search --queries FILE`: every line's answer as a JSON line or CSV rows; status 1 if any query failed."""
    import sys
    import time

    from ..checkpoint import atomic_write_text
    from ..cli_common import UserError
    from .batch import batch_records, format_records, output_kind, read_queries
    from .errors import SearchError

    if args.query or extra or args.image or args.embedding:
        raise UserError("search: --queries FILE takes the queries from the file; give no query words, --image or "
                        "--embedding")
    kind = output_kind(args.output) if args.output else "jsonl"
    try:
        lines = read_queries(args.queries)
        searcher = _searcher(args)
        started = time.perf_counter()
        answers = searcher.search_batch([text for _, text in lines], args.k, args.dedup, allow_paths=True,
                                        modality=args.modality, under=cli_under(args.under))
        seconds = time.perf_counter() - started
    except SearchError as exc:
        raise UserError(str(exc)) from None
    text = format_records(batch_records(lines, answers), kind)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    failed = [(n, a["error"]) for (n, _), a in zip(lines, answers) if "error" in a]
    where = f" into {args.output}" if args.output else ""
    print(f"{len(lines) - len(failed)} of {len(lines)} queries answered ({len(searcher)} images, k={args.k}) "
          f"in {seconds:.2f} s{where}", file=sys.stderr)
    for n, error in failed[:5]:
        print(f"  line {n}: {error}", file=sys.stderr)
    if len(failed) > 5:
        print(f"  … and {len(failed) - 5} more failed (their errors are in the output)", file=sys.stderr)
    return 1 if failed else 0


def _query_terms(command: str, args: argparse.Namespace, extra: list[str]) -> list[Any]:
    """The parsed query of `search`/`filter`: its words (also those after an option), --image files and
    --embedding vectors."""
    from ..cli_common import UserError
    from .query import QueryTerm, parse_query

    unknown = [a for a in extra if a.startswith("--")]
    if unknown:
        raise UserError(f"{command}: unrecognised option {unknown[0]} (see clipforge {command} --help)")
    query: Sequence[str] = [*args.query, *extra]  # terms after an option reach here as `extra`
    if not query and not args.image and not args.embedding:
        raise UserError(f"{command}: give a query text, an image (--image PATH), an embedding (--embedding F.npy), "
                        "or a mix of them")
    return ((parse_query(query) if query else []) + [QueryTerm("image", path) for path in args.image]
            + [_embedding_file(path) for path in args.embedding])


def cli_under(values: Sequence[str] | None) -> list[str] | None:
    """--under values as the Searcher takes them: a directory that exists here becomes its resolved absolute
    path (matched against the files' paths); anything else is a folder of keys."""
    import os

    if not values:
        return None
    return [str(Path(v).resolve()) if os.path.isdir(v) else v for v in values]


def _embedding_file(path: str) -> Any:
    """The query term of a vector saved by numpy.save (never unpickled)."""
    import numpy as np

    from .errors import SearchError
    from .query import embedding_term

    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SearchError(f"--embedding {path}: not a readable .npy array ({exc})") from None
    return embedding_term(value.reshape(-1) if value.ndim == 2 and value.shape[0] == 1 else value,
                          name=f"--embedding {path}")


def cmd_filter(args: argparse.Namespace, extra: list[str]) -> int:
    from ..cli_common import UserError
    from ..cli_common import write_json as _write_json
    from .errors import SearchError
    from .filter import copy_matches, matching, shard_matches, write_manifest

    if not args.manifest and not args.copy_to and not args.shards:
        raise UserError("filter: say where the matches go: --manifest OUT.csv, --copy-to DIR and/or --shards DIR")
    if args.per_shard < 1:
        raise UserError(f"--per-shard: expected a positive integer, got {args.per_shard}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: expected a positive integer, got {args.limit}")
    if args.min_score is not None and not -1 <= args.min_score <= 1:
        raise UserError(f"--min-score: expected a cosine similarity in [-1, 1], got {args.min_score:g}")
    try:
        terms = _query_terms("filter", args, extra)
        searcher = _searcher(args)
        cut = searcher.filter_score(terms, args.min_score)
        scope = searcher.index.scope(cli_under(args.under))
        ids, scores = matching(searcher.index, searcher.query_vector(terms), cut, args.limit, scope)
        summary: dict[str, Any] = {"query": [t.describe() for t in terms], "min_score": cut, "matches": len(ids),
                                   "of": len(scope) if scope else len(searcher), "scores": [float(scores[0]),
                                   float(scores[-1])] if len(ids) else None}
        if scope:
            summary["under"] = list(scope.folders)
        if args.manifest:
            summary["manifest"] = str(write_manifest(searcher.index, ids, scores, args.manifest))
        if args.copy_to:
            summary.update(copy_matches(searcher.index, ids, scores, args.copy_to), copy_to=args.copy_to)
        if args.shards:
            summary["shards"] = {**shard_matches(searcher.index, ids, args.shards, args.per_shard),
                                 "folder": args.shards}
    except SearchError as exc:
        raise UserError(str(exc).replace("min_score:", "--min-score:", 1)) from None
    source = "" if args.min_score is not None else " (the index's no-good-match threshold)"
    print(f"Query: {' '.join(summary['query'])}: {len(ids)} of {summary['of']} images score >= {cut:.4f}{source}"
          + (f", best {scores[0]:.4f}, last {scores[-1]:.4f}" if len(ids) else ""))
    if args.manifest:
        print(f"Manifest: {summary['manifest']}")
    if args.copy_to:
        print(f"Copied {summary['copied']} images to {args.copy_to}/ (with manifest.csv)")
        for bad in summary["unreadable"][:5]:
            print(f"  not copied: {bad['error']}")
        if len(summary["unreadable"]) > 5:
            print(f"  … and {len(summary['unreadable']) - 5} more not copied (see --output)")
    if args.shards:
        done = summary["shards"]
        print(f"Wrote {done['sharded']} image-caption pairs in {done['shards']} tar shards to {args.shards}/"
              + (f" ({len(done['unreadable'])} left out: no caption or unreadable; see --output)"
                 if done["unreadable"] else ""))
    _write_json(args.output, summary)
    return 0


def index_names(specs: list[str]) -> dict[str, str]:
    """{name: index directory} of `[NAME=]INDEX` arguments, in order; names default to the directory's name."""
    from ..cli_common import UserError
    from .server import check_index_name

    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/\\")).name or "index", spec
        try:
            check_index_name(name)
        except ValueError as exc:
            hint = "" if sep else f" (name it: NAME={spec})"
            raise UserError(f"{spec}: {exc}{hint}") from None
        if not path:
            raise UserError(f"{spec}: expected NAME=INDEX_DIRECTORY, the directory is missing")
        if name in named:
            raise UserError(f"{spec}: the name {name!r} is given twice (name them apart: NAME=INDEX)")
        named[name] = path
    return named


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from ..cli_common import UserError
    from .errors import SearchError
    from .searcher import DEFAULT_LABEL_TEMPLATES
    from .server import serve

    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UserError(f"--max-upload-mb: expected a positive number, got {args.max_upload_mb}")
    if not args.reload_interval >= 0:
        raise UserError(f"--reload-interval: expected seconds >= 0 (0: never), got {args.reload_interval}")
    from .dedup import check_threshold

    try:
        check_threshold(args.dedup, "--dedup")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    templates = DEFAULT_LABEL_TEMPLATES
    if args.templates:
        from ..eval.templates import load_templates

        templates = tuple(load_templates(args.templates))
    from .searcher import open_searchers

    named = index_names(args.index)
    try:
        searchers = open_searchers(named, model=args.model, device=args.device, backend=args.backend)
    except SearchError as exc:
        raise UserError(str(exc)) from None
    try:
        serve(searchers, args.host, args.port, args.max_upload_mb, templates, args.dedup, args.reload_interval)
    except SearchError as exc:
        raise UserError(str(exc)) from None
    return 0
