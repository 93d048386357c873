"""The folder walker of `embed`, `index sync` and folder datasets lists exactly what `Path.rglob` + `is_file` +
`resolve` listed, in the same order (the order fixes which part an image lands in, and the listing digest an
interrupted `embed` resumes against), on a tree with the awkward cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipforge.data.folder import IMAGE_SUFFIXES, read_sidecar, scan_folder
from clipforge.search.sources import list_source


def _reference(root: Path) -> list[tuple[str, str, str | None]]:
    """(key, resolved path, caption) as the listing was computed before the walker (pathlib, one file at a time)."""
    out = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        sidecar = image.with_suffix(".txt")
        captions = read_sidecar(sidecar) if sidecar.is_file() else []
        out.append((image.relative_to(root).with_suffix("").as_posix(), str(image.resolve()),
                    captions[0] if captions else None))
    return out


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "photos"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "linked.png").write_bytes(b"png")
    (outside / "deep").mkdir()
    (outside / "deep" / "inside.png").write_bytes(b"png")
    files = ["a/b.png", "a.b/c.png", "a-b/d.jpg", "A/e.PNG", "z.png", "x.tar.png", ".hidden.png", "..png",
             "sub/dir/deeper/f.webp", "sub/g.GIF", "notes.txt", "h.png.", "plain"]
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"img")
    for name, caption in [("a/b.txt", "first\nsecond"), ("z.txt", "  \n zed \n"), ("x.tar.txt", "tar"),
                          ("sub/g.txt", "gee")]:
        (root / name).write_text(caption)
    (root / "dir.png").mkdir()  # a directory with an image suffix: not an image
    (root / "sub" / "k.txt").mkdir()  # a directory where a sidecar would be
    (root / "sub" / "k.png").write_bytes(b"img")
    os.symlink(outside / "linked.png", root / "link.png")  # a symlinked file: listed, resolved to its target
    os.symlink(outside / "deep", root / "linkdir")  # a symlinked directory: not entered
    os.symlink(root / "nothing.png", root / "dangling.png")  # a dangling symlink: no file
    return root


def test_listing_equals_the_pathlib_reference(tree):
    listing = list_source(str(tree))
    got = [(item.key, item.path, item.caption) for item in listing.items]
    assert got == _reference(tree)
    keys = [key for key, _, _ in got]
    assert keys.index("a/b") < keys.index("a.b/c") and "link" in keys and "linkdir/inside" not in keys
    assert "dir" not in keys and "dangling" not in keys and "h.png" not in keys
    assert dict((k, c) for k, _, c in got)["z"] == "zed"
    assert all(item.stat == (os.stat(item.path).st_size, os.stat(item.path).st_mtime_ns) for item in listing.items)


def test_folder_dataset_scan_keeps_its_order(tree):
    images = [image for image, _ in scan_folder(tree, require_captions=False)]
    want = [image for image in sorted(p for p in tree.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if image.with_suffix(".txt").is_file() and read_sidecar(image.with_suffix(".txt"))]
    assert images == want
