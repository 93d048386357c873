"""The end of `clipforge demo`: embed and index new images of the synthetic world, then search them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld
from ..eval.synthetic import with_article

FIRST_INDEX = 200_000  # far past the evaluation's images of the same stream: these images are new


def write_collection(world: SyntheticWorld, folder: Path, count: int) -> None:
    """`count` new images of the world as PNG files, each with its caption in a .txt sidecar. The folder is
    written under a temporary name and renamed when complete, so a killed run never leaves half of it."""
    if folder.is_dir():
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i in range(count):
        image, caption = world.pair(STREAM_EVAL, FIRST_INDEX + i)
        image.save(partial / f"scene_{i:05d}.png")
        (partial / f"scene_{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    os.replace(partial, folder)


def _show(answer: dict, words: tuple[str, ...] = ()) -> list[str]:
    lines = [f"    {h['score']:.3f}  {h['key']:<12} {h['caption']}" for h in answer["results"]]
    if words:
        named = sum(all(w in (h["caption"] or "") for w in words) for h in answer["results"])
        lines.append(f"    captions containing the words {' and '.join(words)}: {named} of {len(answer['results'])}")
    if answer["no_good_match"]:
        lines.append(f"    (no good match: best score under the index's threshold {answer['threshold']:.3f})")
    return lines


def _threshold_words(threshold: dict | None) -> str:
    if not threshold:
        return "no no-good-match threshold (no held-out captions)"
    if threshold.get("score") is None:
        return f"no no-good-match threshold: {threshold['reason']}"
    return (f"no-good-match threshold {threshold['score']:.3f} with precision {threshold['precision']:.2f} / "
            f"recall {threshold['recall']:.2f} on held-out captions")


def run_search_demo(run_dir: str | Path, synthetic: SyntheticConfig, count: int = 2000, k: int = 5,
                    progress: bool = True) -> list[str]:
    """Embed `count` new images with the run's model, index them, and print two text searches and one image
    search; returns the printed lines. Everything is written under RUN_DIR/search/."""
    from .build import BuildOptions, build_index
    from .embed import EmbedOptions, embed_collection
    from .searcher import Searcher

    root = Path(run_dir) / "search"
    world = SyntheticWorld(synthetic)
    started = time.perf_counter()
    write_collection(world, root / "images", count)
    embed_collection(str(root / "images"), str(Path(run_dir) / "model.safetensors"), root / "embeddings",
                     EmbedOptions(part_size=1000, batch_size=250, workers=0, progress=progress), device="cpu")
    info = build_index([root / "embeddings"], root / "index", BuildOptions(kind="flat", queries=500))
    searcher = Searcher(root / "index", device="cpu")
    seconds = time.perf_counter() - started
    lines = [f"\nSearch: embedded and indexed {count} new images of the synthetic world in {seconds:.0f} s "
             f"({info['kind']} index, {_threshold_words(info.get('threshold'))})."]
    held_colour, held_shape = world.heldout[0]
    for colour, shape in (("red", "circle"), (held_colour, held_shape)):
        text = f"a {colour} {shape}"
        kind = "a held-out combination" if (colour, shape) == (held_colour, held_shape) else "a seen combination"
        lines.append(f"  text search \"{text}\" ({kind}):")
        lines += _show(searcher.search(text=text, k=k), (colour, shape))
    image, label = world.zeroshot_example(FIRST_INDEX, world.seen)
    query = root / "query.png"
    image.save(query)
    lines.append(f"  image search with {query} (a new image of {with_article(world.classnames[label])}):")
    lines += _show(searcher.search(image=query, k=k), tuple(world.classnames[label].split()))
    lines.append(f"  Open them in the browser:  clipforge serve {root / 'index'}   (then http://127.0.0.1:8000/)")
    print("\n".join(lines))
    return lines
