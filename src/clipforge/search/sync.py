"""`clipforge index sync INDEX FOLDER`: keep an index in step with a folder that changes (a photo library).

The folder is listed again and compared, file by file, with the rows the index holds for files under it (by
absolute path; size and mtime as recorded when each file was embedded, where the embedding recorded them; the
caption read from its sidecar against the stored one):
- a file not in the index, or whose size, mtime or caption changed, is embedded (with the index's own model,
  backend and precision) into `INDEX/synced/<digest>/`, named by the digest of what it embeds, so a sync that
  was interrupted resumes there;
- a row whose file is gone, or changed, is removed (a tombstone, see removed.py);
- rows of other sources (manifests, tar shards, other folders) are left alone.
Both land in one write of index.json (`build.add_to_index`), the commit point: a crash before it leaves the
index as it was. One sync or compaction runs on an index at a time (a lock file). A running `clipforge serve` reopens
the index within its --reload-interval (server.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.robust import BadSample, clean_caption
from .compact import SYNCED_DIR, index_lock, prune_unused
from .errors import SearchError
from .index import VectorIndex, open_index
from .parts import EmbeddingSet, open_embeddings
from .sources import Item, Listing, list_source

__all__ = ["SyncPlan", "plan_sync", "sync_index"]


@dataclass(frozen=True)
class SyncPlan:
    """What a sync of `folder` changes: files to embed (new or changed) and ids to remove (gone or changed)."""

    folder: str
    embed: list[Item]
    remove: np.ndarray  # [m] int64 ids, ascending
    new: int  # files the index has no row for
    changed: int  # files whose size, mtime or caption differ from when they were embedded
    gone: int  # files with a row that are no longer in the folder
    unchanged: int

    @property
    def empty(self) -> bool:
        return not self.embed and not self.remove.size


def _same_caption(stored: str | None, listed: str | None) -> bool:
    """Whether a stored caption is the listed one (as embed stores it: cleaned where the collection had text)."""
    if stored == listed:
        return True
    try:
        return listed is not None and stored == clean_caption(listed)
    except BadSample:
        return False


def _folder_rows(source: EmbeddingSet, prefix: str, listed: dict[str, Item]
                 ) -> Iterator[tuple[int, str, tuple[int, int] | None, str | None]]:
    """(row, path, recorded (size, mtime_ns) or None, stored caption) of the rows of `source` whose file lies
    under `prefix` or is listed (a symlink in the folder is listed by its target's path)."""
    start = 0
    for part in source.parts:
        table = source.table(part)
        names = set(table.column_names)
        if "path" in names:
            paths = table.column("path").to_pylist()
            sizes = table.column("file_bytes").to_pylist() if "file_bytes" in names else [None] * len(paths)
            times = table.column("file_mtime_ns").to_pylist() if "file_mtime_ns" in names else [None] * len(paths)
            captions = table.column("caption").to_pylist() if "caption" in names else [None] * len(paths)
            for row, (path, size, mtime, caption) in enumerate(zip(paths, sizes, times, captions)):
                if path and (str(path).startswith(prefix) or str(path) in listed):
                    recorded = (int(size), int(mtime)) if size is not None and mtime is not None else None
                    yield start + row, str(path), recorded, caption
        start += part.rows


def plan_sync(index: VectorIndex, listing: Listing) -> SyncPlan:
    """Compare the folder `listing` with the live rows the index holds for files under that folder."""
    root = str(listing.description["path"])
    prefix = root.rstrip("/") + "/"
    listed = {str(item.path): item for item in listing.items}
    kept: set[str] = set()  # files with a current row
    changed: set[str] = set()  # files with a stale row
    gone: set[str] = set()  # files no longer in the folder
    remove: list[int] = []
    offset = 0
    for source in index.sources:
        for row, path, recorded, caption in _folder_rows(source, prefix, listed):
            id_ = offset + row
            if id_ in index.removed:
                continue
            item = listed.get(path)
            if item is None:
                remove.append(id_)
                gone.add(path)
            elif (recorded is not None and item.stat is not None and recorded != item.stat) \
                    or not _same_caption(caption, item.caption):
                remove.append(id_)
                changed.add(path)
            else:
                kept.add(path)
        offset += len(source)
    changed -= kept  # a file indexed twice with one current row: that row stays, the stale one goes
    embed = [item for item in listing.items if str(item.path) not in kept]
    return SyncPlan(folder=root, embed=embed, remove=np.unique(np.asarray(remove, dtype=np.int64)),
                    new=len(embed) - len(changed), changed=len(changed), gone=len(gone), unchanged=len(kept))


def _embed_new(index: VectorIndex, plan: SyncPlan, model: str | None, device: str | None, workers: int,
               progress: bool) -> Path:
    """Embed `plan.embed` like the index's first source was embedded, into INDEX/synced/<digest>."""
    from .embed import EmbedOptions, run_embedding
    from .encoder import load_encoder
    from .fingerprint import backend_of, check_fingerprint
    from .searcher import resolve_model_path

    first = index.sources[0].manifest
    spec = model or index.info.get("model")
    if not spec:
        raise SearchError(f"{index.index_dir}/index.json records no model; pass one (--model PATH)")
    spec = resolve_model_path(str(spec), index.index_dir, index.info.get("embeddings_dir"))
    encoder = load_encoder(spec, backend_of(index.fingerprint), device, str(first.get("precision", "fp32")))
    check_fingerprint(index.fingerprint, encoder.fingerprint, where=f"index {index.index_dir}")
    # caption vectors whenever the index searches captions: a new image without one gets a zero vector, which
    # caption search skips, so one uncaptioned file does not end caption search for the whole index
    listing = Listing(plan.embed, {"kind": "folder", "path": plan.folder, "by": "index sync"}, index.has_captions)
    digest = hashlib.sha256(f"{listing.digest()}\0{encoder.spec}".encode()).hexdigest()[:16]
    out = index.index_dir / SYNCED_DIR / digest
    opts = EmbedOptions(part_size=int(first.get("part_size", EmbedOptions.part_size)),
                        batch_size=int(first.get("batch_size", EmbedOptions.batch_size)),
                        workers=workers, progress=progress)
    run_embedding(out, listing, encoder, opts)
    return out


def sync_index(index_dir: str | Path, folder: str | Path, *, model: str | None = None, device: str | None = None,
               workers: int = 2, progress: bool = True, dry_run: bool = False,
               measure: bool | None = None) -> dict[str, Any]:
    """Bring the index's rows for `folder` in step with the folder's files; returns what changed, with the
    seconds of each stage (`seconds`: list, plan, embed, index: the append and any re-measurement). Recall
    and the threshold are re-measured once the changes since the last measurement pass 5% of the rows
    (`build.REMEASURE_FRACTION`), or always with `measure=True`; `measured` says whether they were."""
    from .build import add_to_index

    index_dir = Path(index_dir)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    listing = list_source(str(folder))
    lap("list")
    if listing.description.get("kind") != "folder":
        raise SearchError(f"{folder}: index sync takes an image folder (manifests and tar shards do not change "
                          "under an index; embed them and use `index add`)")
    with index_lock(index_dir, "sync"):
        index = open_index(index_dir)
        plan = plan_sync(index, listing)
        lap("plan")
        report: dict[str, Any] = {"index": str(index_dir), "folder": plan.folder, "new": plan.new,
                                  "changed": plan.changed, "gone": plan.gone, "unchanged": plan.unchanged,
                                  "images_before": len(index), "dry_run": dry_run, "seconds": seconds}
        if plan.empty or dry_run:  # a dry run counts every file to embed as readable
            report.update(images_after=len(index) + len(plan.embed) - int(plan.remove.size), embedded=0,
                          unreadable=0)
            return report
        new_dirs = [_embed_new(index, plan, model, device, workers, progress)] if plan.embed else []
        opened = {d: open_embeddings(d) for d in new_dirs}
        added = [d for d in new_dirs if len(opened[d]) > 0]  # only unreadable files: nothing to add
        embedded = sum(len(opened[d]) for d in added)
        lap("embed")
        report.update(embedded=embedded, unreadable=len(plan.embed) - embedded)
        if not added and not plan.remove.size:  # nothing but files that cannot be read (tried again next time)
            report.update(images_after=len(index))
            return report
        sync = {k: report[k] for k in ("folder", "new", "changed", "gone")}
        info = add_to_index(index_dir, added, remove=plan.remove, measure=measure,
                            extra_info={"last_sync": {**sync, "embedded": embedded, "at": time.time()}})
        prune_unused(index_dir, info, index.info)
        lap("index")
        report.update(images_after=int(info["live_rows"]), measured=info.get("unmeasured_changes") == 0,
                      unmeasured_changes=int(info.get("unmeasured_changes", 0)))
        return report
