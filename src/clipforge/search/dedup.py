"""Near-duplicate collapsing of a ranked result list (`search --dedup`, `/api/search?dedup=`, the page's toggle).

A collection scraped from anywhere holds the same picture many times (re-encoded, resized, watermarked); a
query that finds one finds all, and the first page of results is one image. Walking the ranking best first, a
candidate is shown unless its image embedding is within cosine `threshold` of one already shown; then it is
listed under the shown result it is closest to. The default threshold is `index duplicates`' (which groups the
whole collection, transitively; here each hit is compared with the results already shown).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_DEDUP = 0.95  # the default of `index duplicates`, so that both call the same pairs duplicates


@dataclass
class Collapsed:
    """The outcome of `collapse`: positions (into the candidate list) of the results shown, best first; for
    each shown position the positions hidden under it; how many candidates were copies of `seed`; and whether
    the walk reached the next distinct candidate after the last shown (False: the candidates ran out first, so
    more of them could still belong under the last shown results)."""

    shown: list[int] = field(default_factory=list)
    hidden_under: dict[int, list[int]] = field(default_factory=dict)
    hidden_as_seed: int = 0
    complete: bool = False

    @property
    def hidden(self) -> int:
        return self.hidden_as_seed + sum(len(v) for v in self.hidden_under.values())


def check_threshold(threshold: object, name: str = "dedup") -> float:
    """`threshold` as a float cosine in (-1, 1]; ValueError naming `name` otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise ValueError(  # noqa: TRY004 - callers report every bad value the same way, as one line
f"{name}: expected a cosine similarity in (-1, 1], got {threshold!r}")
    value = float(threshold)
    if not -1.0 < value <= 1.0:
        raise ValueError(f"{name}: expected a cosine similarity in (-1, 1], got {value:g}")
    return value


def collapse(vectors: np.ndarray, threshold: float, limit: int, seed: np.ndarray | None = None) -> Collapsed:
    """Greedy collapse of ranked candidates `vectors` [n, d] (best first) into at most `limit` shown results,
    walking on until the next distinct candidate so that each shown result lists every duplicate ranked above it.

    Candidates with cosine >= `threshold` to `seed` [d] or any row of `seed` [m, d] (the query's own images,
    when the query holds images of the index) are hidden too: "more like this" should not answer with copies of
    this. Rows need not be unit length: cosines are taken on normalised float32 copies.
    """
    out = Collapsed()
    if len(vectors) == 0 or limit < 1:
        return out
    unit = vectors.astype(np.float32, copy=True)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)  # [n, d]
    seed_sims = None
    if seed is not None and seed.size:
        seeds = seed.astype(np.float32).reshape(-1, unit.shape[1])  # [m, d]
        seeds /= np.maximum(np.linalg.norm(seeds, axis=1, keepdims=True), 1e-12)
        seed_sims = (unit @ seeds.T).max(axis=1)  # [n] the closest seed
    shown_rows = np.empty((limit, unit.shape[1]), dtype=np.float32)  # [limit, d] the shown results so far
    for position in range(len(unit)):
        if seed_sims is not None and seed_sims[position] >= threshold:
            out.hidden_as_seed += 1
            continue
        count = len(out.shown)
        if count:
            sims = shown_rows[:count] @ unit[position]  # [count]
            nearest = int(np.argmax(sims))
            if sims[nearest] >= threshold:
                out.hidden_under[out.shown[nearest]].append(position)
                continue
        if count == limit:  # the (limit + 1)-th distinct result: every duplicate above it is placed
            out.complete = True
            break
        shown_rows[count] = unit[position]
        out.shown.append(position)
        out.hidden_under[position] = []
    return out
