"""Per-sample margins of image-text pairs within batches, as a contrastive loss sees them.

For a batch of B pairs with normalised features f (images) and g (texts), pair i has

    i2t margin  <f_i, g_i> - max_{j != i} <f_i, g_j>    (its caption against the other captions)
    t2i margin  <g_i, f_i> - max_{j != i} <g_i, f_j>    (its image against the other images)

A positive margin means pair i is retrieved first within its batch. Chen et al. (ICLR 2024) relate zero-shot
transfer to these margins; their distribution depends on the batch size (more negatives, smaller margins), so
results always state it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..losses import per_sample_margins  # the definition the margin losses train with


def margins_in_batches(
    image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Margins of every pair within random batches of exactly `batch_size` pairs.

    The N pairs are shuffled (seeded) and cut into N // batch_size batches, as training batches are; the
    remainder (fewer than `batch_size` pairs) is left out, since a smaller batch has fewer negatives and its
    margins would not be comparable. Returns (i2t [M], t2i [M], pair index [M]) with M = whole batches * size.
    """
    count = image_features.shape[0]
    if batch_size < 2:
        raise ValueError(f"margins need batches of at least 2 pairs, got batch size {batch_size}")
    if count < batch_size:
        raise ValueError(f"{count} pairs are fewer than one batch of {batch_size}; use a smaller --batch-size")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    order = order[: count - count % batch_size]
    i2t, t2i = [], []
    for batch in order.view(-1, batch_size):  # [batches, batch_size]
        a, b = per_sample_margins(image_features[batch], text_features[batch])  # [batch_size] each
        i2t.append(a)
        t2i.append(b)
    return torch.cat(i2t), torch.cat(t2i), order


def describe(values: torch.Tensor) -> dict[str, float]:
    """Mean, spread, quantiles and the fraction of positive margins (pairs ranked first in their batch)."""
    v = values.double()
    quantiles = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    out: dict[str, Any] = {"mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0,
                           "min": v.min().item(), "max": v.max().item()}
    for name, q in zip(("p05", "p25", "median", "p75", "p95"), quantiles.tolist()):
        out[name] = q
    out["positive_fraction"] = (v > 0).double().mean().item()
    return out
