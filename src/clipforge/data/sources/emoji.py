"""Google's Noto emoji as packaged by npm `emoji-datasource-google` (images Apache-2.0, data MIT).

`emoji.json` names each emoji (its Unicode name), its short names, category and skin-tone variants; the
images are 64x64 PNGs. Captions: the lower-cased Unicode name, plus the short names that add words to it;
a skin-tone variant gets its base name with the tone. The label is the emoji's Unicode category. Variants
share their base emoji's split, so no test emoji has a sibling in training.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..base import DatasetError, hash_split
from ..manifest import write_manifest
from ..offline import ensure_npm_package, split_counts

PACKAGE, VERSION = "emoji-datasource-google", "16.0.0"
CATEGORIES = {
    "Smileys & Emotion": "smiley or emotion", "People & Body": "person or body part",
    "Animals & Nature": "animal or nature", "Food & Drink": "food or drink", "Travel & Places": "travel or place",
    "Activities": "activity", "Objects": "object", "Symbols": "symbol", "Flags": "flag",
}  # fmt: skip  ("Component", the bare skin-tone swatches, gets no label)
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def package_dir(dest: Path) -> Path:
    return dest / "npm" / "node_modules" / PACKAGE


def tone_phrase(key: str) -> str:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light and dark skin tones'."""
    tones = [SKIN_TONES.get(code.upper()) for code in key.split("-")]
    if None in tones:
        raise DatasetError(f"{PACKAGE}: unknown skin-tone key '{key}'")
    if len(set(tones)) == 1:
        return f"{tones[0]} skin tone"
    return f"{' and '.join(tones)} skin tones"  # type: ignore[arg-type]


def base_captions(entry: dict[str, Any]) -> list[str]:
    name = " ".join(str(entry.get("name") or entry["short_name"]).lower().split())
    captions = [name]
    for short in entry.get("short_names", []):
        text = short.replace("_", " ").replace("-", " ")
        if any(word not in name.split() for word in text.split()) and not short.startswith("flag-"):
            if text not in captions and len(text) > 2:
                captions.append(text)
    return captions


def rows_of(entry: dict[str, Any], image_dir: Path) -> list[tuple[str, list[str], str]]:
    """(image path, captions, group key) for an emoji and its skin-tone variants that have a Google image."""
    out = []
    group = entry["unified"]
    if entry.get("has_img_google"):
        out.append((str(image_dir / entry["image"]), base_captions(entry), group))
    name = base_captions(entry)[0]
    for key, variant in sorted(entry.get("skin_variations", {}).items()):
        if variant.get("has_img_google"):
            out.append((str(image_dir / variant["image"]), [f"{name}, {tone_phrase(key)}"], group))
    return out


def prepare(dest: Path, install: bool = True) -> dict[str, Any]:
    pkg = package_dir(dest)
    ensure_npm_package(f"{PACKAGE}@{VERSION}", dest / "npm", pkg / "emoji.json", install)
    entries = json.loads((pkg / "emoji.json").read_text(encoding="utf-8"))
    image_dir = pkg / "img" / "google" / "64"
    classnames = sorted(set(CATEGORIES.values()))
    rows, splits, labels, missing = [], [], Counter(), 0
    for entry in entries:
        label = CATEGORIES.get(entry.get("category", ""), "")
        for image, captions, group in rows_of(entry, image_dir):
            if not Path(image).is_file():
                missing += 1
                continue
            split = hash_split(group)
            rows.extend((image, caption, split, label) for caption in captions)
            splits.append(split)
            labels[label] += 1
    if missing:
        raise DatasetError(f"{pkg}: {missing} images listed in emoji.json are missing from {image_dir}")
    write_manifest(dest / "manifest.tsv", rows)
    return {
        "kind": "captions",
        "source": f"npm package {PACKAGE}@{VERSION} (installed under {dest / 'npm'})",
        "images": len(splits),
        "captions": len(rows),
        "labelled_images": sum(n for c, n in labels.items() if c),
        "splits": split_counts(splits),
        "classnames": classnames,
        "source_bytes": sum(Path(r[0]).stat().st_size for r in {r[0]: r for r in rows}.values()),
    }
