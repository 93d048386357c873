"""A small real index for the search/serve tests: a tiny random CLIP saved to disk, synthetic images written
as PNG files, their embeddings in the embedding-part layout, and a faiss index built over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.checkpoint import save_model
from clipforge.data.synthetic import STREAM_TRAIN, SyntheticConfig, SyntheticWorld
from clipforge.factory import create_model
from clipforge.search.build import BuildOptions, build_index
from clipforge.search.fingerprint import model_fingerprint
from clipforge.search.parts import write_manifest, write_part
from clipforge.search.searcher import tokenizer_for
from clipforge.transforms import EvalTransform


@dataclass
class BuiltIndex:
    index_dir: Path
    model_path: Path
    model: torch.nn.Module
    vectors: np.ndarray  # [n, d] float32: the stored image embeddings (float16 values) as the index holds them
    captions: list[str]
    paths: list[Path]


@torch.no_grad()
def build_small_index(root: Path, count: int = 120, arch: str = "RN-Tiny-64", seed: int = 0) -> BuiltIndex:
    torch.manual_seed(seed)
    model = create_model(arch).eval()
    model_path = save_model(model, root / "model.safetensors")
    world = SyntheticWorld(SyntheticConfig(image_size=model.image_size))
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    paths, captions, pixels = [], [], []
    preprocess = EvalTransform(model.image_size)
    for i in range(count):
        image, caption = world.pair(STREAM_TRAIN, 50_000 + i)
        path = images_dir / f"img_{i:05d}.png"
        image.save(path)
        paths.append(path)
        captions.append(caption)
        pixels.append(preprocess(image))
    img = model.encode_image(torch.stack(pixels), normalize=True).float().numpy()  # [n, d]
    text = model.encode_text(tokenizer_for(model)(captions), normalize=True).float().numpy()  # [n, d]
    emb = root / "emb"
    columns = {"key": [p.stem for p in paths], "path": [str(p) for p in paths], "caption": captions}
    half = count // 2  # two parts, so ids cross a part boundary
    parts = [write_part(emb, 0, img[:half], text[:half], {k: v[:half] for k, v in columns.items()}),
             write_part(emb, 1, img[half:], text[half:], {k: v[half:] for k, v in columns.items()})]
    write_manifest(emb, parts, {"fingerprint": model_fingerprint(model), "dim": int(img.shape[1]),
                                "model": str(model_path), "has_text": True})
    index_dir = root / "index"
    build_index([emb], index_dir, BuildOptions(kind="flat", queries=min(50, count // 2)))
    stored = img.astype(np.float16).astype(np.float32)
    return BuiltIndex(index_dir, model_path, model, stored, captions, paths)
