"""Photos stored sideways with an EXIF orientation tag are embedded, queried and trained on as a viewer shows them:
each of the eight orientations against numpy's own turn of the pixels, then `embed`'s stored vector and a
query's vector of a tagged file against those of the same picture saved upright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from search_helpers import save_tiny_model

from clipforge.cli import main
from clipforge.data.robust import load_image
from clipforge.transforms import EXIF_ORIENTATION, upright

# What a viewer does to the stored pixels [h, w, 3] for each orientation (EXIF 2.3, tag 0x0112), in numpy terms.
TURNS = {
    1: lambda a: a,
    2: np.fliplr,                                        # mirrored left-right
    3: lambda a: np.rot90(a, 2),                         # upside down
    4: np.flipud,                                        # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),                   # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),                        # turned 90 degrees clockwise to view
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),      # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),                         # turned 90 degrees counter-clockwise to view
}


def pixels(width: int = 48, height: int = 32) -> np.ndarray:
    """An image no turn or mirror maps onto itself."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def tagged(path: Path, array: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, "PNG", exif=exif.tobytes())  # lossless, so pixels compare exactly
    return path


@pytest.mark.parametrize("orientation", sorted(TURNS))
def test_each_orientation_as_a_viewer_shows_it(tmp_path, orientation):
    stored = pixels()
    path = tagged(tmp_path / "p.png", stored, orientation)
    want = TURNS[orientation](stored)
    assert np.array_equal(np.asarray(load_image(path).convert("RGB")), want)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(upright(image).convert("RGB")), want)


def test_no_or_odd_tags_leave_the_image_alone(tmp_path):
    stored = pixels()
    Image.fromarray(stored).save(tmp_path / "plain.png")
    for orientation in (0, 9, 1):
        tagged(tmp_path / f"odd{orientation}.png", stored, orientation)
    for name in ("plain.png", "odd0.png", "odd9.png", "odd1.png"):
        assert np.array_equal(np.asarray(load_image(tmp_path / name).convert("RGB")), stored)


def test_embed_and_query_see_tagged_photos_upright(tmp_path):
    from clipforge import Searcher

    stored = pixels(96, 64)
    folder = tmp_path / "photos"
    folder.mkdir()
    tagged(folder / "a_sideways.png", stored, 6)  # as a phone stores a portrait photo
    Image.fromarray(TURNS[6](stored)).save(folder / "b_upright.png")  # the same picture, saved the right way up
    Image.fromarray(stored).save(folder / "c_untagged.png")  # the stored pixels, as a viewer would show them untagged
    model = save_tiny_model(tmp_path / "model.safetensors")
    assert main(["embed", str(folder), "--model", str(model), "--output", str(tmp_path / "emb"), "--workers", "0",
                 "--no-progress"]) == 0
    vectors = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy").astype(np.float32)  # rows in file-name order
    # equal inputs in one batch: equal up to the float16 storage (a GEMM may round rows of a block differently)
    assert np.abs(vectors[0] - vectors[1]).max() < 2e-3
    assert np.abs(vectors[0] - vectors[2]).max() > 5e-2  # sideways, it would have embedded as the untagged one
    assert main(["index", "build", str(tmp_path / "emb"), "--index", str(tmp_path / "index"), "--kind", "flat",
                 "--queries", "1"]) == 0
    searcher = Searcher(tmp_path / "index")
    query = searcher.encode_images([folder / "a_sideways.png", (folder / "b_upright.png").read_bytes()])
    assert np.allclose(query[0], query[1], atol=1e-6)
