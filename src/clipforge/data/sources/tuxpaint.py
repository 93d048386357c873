"""Tux Paint's default stamps (Debian `tuxpaint-stamps-default`, GPL: used in place, never shipped).

Each stamp is a PNG or SVG drawing with a `.txt` file: an English caption on the first line, then
`<lang>.utf8=<caption>` lines in about 75 languages. The category label is the stamp's top folder (animals,
food, vehicles...). SVG-only stamps are rasterised once with `rsvg-convert` (Debian `librsvg2-bin`) into the
data root. `manifest.tsv` holds the English captions; `manifest.<lang>.tsv` holds language `<lang>` for the
stamps translated into it (an untranslated stamp is left out rather than given English text).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import DatasetError, hash_split
from ..manifest import write_manifest
from ..offline import ensure_debian_package, ensure_svg_rasteriser, rasterise_svgs, split_counts

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
RASTER_SIZE = 400  # longest side of rasterised SVG stamps, as large as most PNG stamps
MIN_CLASS_SIZE = 10
CATEGORIES = {
    "animals": "animal", "clothes": "clothing", "food": "food", "hobbies": "hobby",
    "household": "household object", "medical": "medical supply", "military": "military equipment",
    "naturalforces": "force of nature", "people": "person or body part", "plants": "plant",
    "seasonal": "holiday decoration", "space": "space object", "sports": "sports equipment",
    "symbols": "symbol", "town": "town building or sign", "vehicles": "vehicle",
}  # fmt: skip
LANG_LINE = re.compile(r"^([A-Za-z_@]+)\.utf8=(.*)$")


@dataclass
class Stamp:
    rel: str  # path under STAMPS_DIR without suffix, e.g. "animals/birds/swallow"
    image: Path
    captions: dict[str, str]  # language -> caption; "en" is the untagged first line


def read_captions(path: Path) -> dict[str, str]:
    """A stamp's .txt: the untagged line is English, `xx.utf8=text` lines are translations."""
    captions: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        match = LANG_LINE.match(line)
        if match:
            text = " ".join(match.group(2).split())
            if text:
                captions[match.group(1)] = text
        elif line and "en" not in captions:
            captions["en"] = " ".join(line.split())
    if "en" not in captions:
        raise DatasetError(f"{path}: no English caption (an untagged first line was expected)")
    return captions


def collect(dest: Path) -> tuple[list[Stamp], dict[str, int]]:
    """Every stamp with a caption file and a drawing; SVG-only drawings rasterised under `dest/images`."""
    stamps, dropped, to_rasterise = [], Counter(), []
    for txt in sorted(STAMPS_DIR.rglob("*.txt")):
        rel = txt.relative_to(STAMPS_DIR).with_suffix("").as_posix()
        png, svg = txt.with_suffix(".png"), txt.with_suffix(".svg")
        if png.is_file():
            image = png
        elif svg.is_file():
            image = dest / "images" / f"{rel}.png"
            if not image.is_file():
                to_rasterise.append((svg, image))
        else:
            dropped["caption without a drawing"] += 1
            continue
        stamps.append(Stamp(rel, image, read_captions(txt)))
    rasterise_svgs(to_rasterise, RASTER_SIZE)
    return stamps, dict(dropped)


def prepare(dest: Path, install: bool = True) -> dict[str, Any]:
    ensure_debian_package(PACKAGE, STAMPS_DIR, install)
    ensure_svg_rasteriser(install)
    stamps, dropped = collect(dest)
    categories = Counter(CATEGORIES.get(s.rel.split("/")[0]) for s in stamps)
    classnames = sorted(c for c, n in categories.items() if c is not None and n >= MIN_CLASS_SIZE)
    splits = {s.rel: hash_split(s.rel) for s in stamps}
    languages = Counter(lang for s in stamps for lang in s.captions)
    for old in dest.glob("manifest*.tsv"):
        old.unlink()
    for lang in languages:
        name = "manifest.tsv" if lang == "en" else f"manifest.{lang}.tsv"
        rows = []
        for stamp in stamps:
            if lang in stamp.captions:
                category = CATEGORIES.get(stamp.rel.split("/")[0])
                label = category if category in classnames else ""
                rows.append((str(stamp.image), stamp.captions[lang], splits[stamp.rel], label))
        write_manifest(dest / name, rows)
    return {
        "kind": "captions",
        "source": f"Debian package {PACKAGE} ({STAMPS_DIR})",
        "images": len(stamps),
        "captions": len(stamps),
        "rasterised_svg": sum(1 for s in stamps if not s.image.is_relative_to(STAMPS_DIR)),
        "labelled_images": sum(categories[c] for c in classnames),
        "splits": split_counts(list(splits.values())),
        "classnames": classnames,
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "left_out": dropped,
        "source_bytes": sum(s.image.stat().st_size for s in stamps if s.image.is_relative_to(STAMPS_DIR)),
    }
