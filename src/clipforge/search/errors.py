"""The one error type of the search side: bad input reported as one line (CLI) or a 4xx answer (server)."""

from __future__ import annotations

__all__ = ["SearchError", "require"]


class SearchError(ValueError):
    """A missing, corrupt, truncated or mismatched embedding part, index or query."""


def require(module: str) -> object:
    """Import an optional dependency of the search extra, or stop with one line naming the extra."""
    from importlib import import_module  # noqa: PLC0415

    try:
        return import_module(module)
    except ImportError as exc:
        raise SearchError(
            f"{module} is not installed; install the search extra: pip install -e \".[search]\""
        ) from exc
