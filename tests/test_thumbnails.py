"""Previews of indexed images (`GET /api/image/{id}?size=N`): against PIL's full decode, EXIF rotation and resize
of the same file, transparency kept, never enlarged, bombs and garbage refused, cached per index version, and
bad sizes answered 400 with the server going on."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from search_helpers import save_tiny_model

from clipforge.cli import main
from clipforge.search.errors import SearchError
from clipforge.search.thumbnails import ThumbnailCache, make_thumbnail

ORIENTATION = 0x0112  # EXIF tag


def photo(width: int = 1200, height: int = 800) -> Image.Image:
    """Smooth gradients and a few blocks: content whose downscale is stable under JPEG/WebP rounding."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    rgb[height // 8: height // 3, width // 10: width // 3] = (250, 30, 30)
    rgb[height // 2:, width // 2: width // 2 + width // 8] = (20, 20, 200)
    return Image.fromarray(rgb.astype(np.uint8))


def rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation  # 6: the camera was turned; shown rotated 90 degrees clockwise
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def transparent_png() -> bytes:
    rgba = np.zeros((300, 400, 4), dtype=np.uint8)
    rgba[50:250, 100:300] = (200, 120, 40, 255)  # an opaque block on a transparent ground
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    return out.getvalue()


def reference(data: bytes, size: int) -> Image.Image:
    """The full decode, EXIF-rotated, resized to fit size x size with PIL's LANCZOS."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        upright.thumbnail((size, size), Image.Resampling.LANCZOS)
        return upright.copy()


def test_photo_preview_is_upright_scaled_and_close_to_the_full_decode():
    data = rotated_jpeg(photo())
    preview = Image.open(io.BytesIO(make_thumbnail(data, 256, 10**8)))
    want = reference(data, 256)
    assert preview.format == "WEBP" and preview.mode == "RGB"
    assert preview.size == want.size and preview.size[1] == 256 and preview.size[0] < 256  # portrait after rotation
    error = np.abs(np.asarray(preview, dtype=np.int16) - np.asarray(want.convert("RGB"), dtype=np.int16))
    assert error.mean() < 4 and np.percentile(error, 99) < 40  # lossy WebP and a draft decode: close, not equal
    # Turned 90 degrees clockwise, the red block (rows 100-266, columns 120-400 of the 1200 x 800 file) lies at
    # columns 533-699, rows 120-400 of the upright 800 x 1200 image: scaled by 256 / 1200, around (130, 55).
    red = np.asarray(preview)[50:60, 120:140].reshape(-1, 3)
    assert (red[:, 0] > 200).all() and (red[:, 1] < 80).all()
    assert (np.asarray(preview)[50:60, 20:40, 0] < 200).all()  # and not where it lay before the turn


def test_transparency_kept_small_images_not_enlarged_and_bad_files_refused():
    preview = Image.open(io.BytesIO(make_thumbnail(transparent_png(), 128, 10**8)))
    assert preview.mode == "RGBA" and preview.size == (128, 96)
    alpha = np.asarray(preview)[..., 3]
    assert alpha[0, 0] == 0 and alpha[48, 64] == 255
    small = io.BytesIO()
    photo(60, 40).save(small, "PNG")
    assert Image.open(io.BytesIO(make_thumbnail(small.getvalue(), 512, 10**8))).size == (60, 40)
    deep = io.BytesIO()  # a 16-bit grayscale ramp keeps its ramp (scaled to 8 bits), not clipped to white
    Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))).save(deep, "PNG")
    ramp = np.asarray(Image.open(io.BytesIO(make_thumbnail(deep.getvalue(), 128, 10**8))))[16, :, 0].astype(int)
    assert ramp[0] < 10 and ramp[-1] > 245 and abs(ramp[64] - 128) < 12
    with pytest.raises(SearchError, match="1200x800 pixels is over the limit of 1000"):
        make_thumbnail(rotated_jpeg(photo()), 64, 1000)
    with pytest.raises(SearchError, match="id 3: not a readable image"):
        make_thumbnail(b"\x89PNG\r\n\x1a\n but not really", 64, 10**8, "id 3")


def test_cache_drops_the_least_recently_used_past_its_budget():
    cache = ThumbnailCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # now b is the least recently used
    cache.put("c", b"90ab")
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    assert cache.bytes == 8 and len(cache) == 2
    cache.put("huge", b"x" * 11)  # over the whole budget: not kept
    assert cache.get("huge") is None and len(cache) == 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("previews")
    images = root / "images"
    images.mkdir()
    (images / "a_photo.jpg").write_bytes(rotated_jpeg(photo()))
    (images / "b_clipart.png").write_bytes(transparent_png())
    for i in range(6):
        photo(90 + 10 * i, 70).save(images / f"c_small{i}.png")
    model = save_tiny_model(root / "model.safetensors")
    assert main(["embed", str(images), "--model", str(model), "--output", str(root / "emb"), "--workers", "0",
                 "--no-progress"]) == 0
    assert main(["index", "build", str(root / "emb"), "--index", str(root / "index"), "--kind", "flat",
                 "--queries", "4"]) == 0
    from clipforge import Searcher
    from clipforge.search.server import create_app

    searcher = Searcher(root / "index")
    keys = {m["key"]: m["id"] for m in searcher.index.metadata(range(len(searcher)))}
    return TestClient(create_app(searcher)), keys, images


def test_api_previews(served):
    client, keys, images = served
    photo_id = keys["a_photo"]
    answer = client.get(f"/api/image/{photo_id}", params={"size": 200})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(answer.content)).size == reference((images / "a_photo.jpg").read_bytes(), 200).size
    full = client.get(f"/api/image/{photo_id}")
    assert full.headers["content-type"] == "image/jpeg" and full.content == (images / "a_photo.jpg").read_bytes()
    clipart = client.get(f"/api/image/{keys['b_clipart']}?size=64")
    assert Image.open(io.BytesIO(clipart.content)).mode == "RGBA"
    (images / "a_photo.jpg").rename(images / "moved.jpg")  # the file is gone: the preview comes from the cache
    try:
        again = client.get(f"/api/image/{photo_id}", params={"size": 200})
        assert again.status_code == 200 and again.content == answer.content
        assert client.get(f"/api/image/{photo_id}", params={"size": 201}).status_code == 404  # not cached: read
    finally:
        (images / "moved.jpg").rename(images / "a_photo.jpg")
    for size in ["0", "15", "1025", "abc", "12.5", "-3"]:
        bad = client.get(f"/api/image/{photo_id}", params={"size": size})
        assert bad.status_code == 400
        assert "size: expected a whole number of pixels from 16 to 1024" in bad.json()["error"]
        assert client.get("/healthz").status_code == 200
    assert client.get("/api/image/999", params={"size": 64}).status_code == 404
