"""Exact gradient accumulation for contrastive losses: the gradient cache of Gao et al. (2021).

A contrastive loss couples every pair of the batch, so splitting the batch into micro-batches and summing
their losses changes the objective (fewer negatives). The gradient cache keeps the objective and bounds the
memory by the micro-batch instead:

1. embed every chunk with no graph (activations freed at once), remembering the RNG state before each;
2. compute the loss on all embeddings together and take its gradient with respect to the embeddings;
3. re-embed each chunk *with* a graph, restoring that chunk's RNG state so dropout and random augmentation
   draw exactly what they drew in step 1, and backpropagate the cached embedding gradients through it.

By the chain rule the parameter gradients are those of one full-batch pass whose chunks were embedded in
the same order. Parameters used by the loss itself (logit_scale, logit_bias) are given to the loss as
detached copies and receive their gradient in the last chunk's backward, so that DDP, which synchronises
gradients only during a backward that follows its own forward, averages them with everything else.
BatchNorm: each chunk normalises with its own batch statistics (as each rank does under DDP), so the gradient
is that of the chunked forward; the running statistics are updated once per sample, by the first pass (those
of `stats_module`'s BatchNorm layers are put back after the replay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

LossOutput = dict[str, torch.Tensor] | torch.Tensor


class _RngState:
    """The CPU generator's state and that of every CUDA device the inputs live on."""

    def __init__(self, cuda_devices: Sequence[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


class _BatchNormStats:
    """The running statistics of the BatchNorm layers in training mode, to put back after a replay."""

    def __init__(self, module: nn.Module | None) -> None:
        layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training] if module is not None else []
        self.saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in layers]

    def restore(self) -> None:
        with torch.no_grad():
            for layer, buffers in self.saved:
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)


def _chunks(inputs: Sequence[torch.Tensor], chunk_size: int) -> list[tuple[torch.Tensor, ...]]:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"gradcache chunk_size: expected a positive integer, got {chunk_size!r}")
    if not inputs:
        raise ValueError("gradcache: no inputs to embed")
    batch = inputs[0].shape[0]
    if any(x.shape[0] != batch for x in inputs):
        raise ValueError(f"gradcache: inputs have different batch sizes {[x.shape[0] for x in inputs]}")
    return [tuple(x[start : start + chunk_size] for x in inputs) for start in range(0, batch, chunk_size)]


def _as_tuple(reps: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (reps,) if isinstance(reps, torch.Tensor) else tuple(reps)


def _loss_dict(out: LossOutput) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"loss": out}
    if "loss" not in out:
        raise ValueError(f"gradcache: the loss function returned keys {sorted(out)}, expected a 'loss' entry")
    return out


def gradcache_backward(
    encode: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    loss_fn: Callable[..., LossOutput],
    inputs: Sequence[torch.Tensor],
    chunk_size: int,
    loss_params: Sequence[torch.Tensor] = (),
    no_sync: Callable[[], AbstractContextManager] | None = None,
    stats_module: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate into `.grad` the exact full-batch gradient of `loss_fn(*encode(*inputs), *loss_params)`.

    encode: one chunk of each input (e.g. images [c, 3, H, W], tokens [c, L]) -> embeddings (e.g. normalised
        image and text features [c, D]); called twice per chunk, first without a graph.
    loss_fn: (*all embeddings [B, ...], *loss_params) -> {"loss": total, ...} or a scalar, e.g. compute_loss
        or dist.distributed_compute_loss (the gathered loss works unchanged: step 2 runs on every rank).
    loss_params: parameters used by the loss only (e.g. model.logit_scale, model.logit_bias); the loss sees
        detached copies and the parameters get their gradient with the last chunk.
    no_sync: for DDP, `model.no_sync`: every chunk but the last runs inside it, so gradients are averaged
        once, after the last chunk.
    stats_module: the model `encode` runs; its BatchNorm running statistics are left as the first pass set
        them, so that each sample updates them once.
    Returns the loss entries, detached. The RNG is left as after one pass over the chunks.
    """
    chunks = _chunks(inputs, chunk_size)
    cuda_devices = sorted({x.device for x in inputs if x.device.type == "cuda"}, key=str)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState(cuda_devices))
            cached.append(_as_tuple(encode(*chunk)))
    after_first_pass = _RngState(cuda_devices)
    statistics = _BatchNormStats(stats_module)

    # [B, ...] per embedding, leaves of a small graph that only holds the loss.
    reps = [torch.cat([c[k] for c in cached]).requires_grad_() for k in range(len(cached[0]))]
    param_copies = [p.detach().clone().requires_grad_() for p in loss_params]
    out = _loss_dict(loss_fn(*reps, *param_copies))
    out["loss"].backward()  # grads land on reps and the copies (and on any parameter loss_fn closes over)
    rep_grads = [r.grad if r.grad is not None else torch.zeros_like(r) for r in reps]
    sizes = [c[0].shape[0] for c in cached]
    grad_chunks = [g.split(sizes) for g in rep_grads]

    for index, (chunk, state) in enumerate(zip(chunks, states)):
        last = index == len(chunks) - 1
        state.restore()
        with nullcontext() if last or no_sync is None else no_sync():
            chunk_reps = _as_tuple(encode(*chunk))
            # d/dθ Σ <rep(θ), cached grad> is this chunk's share of the full-batch gradient.
            surrogate = sum((r * g[index]).sum() for r, g in zip(chunk_reps, grad_chunks))
            if last:
                surrogate = surrogate + sum(
                    (p * c.grad).sum() for p, c in zip(loss_params, param_copies) if c.grad is not None
                )
            surrogate.backward()
    after_first_pass.restore()
    statistics.restore()
    return {key: value.detach() for key, value in out.items()}
