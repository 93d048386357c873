"""Open Clip Art Library 0.18 (Debian `openclipart-png` for images, `openclipart-svg` for the metadata).

Each PNG has an SVG twin whose RDF metadata holds the artist's title, description and keywords. Captions are
built from that human text: the title (or, when the title is a collection's name shared by many drawings, the
file name) with the keywords, and the description as a second caption when it says something else. The
category label is a curated reading of the library's folders (`animals/birds` -> "bird"); drawings outside
those folders stay in the caption set without a label. Left out: links (the same file filed twice) and the
1,375 procedurally generated stars (keyword "magick"): they differ only in parameters, so no caption could
tell them apart. The few huge PNGs (up to 623 megapixels) are rendered again from their SVG at a sane size.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import DatasetError, hash_split
from ..manifest import write_manifest
from ..offline import ensure_debian_package, ensure_svg_rasteriser, rasterise_svgs, split_counts

PNG_PACKAGE, SVG_PACKAGE = "openclipart-png", "openclipart-svg"
PNG_DIR, SVG_DIR = Path("/usr/share/openclipart/png"), Path("/usr/share/openclipart/svg")
MAX_PIXELS = 4_000_000  # larger PNGs (up to 623 megapixels here) are rendered again from their SVG
RASTER_SIZE = 1024
MIN_CLASS_SIZE = 10
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# folder prefix -> category name; the longest matching prefix wins
CATEGORIES = {
    "animals/birds": "bird", "animals/mammals": "mammal", "animals/bugs": "insect", "animals/fish": "fish",
    "animals/dinosaurs": "dinosaur", "food/fruit": "fruit", "food/desserts": "dessert",
    "food/beverages": "drink", "food/breads_and_carbs": "bread or pasta", "food/meats_and_eggs": "meat or egg",
    "food/vegetables": "vegetable",
    "plants/flowers": "flower", "signs_and_symbols/flags": "flag", "signs_and_symbols/map_symbols": "map symbol",
    "signs_and_symbols/clocks": "clock", "signs_and_symbols/weather": "weather symbol",
    "signs_and_symbols/led": "seven-segment digit", "recreation/games/cards": "playing card",
    "recreation/music": "music", "recreation/sports": "sport", "recreation/toys": "toy",
    "recreation/holiday": "holiday", "recreation/party": "party", "recreation/religion": "religious symbol",
    "transportation/roadsigns": "road sign", "transportation/vehicles": "vehicle",
    "transportation/boating": "boat", "tools/weapons": "weapon", "people/clothing": "clothing",
    "people/stickmen": "stick figure", "people/smilies": "smiley face", "people/bodypart": "body part",
    "buildings/homes": "house", "shapes/stars": "star", "shapes/arrows": "arrow",
    "shapes/jigsaw": "jigsaw puzzle piece", "shapes/flowchart": "flowchart symbol",
    "shapes/callouts": "speech bubble", "computer/hardware": "computer hardware",
    "electronics": "electronic component", "geography": "map",
}  # fmt: skip
JUNK_KEYWORDS = {"hash", "magick", "theme", "icons", "unsorted", "mapsym", "lemon_theme_icon", "signs_and_symbols"}
GENERIC_TITLE = re.compile(r"^(clipart by|part of the|various cliparts|untitled)|hash\(", re.IGNORECASE)


@dataclass
class Drawing:
    path: Path  # the PNG
    rel: str  # its path under PNG_DIR, without suffix
    title: str
    description: str
    keywords: list[str]
    creator: str


def _clean(text: str | None) -> str:
    """Whitespace collapsed and HTML entities (left escaped by some exporters) decoded."""
    return " ".join(html.unescape(text or "").split())


def _metadata_root(svg: Path) -> ET.Element:
    """The parsed <metadata> block (cheap: the drawing itself is not parsed unless the block needs it)."""
    data = svg.read_bytes()
    start, end = data.find(b"<metadata"), data.find(b"</metadata>")
    if start >= 0 and end > start:
        block = data[start : end + len(b"</metadata>")]
        declared = b" ".join(b'xmlns:%s="%s"' % (k.encode(), v.encode()) for k, v in NS.items())
        try:
            return ET.fromstring(b"<m " + declared + b">" + block + b"</m>")
        except ET.ParseError:
            pass  # a prefix declared on the <svg> element only: parse the whole file
    try:
        return ET.fromstring(data)
    except ET.ParseError:
        return ET.Element("m")


def read_drawing(png: Path) -> Drawing:
    rel = png.relative_to(PNG_DIR).with_suffix("").as_posix()
    work = _metadata_root(SVG_DIR / f"{rel}.svg").find(".//cc:Work", NS)
    if work is None:
        return Drawing(png, rel, "", "", [], "")
    keywords = [_clean(li.text) for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS) if _clean(li.text)]
    return Drawing(
        png,
        rel,
        _clean(work.findtext("dc:title", default="", namespaces=NS)),
        _clean(work.findtext("dc:description", default="", namespaces=NS)),
        keywords,
        _clean(work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=NS)),
    )


def name_from_file(rel: str) -> str:
    """'food/pizza_4_stagioni_02' -> 'pizza 4 stagioni': separators to spaces, serial numbers ('01') dropped."""
    words = re.split(r"[_\-.\s]+", rel.rsplit("/", 1)[-1])
    while len(words) > 1 and (re.fullmatch(r"0\d+", words[-1]) or not words[-1]):
        words.pop()
    return " ".join(w for w in words if w)


def keywords_of(drawing: Drawing) -> list[str]:
    """Keywords without tooling noise, the author's name and repeats, underscores read as spaces."""
    creator = drawing.creator.lower()
    out: list[str] = []
    for keyword in drawing.keywords:
        word = keyword.lower()
        if word in JUNK_KEYWORDS or "theme" in word or word.startswith("hash(") or (creator and creator in word):
            continue
        word = word.replace("_", " ")
        if word not in out:
            out.append(word)
    return out


