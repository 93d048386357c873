"""Use a CLIP on a collection: embed (resumable parts), index (faiss), and read an index for search.

Imported lazily, so that `clipforge --help` does not load torch; faiss and pyarrow (the `search` extra) load
on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SearchError": "clipforge.search.errors",
    "VectorIndex": "clipforge.search.index",
    "open_index": "clipforge.search.index",
    "model_fingerprint": "clipforge.search.fingerprint",
    "check_fingerprint": "clipforge.search.fingerprint",
}

__all__ = ["SearchError", "VectorIndex", "check_fingerprint", "model_fingerprint", "open_index"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipforge.search' has no attribute {name!r}")
