"""Summarize `clipforge demo --output seedN.json` results over seeds: per-seed values, mean ± sample std.

    python scripts/demo_seeds.py demo-seed0.json demo-seed1.json demo-seed2.json

prints README's demo table (Markdown, percentages). Reads only the JSON files it is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROWS = (
    ("zero-shot top-1, seen combinations", "zeroshot_seen_top1"),
    ("zero-shot top-1, held-out combinations", "zeroshot_heldout_top1"),
    ("zero-shot top-5, held-out combinations", "zeroshot_heldout_top5"),
    ("retrieval image → text R@1", "retrieval_i2t_r1"),
    ("retrieval text → image R@1", "retrieval_t2i_r1"),
)


def summary_table(results: list[dict], labels: list[str]) -> str:
    """One row per metric (template ensemble and, for zero-shot, the single template): seeds, then mean ± std."""
    head = "| metric | " + " | ".join(labels) + " | mean ± std |"
    lines = [head, "|---|" + "---:|" * (len(labels) + 1)]
    for label, key in ROWS:
        variants = [(label + " (ensemble)", key), (label + " (single template)", key + "_single_template")] \
            if key.startswith("zeroshot") else [(label, key)]
        for name, k in variants:
            values = [100 * r[k] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells = " | ".join(f"{v:.1f}%" for v in values)
            lines.append(f"| {name} | {cells} | {statistics.fmean(values):.1f} ± {spread:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by `clipforge demo --output`")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            print(f"error: {path}: not a readable demo result ({err})", file=sys.stderr)
            return 2
        missing = [k for _, k in ROWS if k not in results[-1]]
        if missing:
            print(f"error: {path}: no key '{missing[0]}' (expected the output of `clipforge demo --output`)",
                  file=sys.stderr)
            return 2
    print(summary_table(results, [p.stem for p in args.results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
