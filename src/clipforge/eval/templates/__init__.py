"""Prompt templates as data files: one template per line, `{}` standing for the class name.

`imagenet.txt` holds the 80 ImageNet templates of the CLIP paper (Radford et al. 2021) and
`imagenet-simple.txt` the 7 chosen among them; the other files are written for the offline datasets.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

ALIASES = {"drawings": "openclipart", "clipart": "openclipart", "stamps": "tuxpaint", "fashion_mnist": "fashion-mnist"}


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file and the line."""


def available_templates() -> list[str]:
    """The names of the template sets shipped with clipforge."""
    files = resources.files(__package__).iterdir()
    return sorted(Path(f.name).stem for f in files if f.name.endswith((".txt", ".json")))


def _parse(text: str, source: str, is_json: bool) -> list[str]:
    if is_json:
        data = json.loads(text)
        templates = data.get("templates") if isinstance(data, dict) else data
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise TemplateError(f"{source}: expected a JSON list of strings or {{\"templates\": [...]}}")
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not templates:
        raise TemplateError(f"{source}: no templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise TemplateError(f"{source}: template {number} '{template}' must contain exactly one '{{}}'")
    return templates


def load_templates(name: str) -> list[str]:
    """The templates named `name` (a shipped set, e.g. 'imagenet', 'emoji') or read from a .txt/.json path."""
    path = Path(name)
    if path.suffix in (".txt", ".json") and path.is_file():
        return _parse(path.read_text(encoding="utf-8"), str(path), path.suffix == ".json")
    key = ALIASES.get(name, name)
    for suffix in (".txt", ".json"):
        entry = resources.files(__package__).joinpath(key + suffix)
        if entry.is_file():
            return _parse(entry.read_text(encoding="utf-8"), f"templates/{key}{suffix}", suffix == ".json")
    raise TemplateError(f"no template set '{name}' (known: {', '.join(available_templates())})")