def captions_of(drawing: Drawing, shared_titles: Counter, shared_descriptions: Counter) -> list[str]:
    """One caption from title and keywords, plus the description when it is specific to this drawing."""
    title = drawing.title
    if not title or GENERIC_TITLE.search(title) or shared_titles[title] >= 3:
        title = name_from_file(drawing.rel)
    keywords = [k for k in keywords_of(drawing) if k != title.lower()]
    captions = [f"{title} ({', '.join(keywords)})" if keywords else title]
    description = drawing.description
    if (
        len(description) >= 3
        and description.lower() != drawing.title.lower()
        and shared_descriptions[description] < 3
        and not GENERIC_TITLE.search(description)
    ):
        captions.append(description)
    return captions


def category_of(rel: str) -> str | None:
    folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
    matches = [p for p in CATEGORIES if folder == p or folder.startswith(p + "/")]
    return CATEGORIES[max(matches, key=len)] if matches else None


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without Pillow's decompression-bomb refusal."""
    with path.open("rb") as handle:
        head = handle.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def collect(dest: Path, install: bool) -> tuple[list[Drawing], dict[str, int]]:
    """The drawings kept, and counts of those left out by reason. A PNG over MAX_PIXELS is replaced by a
    rendering of its SVG (longest side RASTER_SIZE) under `dest/images`: decoding it would cost seconds."""
    dropped = Counter()
    drawings, to_render = [], []
    for png in sorted(PNG_DIR.rglob("*.png")):
        if png.is_symlink():
            dropped["link to a drawing filed elsewhere"] += 1
            continue
        drawing = read_drawing(png)
        if "magick" in (k.lower() for k in drawing.keywords):
            dropped["generated star (keyword magick)"] += 1
            continue
        width, height = png_size(png)
        if width * height > MAX_PIXELS:
            drawing.path = dest / "images" / f"{drawing.rel}.png"
            if not drawing.path.is_file():
                to_render.append((SVG_DIR / f"{drawing.rel}.svg", drawing.path))
        drawings.append(drawing)
    if to_render:
        ensure_svg_rasteriser(install)
        rasterise_svgs(to_render, RASTER_SIZE)
    return drawings, dict(dropped)


def prepare(dest: Path, install: bool = True) -> dict[str, Any]:
    ensure_debian_package(PNG_PACKAGE, PNG_DIR, install)
    ensure_debian_package(SVG_PACKAGE, SVG_DIR, install)
    drawings, dropped = collect(dest, install)
    titles = Counter(d.title for d in drawings)
    descriptions = Counter(d.description for d in drawings)
    categories = Counter(category_of(d.rel) for d in drawings)
    classnames = sorted(c for c, n in categories.items() if c is not None and n >= MIN_CLASS_SIZE)
    rows, splits, n_captions = [], [], 0
    for drawing in drawings:
        split = hash_split(drawing.rel)
        category = category_of(drawing.rel)
        label = category if category in classnames else ""
        for caption in captions_of(drawing, titles, descriptions):
            rows.append((str(drawing.path), caption, split, label))
            n_captions += 1
        splits.append(split)
    write_manifest(dest / "manifest.tsv", rows)
    return {
        "kind": "captions",
        "source": f"Debian packages {PNG_PACKAGE} + {SVG_PACKAGE} ({PNG_DIR.parent})",
        "images": len(drawings),
        "captions": n_captions,
        "labelled_images": sum(categories[c] for c in classnames),
        "splits": split_counts(splits),
        "classnames": classnames,
        "rendered_from_svg": sum(1 for d in drawings if d.path.is_relative_to(dest)),
        "left_out": dropped,
        "source_bytes": sum(d.path.stat().st_size for d in drawings if d.path.is_relative_to(PNG_DIR)),
    }
