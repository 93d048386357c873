"""Memory-efficient contrastive losses: the similarity matrix is visited tile by tile, never held whole.

A batch of B pairs gives a B x B logit matrix; at B = 65,536 in fp32 that is 16 GiB, and autograd would keep
several such matrices alive. Here the forward pass keeps only running log-sum-exps (O(B) memory) and the
backward pass recomputes each tile from the features, so peak memory is O(B * D + tile) at the price of one
extra matrix product per tile.

The kernels work on a *strip*: `rows` [n, D] against `cols` [m, D], where row i's positive partner is column
`offset + i`. The single-process loss is the full square (n = m, offset = 0); a distributed rank holds the strip
of its own rows against every gathered column.

Math is done in at least fp32 whatever the feature dtype (bf16 features are upcast once), so a bf16 run loses
no accuracy in the loss itself: the loss is returned in fp32 (fp64 for fp64 features) and the gradients in the
features' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

ChunkSize = int | tuple[int, int]


def _chunk_pair(chunk_size: ChunkSize) -> tuple[int, int]:
    """(row tile, column tile) from an int (square tiles) or a pair (rectangular tiles)."""
    pair = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    valid = isinstance(pair, (tuple, list)) and len(pair) == 2
    if not valid or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in pair):
        raise ValueError(f"chunk_size: expected a positive integer or a pair of them, got {chunk_size!r}")
    return pair[0], pair[1]


def _tiles(n: int, m: int, chunk_rows: int, chunk_cols: int) -> Iterator[tuple[slice, slice]]:
    for r0 in range(0, n, chunk_rows):
        for c0 in range(0, m, chunk_cols):
            yield slice(r0, min(r0 + chunk_rows, n)), slice(c0, min(c0 + chunk_cols, m))


def _upcast(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies in the compute dtype: fp32 for bf16/fp16/fp32 features, fp64 stays fp64."""
    dtype = torch.promote_types(torch.promote_types(rows.dtype, cols.dtype), torch.float32)
    return rows.detach().to(dtype), cols.detach().to(dtype)


def _scale_value(scale: torch.Tensor | float) -> float:
    return float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)


