"""clipforge: train, evaluate and use CLIP-style contrastive image-text models.

The public API is imported lazily so that `import clipforge` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "list_models": "clipforge.registry",
    "get_model_config": "clipforge.registry",
    "create_model": "clipforge.factory",
    "create_model_and_transforms": "clipforge.factory",
    "load_model": "clipforge.convert",
    "get_tokenizer": "clipforge.tokenizer",
    "tokenize": "clipforge.tokenizer",
    "CLIP": "clipforge.models.clip",
    "ModelConfig": "clipforge.models.config",
    "ConfigError": "clipforge.config",
    "load_head": "clipforge.adapt.head",
    "LinearHead": "clipforge.adapt.head",
    "Searcher": "clipforge.search.searcher",
    "open_searchers": "clipforge.search.searcher",
    "SearchClient": "clipforge.search.client",
}

__all__ = sorted(_EXPORTS) + ["losses", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in {"losses", "models", "data", "eval", "train"}:
        return import_module(f"clipforge.{name}")
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
