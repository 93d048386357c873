"""Small previews of indexed images (`GET /api/image/{id}?size=N`), which the search page shows in its grid.

A photo library's files are megabytes each: a page of 24 results as full files is tens of megabytes to send and
decode, for cards 160-250 px wide. A preview is the image scaled to fit N x N (aspect kept, never enlarged),
turned upright by its EXIF orientation (the browser does that for the full file; a re-encoded preview would
otherwise lose it), and encoded as WebP (alpha kept for transparent clipart and emoji). JPEGs are decoded at a
reduced scale straight from their DCT coefficients (PIL's `draft`), so a 12-megapixel photo is never decoded
in full. Previews are kept in memory, least recently used first out, up to a byte budget, keyed by the index
version (index.json names its faiss file by content hash, so a changed index never serves stale previews).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict

from PIL import Image

from ..data.robust import convert_to_rgb
from ..transforms import upright as turn_upright
from .errors import SearchError

__all__ = ["CACHE_BYTES", "MAX_SIZE", "MIN_SIZE", "ThumbnailCache", "make_thumbnail"]

MIN_SIZE, MAX_SIZE = 16, 1024
CACHE_BYTES = 64 << 20  # ~3,000 previews of 384 px
WEBP_QUALITY = 82
WEBP_METHOD = 2  # encoder effort 0-6: 2 is 9 ms for a 384-px preview, 4 is 22 ms for 4% fewer bytes (AMD EPYC core)


def make_thumbnail(data: bytes, size: int, max_pixels: int, name: str = "image") -> bytes:
    """WebP bytes of the image file `data` scaled to fit size x size, upright; SearchError when it is not a
    readable image or is over `max_pixels` pixels (checked from the header, before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit limit decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise SearchError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels}")
                scale = size / max(width, height)  # the fitted preview's size, which a reduced decode must cover
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))  # JPEG only
                upright = turn_upright(image)
                alpha = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
                # 16-bit and other modes go through the training pipeline's conversion (a plain convert clips them)
                upright = upright.convert("RGBA") if alpha else convert_to_rgb(upright)[0]
                upright.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
                out = io.BytesIO()
                upright.save(out, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
                return out.getvalue()
    except SearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed input; all mean "no preview"
        raise SearchError(f"{name}: not a readable image ({str(exc) or type(exc).__name__})") from None


class ThumbnailCache:
    """Previews by (index version, id, size), least recently used dropped past `max_bytes` (thread-safe; two
    threads asking for the same missing preview may both make it, which costs time, not correctness)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes
