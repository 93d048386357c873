"""What every command module shares: the user-error exception and the `--output FILE.json` writer (kept apart
from `cli` so that command modules such as `search.cli_search` need not import the dispatcher)."""

from __future__ import annotations

import json


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def write_json(path: str | None, payload: dict) -> None:
    """Write `payload` atomically to `path` (if given) and say so."""
    if path:
        from .checkpoint import atomic_write_text  # noqa: PLC0415 - pulls in torch

        atomic_write_text(path, json.dumps(payload, indent=2))
        print(f"Results written to {path}")
