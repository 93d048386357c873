"""Precision and execution-speed helpers: bf16 autocast, bf16 weights (inference, or training with fp32 master
copies), channels-last for convolutional towers and `torch.compile`. The trainer's step (`train.step`) uses
them as `precision: fp32 | bf16 | bf16-master`, `channels_last` and `compile` say.

On a CPU with AVX-512 BF16 bf16 matmuls run at about twice the fp32 rate, and a training step is dominated by
matmuls, so bf16 autocast (or bf16 weights) roughly halves it; see `benchmarks/bench_train_step.py` for the
measured numbers. Without native bf16 instructions bf16 is emulated and slower than fp32, so
`resolve_precision` falls back to fp32 there. The model's own CPU fast paths (explicit attention in bf16,
LayerNorm on bf16 input without casts, no work on padding after the last end-of-text token) need no switch.
"""

from __future__ import annotations

import copy
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "bf16-master")  # bf16-master: bf16 weights, fp32 master copies
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags for native bf16 dot products
CPU_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 flags for int8 dot products into int32


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in /proc/cpuinfo (empty where the file does not exist, e.g. macOS)."""
    if not os.path.exists(cpuinfo):
        return set()
    with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(("flags", "Features")):  # x86 / ARM spelling
                return set(line.split(":", 1)[1].split())
    return set()


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's description elsewhere)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # noqa: PLC0415

    return platform.processor() or platform.machine()


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """`AMD EPYC [avx2]`: the CPU model and the flags that decide its matmul kernels (and so its rounding)."""
    flags = cpu_flags(cpuinfo)
    return f"{cpu_model(cpuinfo)} [{' '.join(f for f in SPEED_FLAGS if f in flags) or 'no AVX2/AVX-512/AMX flags'}]"


def cpu_supports_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 dot products natively (AVX-512 BF16 or AMX; ARM bf16)."""
    flags = cpu_flags(cpuinfo)
    return any(flag in flags for flag in CPU_BF16_FLAGS) or "bf16" in flags


def int8_pair_sums_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU whose uint8 x int8 products go through int16 pair sums (AVX2/AVX-512 without VNNI or
    AMX: VPMADDUBSW), which ONNX Runtime's int8 MatMul uses there. A pair of products with 8-bit weights reaches
    2 * 255 * 127 and is clamped at 32767; with 7-bit weights (|w| <= 64) it stays below 2 * 255 * 64 = 32640."""
    flags = cpu_flags(cpuinfo)
    return "avx2" in flags and not any(flag in flags for flag in CPU_INT8_DOT_FLAGS)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 is fast on `device`: native CPU instructions, or a CUDA GPU that supports it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_supports_bf16()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision`, or 'fp32' when it asks for bf16 on a device without fast bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and not bf16_supported(device):
        return "fp32"
    return precision


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast on `device` for precision 'bf16'; a no-op for 'fp32' and 'bf16-master' (already bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _is_matmul_parameter(module: nn.Module, name: str) -> bool:
    """Weights and biases that feed matmuls or convolutions; norms, embeddings and the temperature are not."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return True
    if name in ("in_proj_weight", "in_proj_bias"):
        return True
    return name in ("proj", "text_projection")


def low_precision_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    """(owning module, name, parameter) of the parameters that bf16 weights put in bf16."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if _is_matmul_parameter(module, name):
                yield module, name, param


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Put matmul/conv weights in `dtype` in place; LayerNorms, embeddings and logit_scale stay fp32.

    The CLIP model computes in the dtype of its matmul weights (`model.dtype`), normalises in fp32 and casts
    embeddings on use, so this is the bf16-weights inference model (the fastest on CPUs with AVX-512 bf16).
    """
    for _, _, param in low_precision_parameters(model):
        param.data = param.data.to(dtype)
    return model


