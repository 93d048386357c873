"""A small real index for the search/serve tests: a tiny random CLIP saved to disk, synthetic images written
as PNG files with caption sidecars, embedded and indexed with the `clipforge embed` / `index build` commands."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.checkpoint import save_model
from clipforge.cli import main
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.factory import create_model


@dataclass
class BuiltIndex:
    index_dir: Path
    model_path: Path
    model: torch.nn.Module
    vectors: np.ndarray  # [n, d] float32: the stored image embeddings (float16 values) as the index holds them
    captions: list[str | None]
    paths: list[Path]


@torch.no_grad()
def build_small_index(root: Path, count: int = 120, arch: str = "RN-Tiny-64", seed: int = 0,
                      copies: dict[int, int] | None = None, subfolders: int = 0,
                      captionless: set[int] | frozenset[int] = frozenset()) -> BuiltIndex:
    """Images with caption sidecars -> `clipforge embed` -> `clipforge index build --kind flat`, as a user would.
    `copies` {i: n} adds n byte-identical copies of image i (`img_0000i_copyJ.png`, ids in file-name order);
    `subfolders` > 0 puts image i in `images/g{i % subfolders}/` (ids then run folder by folder); the images
    `captionless` names get no sidecar (their caption is None)."""
    torch.manual_seed(seed)
    model = create_model(arch).eval()
    model_path = save_model(model, root / "model.safetensors")
    world = SyntheticWorld(SyntheticConfig(image_size=model.image_size))
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for i in range(count):
        image, caption = world.pair(STREAM_TRAIN, 50_000 + i)
        folder = images_dir / f"g{i % subfolders}" if subfolders else images_dir
        folder.mkdir(exist_ok=True)
        path = folder / f"img_{i:05d}.png"
        image.save(path)
        if i in captionless:
            caption = None
        else:
            path.with_suffix(".txt").write_text(caption)
        paths.append(path)
        captions.append(caption)
        for j in range((copies or {}).get(i, 0)):
            copy = images_dir / f"img_{i:05d}_copy{j}.png"
            copy.write_bytes(path.read_bytes())
            copy.with_suffix(".txt").write_text(caption)
            paths.append(copy)
            captions.append(caption)
    if subfolders:  # the listing's order, which ids follow
        captions = [c for _, c in sorted(zip(map(str, paths), captions))]
        paths = sorted(paths, key=str)
    emb, index_dir = root / "emb", root / "index"
    assert main(["embed", str(images_dir), "--model", str(model_path), "--output", str(emb), "--workers", "0",
                 "--part-size", str(len(paths) // 2 + 7), "--no-progress"]) == 0  # two parts: ids cross a boundary
    assert main(["index", "build", str(emb), "--index", str(index_dir), "--kind", "flat",
                 "--queries", str(min(50, len(paths) // 2))]) == 0
    stored = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("img_emb_*.npy"),
                                                         key=lambda p: int(p.stem.split("_")[-1]))])
    return BuiltIndex(index_dir, model_path, model, stored.astype(np.float32), captions, paths)


@contextmanager
def running_server(app: object) -> Iterator[str]:
    """A real uvicorn server for `app` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
