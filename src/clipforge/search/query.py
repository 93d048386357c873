"""Queries as weighted sums of text and image embeddings, and the parsing of the query language.

A query is a list of terms, each a text or an image with a signed weight. Its vector is the weighted sum of
the terms' L2-normalised embeddings, normalised again (so `"beach" + photo.jpg - "people"` points between the
beach text and the photo, away from people). On the command line:

    clipforge search INDEX "beach" + photo.jpg - "people"      # operators as separate arguments
    clipforge search INDEX "beach + 2:photo.jpg - people"       # or inside one quoted string
    clipforge search INDEX "2:golden retriever" - 0.5:grass     # WEIGHT:TERM scales a term

A term is an image when it names an image file (an image suffix, or any existing file), and `#42` is image 42 of
the index searched (`"beach" + #42 - #17`: like this one, unlike that one). The server parses the same language
from its `text` field but never treats a term as a path: there every other term is text. A term may
also be an embedding given as numbers (`embedding_term`: the API's `embedding` field, `--embedding F.npy`), a
vector computed elsewhere by the index's model.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import SearchError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
_WEIGHT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*:(.*)$", re.DOTALL)
_SPACED_OPERATOR = re.compile(r"\s+([+-])\s+")
_INDEXED = re.compile(r"^#([0-9]{1,18})$")  # `#42`: image 42 of the index searched

ImageInput = str | Path | bytes | Image.Image
# What a query is compared with: the stored image embeddings (faiss), or the stored caption embeddings (the
# index's caption index, or an exact scan of the embedding parts: clip-retrieval's text modality; a hit is the
# image whose caption matched).
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class QueryTerm:
    """One term of a query: `kind` "text", "image", "embedding" or "id", its value (a text; a path, bytes or PIL
    image; a vector; an id of the index searched) and its weight."""

    kind: str
    value: Any
    weight: float = 1.0

    def describe(self) -> str:
        if self.kind == "id":
            return f"{self.weight:+g}×image #{self.value}"
        shown = self.value if isinstance(self.value, (str, Path)) else f"<{type(self.value).__name__}>"
        return f"{self.weight:+g}×{self.kind} {str(shown)!r}"


def _split_operators(args: Sequence[str]) -> list[str]:
    """Arguments -> a flat list of terms and "+"/"-" operators; operators inside a string need spaces round them."""
    pieces: list[str] = []
    for arg in args:
        if arg.strip() in ("+", "-"):
            pieces.append(arg.strip())
            continue
        parts = _SPACED_OPERATOR.split(f" {arg} ")  # [term, op, term, op, ...]; padding catches a leading op
        pieces.extend(p.strip() for p in parts if p.strip())
    return pieces


def _is_image_path(text: str) -> bool:
    path = Path(text).expanduser()
    try:
        return path.suffix.lower() in IMAGE_SUFFIXES or path.is_file()
    except OSError:  # a long text is not a path (ENAMETOOLONG)
        return False


def _term(text: str, sign: float, allow_paths: bool) -> QueryTerm:
    weight = 1.0
    match = _WEIGHT.match(text)
    if match:
        weight, text = float(match.group(1)), match.group(2).strip()
        if not np.isfinite(weight):
            raise SearchError(f"query term '{match.group(0)}': the weight must be a finite number")
    if not text:
        raise SearchError("query: a term is empty (check for a stray '+', '-' or 'WEIGHT:')")
    indexed = _INDEXED.match(text)
    if indexed:
        return QueryTerm("id", int(indexed.group(1)), sign * weight)
    if allow_paths and _is_image_path(text):
        return QueryTerm("image", Path(text).expanduser(), sign * weight)
    return QueryTerm("text", text, sign * weight)


def parse_query(args: Sequence[str] | str, allow_paths: bool = True) -> list[QueryTerm]:
    """Terms of a query written as `TERM [(+|-) TERM]...`, each TERM optionally `WEIGHT:TERM`.

    A term `#N` is image N of the index searched (its stored embedding). With `allow_paths` (the command line) a
    term naming an image file is an image; otherwise the other terms are text.
    """
    pieces = _split_operators([args] if isinstance(args, str) else args)
    terms: list[QueryTerm] = []
    sign: float | None = None  # the operator before the next term; a first term without one is added
    for piece in pieces:
        if piece in ("+", "-"):
            if sign is not None:
                raise SearchError(f"query: two operators in a row before '{piece}'")
            sign = 1.0 if piece == "+" else -1.0
            continue
        if terms and sign is None:
            raise SearchError(f"query: expected '+' or '-' before '{piece}' (quote a text of several words)")
        terms.append(_term(piece, 1.0 if sign is None else sign, allow_paths))
        sign = None
    if sign is not None:
        raise SearchError("query: it ends with an operator")
    if not terms:
        raise SearchError("query is empty: give a text, an image, or both")
    return terms


def check_modality(modality: Any) -> str:
    if modality not in MODALITIES:
        raise SearchError(f"modality: expected one of {', '.join(MODALITIES)}, got {str(modality)[:40]!r}")
    return str(modality)


def calibrated_for(terms: Sequence[QueryTerm]) -> bool:
    """Whether the index's no-good-match threshold applies to a query: it is calibrated on caption -> image
    scores, so only on queries of positively weighted texts."""
    return all(t.kind == "text" and t.weight > 0 for t in terms)


def own_images(terms: Sequence[QueryTerm], modality: str) -> list[int]:
    """The index's images a query is made of (positive `#N` terms): left out of its answer, as `search_by_id`
    leaves out its image (a caption search keeps them: an image's own caption is a fair answer)."""
    return sorted({int(t.value) for t in terms if t.kind == "id" and t.weight > 0}) if modality == "image" else []


def as_terms(values: Any, kind: str) -> list[QueryTerm]:
    """Terms from the Python API's `text=` / `image=` / `ids=`: one value, a list of values, a list of (value,
    weight) pairs, or a {value: weight} dict (texts and ids; images are not hashable in general)."""
    if values is None:
        return []
    if isinstance(values, dict):
        items = list(values.items())
    elif isinstance(values, (list, tuple)):
        items = [v if isinstance(v, tuple) else (v, 1.0) for v in values]
    else:
        items = [(values, 1.0)]
    terms = []
    for value, weight in items:
        if kind == "text" and not isinstance(value, str):
            raise SearchError(f"text query: expected a str, got {type(value).__name__}")
        if kind == "image" and not isinstance(value, (str, Path, bytes, Image.Image)):
            raise SearchError(f"image query: expected a path, bytes or a PIL image, got {type(value).__name__}")
        if kind == "id" and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise SearchError(f"ids: expected ids of the index (integers), got {type(value).__name__}")
        terms.append(QueryTerm(kind, value, float(weight)))
    return terms


def embedding_term(value: Any, weight: float = 1.0, name: str = "embedding") -> QueryTerm:
    """A term holding a query vector given as numbers [d] (its length is checked against the index later)."""
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise SearchError(f"{name}: expected a flat list of numbers") from None
    if vector.ndim != 1 or vector.size == 0:
        raise SearchError(f"{name}: expected one vector (a flat list of numbers), got shape {list(vector.shape)}")
    if not np.isfinite(vector).all():
        raise SearchError(f"{name}: holds a NaN or an infinite value")
    if float(np.linalg.norm(vector)) < 1e-12:
        raise SearchError(f"{name}: all zeros (no direction to search in)")
    return QueryTerm("embedding", vector, float(weight))


def embedding_terms(values: Any) -> list[QueryTerm]:
    """Terms from the Python API's `embedding=`: one vector [d], several [n, d], or a list of (vector, weight)."""
    if values is None:
        return []
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], tuple):
        return [embedding_term(v, w) for v, w in values]
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise SearchError("embedding: expected a flat list of numbers, an array [d] or [n, d]") from None
    rows = array if array.ndim == 2 else [array]  # [n, d] or one [d]
    return [embedding_term(row) for row in rows]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Normalised weighted sum of normalised vectors [n, d] -> [d] (float32)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [n, 1]
    total = (np.asarray(weights, dtype=np.float64)[:, None] * vectors / np.maximum(norms, 1e-12)).sum(axis=0)
    length = float(np.linalg.norm(total))
    if not np.isfinite(length) or length < 1e-6:
        raise SearchError("query: its terms cancel out (the weighted sum of their embeddings is zero)")
    return (total / length).astype(np.float32)


def open_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """A fully decoded RGB image from a path, bytes or a PIL image; SearchError naming `name` (or the path)
    when it is missing, not an image, truncated, or over `max_pixels` pixels (checked from the header)."""
    from ..data.robust import convert_to_rgb
    from ..transforms import upright

    if isinstance(source, Image.Image):
        return convert_to_rgb(source)[0]
    if isinstance(source, (str, Path)):
        name = str(source)
        try:
            stream: Any = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise SearchError(f"{name[:200]}: no such image file ({exc.strerror})") from None
    else:
        stream = io.BytesIO(source)
    try:
        with stream, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit limit decides
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise SearchError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} "
                                      "(a decompression bomb?)")
                image.load()
                return convert_to_rgb(upright(image))[0]
    except SearchError:
        raise
    except Image.DecompressionBombError:
        raise SearchError(f"{name}: over the decompression-bomb pixel limit") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed input; all mean "not usable"
        raise SearchError(f"{name}: not a readable image ({str(exc) or type(exc).__name__})") from None