def _positive_dots(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> torch.Tensor:
    """<rows_i, cols_{offset+i}> for every row i: the unscaled positive similarities, [n]."""
    return (rows * cols[offset : offset + rows.shape[0]]).sum(dim=-1)


def _check_strip(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
    if rows.ndim != 2 or cols.ndim != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"features must be [n, D] and [m, D] with the same D, got {tuple(rows.shape)} and {tuple(cols.shape)}"
        )
    if offset < 0 or offset + rows.shape[0] > cols.shape[0]:
        raise ValueError(
            f"rows {offset}..{offset + rows.shape[0]} have no positive columns among {cols.shape[0]} columns"
        )


def _tiled_backward(
    ctx_tensors: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    tiles: tuple[int, int],
    weight_fn,
    sum_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate A = W @ cols and C = W^T @ rows over tiles, W = weight_fn(logits_tile, I, J) = dLoss/dlogits.

    Returns (A [n, D], C [m, D], sum of W if `sum_weights` else 0). With logits = scale * rows @ cols^T the
    gradients are d rows = scale * A, d cols = scale * C and d scale = sum(rows * A) (= sum_ij W_ij <rows_i, cols_j>).
    """
    rows, cols = ctx_tensors
    acc_rows = torch.zeros_like(rows)
    acc_cols = torch.zeros_like(cols)
    weight_sum = rows.new_zeros(())
    for I, J in _tiles(rows.shape[0], cols.shape[0], *tiles):
        logits = torch.mm(rows[I], cols[J].t()).mul_(scale)  # [cr, cc], recomputed instead of stored
        weights = weight_fn(logits, I, J)
        acc_rows[I].addmm_(weights, cols[J])  # row slices of a contiguous [n, D] are contiguous views
        acc_cols[J].addmm_(weights.t(), rows[I])
        if sum_weights:
            weight_sum += weights.sum()
    return acc_rows, acc_cols, weight_sum


def _finish_grads(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float,
    offset: int,
    acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_weight: float,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the positive-pair term (-positive_weight at each (i, offset+i)) and scale by the upstream gradient.

    Works in place on the accumulators: at large B each [B, D] copy would be a visible share of the memory.
    """
    acc_rows, acc_cols, weight_sum = acc
    n = rows.shape[0]
    acc_rows.add_(cols[offset : offset + n], alpha=-positive_weight)
    acc_cols[offset : offset + n].add_(rows, alpha=-positive_weight)
    g = grad_out.to(rows.dtype)
    d_scale = torch.dot(rows.reshape(-1), acc_rows.reshape(-1)) * g  # Σ_ij W_ij <rows_i, cols_j>
    d_bias = (weight_sum - positive_weight * n) * g
    return acc_rows.mul_(scale * g), acc_cols.mul_(scale * g), d_scale, d_bias


# A row's (column's) log-sum-exp may sit this far below the tile's maximum before the single shared shift
# of _tile_logsumexp could lose fp32 accuracy: its terms stay normal numbers (exp(-87) is the fp32 limit), and
# what underflows is below exp(-27) of the sum.
_SHARED_SHIFT_RANGE = 60.0


def _tile_logsumexp(logits: torch.Tensor, with_cols: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row (and column) log-sum-exps of one tile with a single exp pass shifted by the tile's maximum.

    Two `torch.logsumexp` calls would take two exp passes and several temporaries; this overwrites `logits`.
    Returns (None, None) when some row or column lies too far below the maximum for one shift to be exact.
    """
    top = logits.max()
    if not torch.isfinite(top):
        return None, None
    expd = logits.sub_(top).exp_()  # [cr, cc], in place
    row = expd.sum(dim=1).log_().add_(top)
    col = expd.sum(dim=0).log_().add_(top) if with_cols else None
    floor = float(top) - _SHARED_SHIFT_RANGE
    if float(row.min()) < floor or (col is not None and float(col.min()) < floor):
        return None, None
    return row, col


class _TiledCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(scale * rows @ cols^T, offset + i); with `symmetric`, also over columns."""

    @staticmethod
    def forward(ctx, rows, cols, scale, offset, tiles, symmetric):  # type: ignore[override]
        rows32, cols32 = _upcast(rows, cols)
        s = _scale_value(scale)
        n, m = rows32.shape[0], cols32.shape[0]
        row_lse = rows32.new_full((n,), float("-inf"))
        col_lse = cols32.new_full((m,), float("-inf"))
        for I, J in _tiles(n, m, *tiles):
            tile_rows, tile_cols = _tile_logsumexp(torch.mm(rows32[I], cols32[J].t()).mul_(s), symmetric)
            if tile_rows is None:  # rare: too wide a range for one shift, redo this tile exactly
                logits = torch.mm(rows32[I], cols32[J].t()).mul_(s)  # [cr, cc]
                tile_rows = torch.logsumexp(logits, dim=1)
                tile_cols = torch.logsumexp(logits, dim=0) if symmetric else None
            row_lse[I] = torch.logaddexp(row_lse[I], tile_rows)
            if symmetric:
                col_lse[J] = torch.logaddexp(col_lse[J], tile_cols)
        positives = s * _positive_dots(rows32, cols32, offset)
        loss = row_lse.sum() - positives.sum()
        if symmetric:
            loss = loss + col_lse.sum() - positives.sum()
        ctx.save_for_backward(rows32, cols32, row_lse, col_lse)
        ctx.meta = (s, offset, tiles, symmetric, rows.dtype, cols.dtype)
        ctx.scale_meta = (scale.shape, scale.dtype) if isinstance(scale, torch.Tensor) else None
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, cols, row_lse, col_lse = ctx.saved_tensors
        s, offset, tiles, symmetric, rows_dtype, cols_dtype = ctx.meta

        def weight_fn(logits: torch.Tensor, I: slice, J: slice) -> torch.Tensor:
            # d(sum of CE)/d logits: row softmax (+ column softmax), the one-hot part is added in _finish_grads.
            weights = torch.exp(logits - row_lse[I, None])
            if symmetric:
                weights += logits.sub_(col_lse[None, J]).exp_()
            return weights

        acc = _tiled_backward((rows, cols), s, tiles, weight_fn)
        d_rows, d_cols, d_scale, _ = _finish_grads(rows, cols, s, offset, acc, 2.0 if symmetric else 1.0, grad_out)
        return d_rows.to(rows_dtype), d_cols.to(cols_dtype), _scale_grad(ctx, d_scale), None, None, None


class _TiledSigmoid(torch.autograd.Function):
    """Sum over the strip of -log sigmoid(z_ij (scale * <rows_i, cols_j> + bias)), z = +1 at (i, offset+i)."""

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, offset, tiles):  # type: ignore[override]
        rows32, cols32 = _upcast(rows, cols)
        s, b = _scale_value(scale), _scale_value(bias)
        total = rows32.new_zeros(())
        for I, J in _tiles(rows32.shape[0], cols32.shape[0], *tiles):
            logits = torch.mm(rows32[I], cols32[J].t()).mul_(s).add_(b)  # [cr, cc]
            # Every pair as a negative: -log sigmoid(-x) = softplus(x); positives are corrected below.
            total += F.softplus(logits).sum()
        positive_logits = s * _positive_dots(rows32, cols32, offset) + b
        # For a positive, -log sigmoid(x) = softplus(x) - x.
        total = total - positive_logits.sum()
        ctx.save_for_backward(rows32, cols32)
        ctx.meta = (s, b, offset, tiles, rows.dtype, cols.dtype)
        ctx.scale_meta = (scale.shape, scale.dtype) if isinstance(scale, torch.Tensor) else None
        ctx.bias_meta = (bias.shape, bias.dtype) if isinstance(bias, torch.Tensor) else None
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, cols = ctx.saved_tensors
        s, b, offset, tiles, rows_dtype, cols_dtype = ctx.meta

        def weight_fn(logits: torch.Tensor, I: slice, J: slice) -> torch.Tensor:
            return logits.add_(b).sigmoid_()  # d softplus(x)/dx; the positives' -1 is added in _finish_grads

        acc = _tiled_backward((rows, cols), s, tiles, weight_fn, sum_weights=True)
        d_rows, d_cols, d_scale, d_bias = _finish_grads(rows, cols, s, offset, acc, 1.0, grad_out)
        d_bias_out = None
        if ctx.bias_meta is not None and ctx.needs_input_grad[3]:
            d_bias_out = d_bias.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        return d_rows.to(rows_dtype), d_cols.to(cols_dtype), _scale_grad(ctx, d_scale), d_bias_out, None, None


def _scale_grad(ctx, d_scale: torch.Tensor) -> torch.Tensor | None:
    if ctx.scale_meta is None or not ctx.needs_input_grad[2]:
        return None
    shape, dtype = ctx.scale_meta
    return d_scale.reshape(shape).to(dtype)


def tiled_cross_entropy_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor | float,
    offset: int,
    chunk_size: ChunkSize,
    symmetric: bool = False,
) -> torch.Tensor:
    """Σ_i CE(scale * rows_i @ cols^T, target offset+i), plus with `symmetric` the column direction, tiled.

    rows [n, D], cols [m, D]. `symmetric` needs the full square (n = m, offset = 0). Returns a sum, not a mean.
    """
    _check_strip(rows, cols, offset)
    if symmetric and (rows.shape[0] != cols.shape[0] or offset != 0):
        raise ValueError("tiled_cross_entropy_sum: symmetric needs a square matrix with offset 0")
    return _TiledCrossEntropy.apply(rows, cols, scale, offset, _chunk_pair(chunk_size), symmetric)


def tiled_sigmoid_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float,
    offset: int,
    chunk_size: ChunkSize,
) -> torch.Tensor:
    """Σ_ij -log σ(z_ij (scale <rows_i, cols_j> + bias)) over the strip, z = +1 at (i, offset+i), else -1."""
    _check_strip(rows, cols, offset)
    return _TiledSigmoid.apply(rows, cols, scale, bias, offset, _chunk_pair(chunk_size))