def packed_weights_win(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 linear layers gain from weights packed once for oneDNN (`models.layers.pack_linear_weights`):
    on a CPU with AMX each call's re-layout of the weight is a tenth of the GEMM (1.08-1.23x per ViT-B-32 layer,
    README "Benchmarks"); measured nowhere else, so nowhere else."""
    return "amx_bf16" in cpu_flags(cpuinfo) and torch.backends.mkldnn.is_available() \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_inference(model: nn.Module) -> nn.Module:
    """`model`, converted in place to bf16 matmul weights and put in eval mode, for embedding images and texts
    (see cast_matmul_weights); deep-copy it first to keep the fp32 model. On a CPU with AMX the transformer
    blocks' linear weights are also packed for oneDNN (`packed_weights_win`): the same kernels without a
    re-layout of each weight per call; features equal up to bf16 rounding."""
    model = cast_matmul_weights(model, torch.bfloat16).eval()
    if packed_weights_win():  # pack_linear_weights leaves weights elsewhere than the CPU as they are
        from .models.layers import pack_linear_weights  # noqa: PLC0415 - speed stays importable without models

        pack_linear_weights(model)
    return model


class MasterWeights:
    """Mixed-precision training with bf16 compute weights and fp32 master weights (no autocast).

    `model` computes in bf16; `master` is an fp32 module with the same parameter names, which the optimizer
    updates and checkpoints save. Parameters that stay fp32 in the model (norms, embeddings, temperature) and
    every buffer (BatchNorm running statistics) are shared with `master`, so their gradients and updates arrive
    there directly. One training step:

        mw.zero_grad(); loss_of(mw.model(...)).backward(); mw.grads_to_master()
        clip_grad_norm_(mw.master.parameters(), ...); optimizer.step()   # optimizer over mw.master
        mw.master.clamp_logit_scale(); mw.master_to_model()
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        self.master = copy.deepcopy(model)
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        master_modules = dict(self.master.named_modules())
        for module_name, module in model.named_modules():
            twin = master_modules[module_name]
            for name, param in list(module.named_parameters(recurse=False)):
                if _is_matmul_parameter(module, name):
                    param.data = param.data.to(dtype)
                    self.pairs.append((param, getattr(twin, name)))
                else:
                    setattr(twin, name, param)  # one fp32 tensor serves both
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and name in twin._buffers:
                    twin._buffers[name] = buffer  # statistics the bf16 model updates are the master's too

    def zero_grad(self) -> None:
        """Drop the model's gradients before a backward pass (master gradients are overwritten in place)."""
        for param in self.model.parameters():
            param.grad = None

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Copy the bf16 gradients into fp32 master gradients (and free the bf16 ones).

        The master gradients are buffers kept across steps: a fresh 4-byte-per-parameter allocation every step
        costs more in page faults on CPU than the copy itself.
        """
        for param, master in self.pairs:
            if param.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            master.grad.copy_(param.grad)
            param.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated fp32 master weights into the bf16 compute weights."""
        for param, master in self.pairs:
            param.copy_(master)


def uses_convolutions(model: nn.Module) -> bool:
    """True when the model has convolutions beyond a ViT's non-overlapping patch embedding (e.g. a ResNet)."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def channels_last(model: nn.Module) -> bool:
    """Store a convolutional model's convolutions channels-last (NHWC; faster oneDNN/cuDNN kernels); returns
    whether it did. ViTs are left alone: their one patchify conv gains nothing. The ResNet tower converts its
    input itself; for other modules feed images through `channels_last_input`."""
    if not uses_convolutions(model):
        return False
    from .models.resnet import use_channels_last  # noqa: PLC0415

    use_channels_last(model)
    return True


def channels_last_input(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in channels-last memory layout (same shape and values)."""
    return images.contiguous(memory_format=torch.channels_last)


def compile_model(model: nn.Module, enabled: bool = True, mode: str | None = None,
                  dynamic: bool = False) -> Callable:
    """`torch.compile(model)` when enabled (one compilation per input shape; the first call is slow)."""
    if not enabled:
        return model
    return torch.compile(model, mode=mode, dynamic=dynamic)
