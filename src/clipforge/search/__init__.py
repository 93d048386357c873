"""Use a CLIP on a collection: embed (resumable parts), index (faiss), and read an index for search.

Nothing heavy is imported here; faiss and pyarrow (the `search` extra) load on first use.
"""

from __future__ import annotations

from .errors import SearchError
from .fingerprint import check_fingerprint, model_fingerprint
from .index import VectorIndex, open_index

__all__ = ["SearchError", "VectorIndex", "open_index", "model_fingerprint", "check_fingerprint"]
