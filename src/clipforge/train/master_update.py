"""Clip and AdamW for fp32 master weights straight from bf16 gradients, in two passes that stay in cache.

With bf16 compute weights and fp32 masters (`speed.MasterWeights`) the plain update moves every matmul weight's
gradient through memory four times: the bf16 -> fp32 copy into the master's `.grad`, the clipping norm, the
clipping multiply, AdamW; then a fifth pass rounds the updated masters into the compute weights. Here no fp32
gradient is ever stored. Each bf16 gradient is widened into one small fp32 scratch buffer twice: once for its
norm, once, slice by slice, for its update, where the clipping factor, AdamW and the rounding into the compute
weight run on a slice that is still in the core's cache.

The arithmetic is torch's, on the same fp32 values in the same memory layout: `linalg.vector_norm` per gradient
(what `_foreach_norm` runs on a CPU) and of their stack, the clipping factor of `clip_grads_with_norm_`, and the
kernel of `AdamW(fused=True)` (`torch._fused_adamw_`, elementwise, so a slice at a time gives the same bits), so
the masters, moments and compute weights equal the plain path's bit for bit (tests/test_master_update.py).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from ..speed import MasterWeights

# Elements per AdamW slice: 1 MiB of widened gradient plus the slice of weight and moments, within a core's L2.
SLICE = 1 << 18
# Slices start at multiples of this: the fused kernel runs whole vectors plus a scalar tail per call, and the
# two can round differently, so every element must take the vector path whenever the whole tensor gives it that.
SLICE_ALIGN = 64


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` covers its storage span without gaps in a layout `_flat` can walk (row-major or NHWC)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-d view in memory order (channels-last weights included)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def supports(optimizer: torch.optim.Optimizer, master: MasterWeights) -> bool:
    """Whether the streamed update reproduces `optimizer.step()` for `master`: torch's fused AdamW without
    amsgrad, maximize or a tensor learning rate, on CPU weights."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return False
    for group in optimizer.param_groups:
        if not group.get("fused") or group["amsgrad"] or group["maximize"] or torch.is_tensor(group["lr"]):
            return False
    return all(p.device.type == "cpu" for p, _ in master.pairs)


class MasterUpdate:
    """The clipping norm, the clip, AdamW and the rounding into compute weights for `master`'s pairs.

    Call `grad_norm` after the backward pass (it returns the total norm of all gradients, before clipping, and
    the factor to clip by), then `step(factor)` to update, or nothing to skip the update.
    """

    def __init__(self, master: MasterWeights, optimizer: torch.optim.AdamW, slice_size: int = SLICE) -> None:
        if not supports(optimizer, master):
            raise ValueError("MasterUpdate: expected torch.optim.AdamW(fused=True) without amsgrad/maximize on CPU")
        if slice_size < SLICE_ALIGN or slice_size % SLICE_ALIGN:
            raise ValueError(f"MasterUpdate slice_size: expected a positive multiple of {SLICE_ALIGN}, got {slice_size}")
        self.master = master
        self.optimizer = optimizer
        self.slice_size = slice_size
        self.compute = {id(twin): param for param, twin in master.pairs}  # master parameter -> bf16 compute one
        largest = max((param.numel() for param, _ in master.pairs), default=0)
        self.scratch = torch.empty(largest, dtype=torch.float32)

    def _grad(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The gradient that belongs to master parameter `param`: its compute twin's (bf16) or its own."""
        twin = self.compute.get(id(param))
        return param.grad if twin is None else twin.grad

    def _widened(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` in fp32 in the scratch buffer, with `grad`'s shape and strides (the norm sums in memory order)."""
        return self.scratch[: grad.numel()].as_strided(grad.shape, grad.stride()).copy_(grad)

    @torch.no_grad()
    def grad_norm(self, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(total 2-norm of the gradients, the factor to multiply them by or None) as `train.step.clip_gradients`
        has them for the fp32 gradients."""
        norms = []
        for param in self.master.master.parameters():
            grad = self._grad(param)
            if grad is None:
                continue
            wide = grad if grad.dtype == torch.float32 else self._widened(grad)
            norms.append(torch.linalg.vector_norm(wide, 2.0))
        if not norms:
            return torch.tensor(0.0), None
        norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        if max_norm is None or bool(max_norm / (norm + 1e-6) >= 1.0):
            return norm, None
        return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0)

    @torch.no_grad()
    def step(self, factor: torch.Tensor | None) -> None:
        """One AdamW step of every master parameter with a gradient (multiplied by `factor` first), and the
        compute weights rounded from the new masters. Gradients are left for `MasterWeights.zero_grad`."""
        for group in self.optimizer.param_groups:
            hyper = {"lr": group["lr"], "beta1": group["betas"][0], "beta2": group["betas"][1],
                     "weight_decay": group["weight_decay"], "eps": group["eps"], "amsgrad": False,
                     "maximize": False, "grad_scale": None, "found_inf": None}
            shared: list[tuple[torch.Tensor, ...]] = []  # fp32 parameters: one fused call, as torch makes it
            for param in group["params"]:
                grad = self._grad(param)
                if grad is None:
                    continue
                state = self._state(param)
                state["step"].add_(1)
                twin = self.compute.get(id(param))
                if twin is None:
                    shared.append((param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
                else:
                    self._update_pair(param, twin, grad, state, factor, hyper)
            if shared:
                params, grads, avgs, sqs, steps = (list(column) for column in zip(*shared))
                if factor is not None:
                    torch._foreach_mul_(grads, factor)
                torch._fused_adamw_(params, grads, avgs, sqs, [], steps, **hyper)

    def _state(self, param: torch.Tensor) -> dict:
        """The optimizer's state of `param`, created as torch's fused AdamW creates it on first use."""
        state = self.optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update_pair(self, param: torch.Tensor, twin: torch.Tensor, grad: torch.Tensor, state: dict,
                     factor: torch.Tensor | None, hyper: dict) -> None:
        """AdamW on fp32 master `param` from bf16 `grad`, then `twin` (the compute weight) rounded from it."""
        avg, sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        tensors = (param, twin, grad, avg, sq)
        if not all(_dense(t) and t.stride() == param.stride() for t in tensors):
            # A layout that cannot be walked slice by slice (never seen for CLIP's weights): the whole tensor.
            wide = self.scratch[: param.numel()].as_strided(param.shape, param.stride()).copy_(grad)
            if factor is not None:
                wide.mul_(factor)
            torch._fused_adamw_([param], [wide], [avg], [sq], [], [step], **hyper)
            twin.copy_(param)
            return
        flat_param, flat_twin, flat_grad, flat_avg, flat_sq = (_flat(t) for t in tensors)
        for start in range(0, param.numel(), self.slice_size):
            end = min(start + self.slice_size, param.numel())
            wide = self.scratch[: end - start].copy_(flat_grad[start:end])
            if factor is not None:
                wide.mul_(factor)
            piece = flat_param[start:end]
            torch._fused_adamw_([piece], [wide], [flat_avg[start:end]], [flat_sq[start:end]], [], [step], **hyper)
            flat_twin[start:end].copy_(piece)