@torch.no_grad()
def hardest_negatives(
    rows: torch.Tensor, cols: torch.Tensor, offset: int = 0, chunk_size: ChunkSize | None = None
) -> torch.Tensor:
    """For each row i, the column j != offset+i of highest similarity <rows_i, cols_j>, as indices [n].

    With `chunk_size` the search runs tile by tile; without, in one tile.
    """
    _check_strip(rows, cols, offset)
    n, m = rows.shape[0], cols.shape[0]
    if m < 2:
        raise ValueError(f"hardest negatives need at least 2 columns, got {m}")
    tiles = _chunk_pair(chunk_size) if chunk_size is not None else (n, m)
    best = rows.new_full((n,), float("-inf"), dtype=torch.float32)
    best_idx = torch.zeros(n, dtype=torch.long, device=rows.device)
    positive_col = torch.arange(n, device=rows.device) + offset  # [n]
    for I, J in _tiles(n, m, *tiles):
        sims = (rows[I] @ cols[J].t()).float()  # [cr, cc]
        col_ids = torch.arange(J.start, J.stop, device=rows.device)
        sims.masked_fill_(col_ids[None, :] == positive_col[I, None], float("-inf"))
        value, idx = sims.max(dim=1)
        better = value > best[I]
        best[I] = torch.where(better, value, best[I])
        best_idx[I] = torch.where(better, idx + J.start, best_idx[I])
    return best_idx


def chunked_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: ChunkSize,
) -> torch.Tensor:
    """`clip_loss` computed in tiles of `chunk_size` (int, or (rows, cols)); same value and gradients."""
    batch = image_features.shape[0]
    total = tiled_cross_entropy_sum(image_features, text_features, logit_scale, 0, chunk_size, symmetric=True)
    return total / (2 * batch)


def chunked_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    chunk_size: ChunkSize,
) -> torch.Tensor:
    """`siglip_loss` computed in tiles of `chunk_size`; same value and gradients."""
    batch = image_features.shape[0]
    return tiled_sigmoid_sum(image_features, text_features, logit_scale, logit_bias, 0, chunk_size) / batch
