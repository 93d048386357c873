"""Shared pieces of the speed benchmarks: the matching Hugging Face config, analytic FLOP counts, the
machine's measured matmul peak, inputs, interleaved timing and the machine's load.

The scripts run from the repository root with `PYTHONPATH=src:benchmarks` (see each script's docstring).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

from clipforge.models.config import ModelConfig
from clipforge.speed import cpu_supports_bf16

EOT_TOKEN = 49407
SOT_TOKEN = 49406

# Radford et al.'s count for ViT-B/32, which the benchmarks use as given: GFLOP per image-text pair forward.
VIT_B_32_FORWARD_GFLOP = {"image": 8.8, "text": 6.0}


def hf_clip_config(cfg: ModelConfig):  # -> transformers.CLIPConfig
    """A transformers CLIPConfig with the same widths, depths, heads, patch, context, vocabulary and activation."""
    from transformers import CLIPConfig  # noqa: PLC0415 - heavy, and only the benchmarks need it

    v, t = cfg.vision_cfg, cfg.text_cfg
    if v.is_resnet:
        raise ValueError("transformers' CLIPModel has no ResNet image tower")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                num_attention_heads=t.heads, num_hidden_layers=t.layers, max_position_embeddings=t.context_length,
                hidden_act=act, layer_norm_eps=1e-5, eos_token_id=EOT_TOKEN, bos_token_id=SOT_TOKEN)
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_attention_heads=v.num_heads,
                  num_hidden_layers=v.layers, image_size=v.image_size, patch_size=v.patch_size, hidden_act=act,
                  layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                      logit_scale_init_value=cfg.init_logit_scale)


def build_hf_model(cfg: ModelConfig):  # -> transformers.CLIPModel
    from transformers import CLIPModel  # noqa: PLC0415

    return CLIPModel(hf_clip_config(cfg)).to(torch.float32)


@torch.no_grad()
def copy_weights_to_hf(model: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Load a clipforge CLIP's weights into the matching transformers CLIPModel (to check that they agree)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"]}

    def blocks(prefix: str, hf_prefix: str, layers: int) -> None:
        for i in range(layers):
            a, b = f"{prefix}resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}."
            for name, w in zip("qkv", sd[a + "attn.in_proj_weight"].chunk(3)):
                out[b + f"self_attn.{name}_proj.weight"] = w
            for name, w in zip("qkv", sd[a + "attn.in_proj_bias"].chunk(3)):
                out[b + f"self_attn.{name}_proj.bias"] = w
            pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for ours, theirs in pairs.items():
                for kind in ("weight", "bias"):
                    out[f"{b}{theirs}.{kind}"] = sd[f"{a}{ours}.{kind}"]

    cfg = model.config
    blocks("transformer.", "text_model.", cfg.text_cfg.layers)
    blocks("visual.transformer.", "vision_model.", cfg.vision_cfg.layers)
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for ours, theirs in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
    out["text_projection.weight"] = sd["text_projection"].t()  # ours x @ P, theirs Linear: x @ W^T
    out["visual_projection.weight"] = sd["visual.proj"].t()
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers: missing {missing}, unexpected {unexpected}")


def transformer_flops(tokens: int, width: int, layers: int, mlp_hidden: int) -> int:
    """Forward FLOPs (multiply-add = 2) of a pre-LN transformer on one sequence of `tokens`.

    Per layer: q/k/v and output projections 2*L*W*(3W + W) = 8*L*W^2; MLP 2*2*L*W*H; attention scores and
    the weighted sum of values 2*2*L^2*W (the full L x L, causal or not, as the usual convention).
    """
    per_layer = 8 * tokens * width**2 + 4 * tokens * width * mlp_hidden + 4 * tokens**2 * width
    return layers * per_layer


def forward_flops(cfg: ModelConfig) -> dict[str, int]:
    """Analytic forward FLOPs per image-text pair: {'image': ..., 'text': ...} (ViT towers).

    image = patch embedding 2 * G^2 * (3 * P^2) * W + transformer on G^2 + 1 tokens + projection 2 * W * D;
    text = transformer on the context length + projection 2 * W * D (embedding lookups cost no FLOPs).
    For ViT-B-32 this gives 8.82 + 5.96 GFLOP, the paper's 8.8 + 6.0.
    """
    v, t = cfg.vision_cfg, cfg.text_cfg
    assert v.patch_size is not None
    grid = v.image_size // v.patch_size
    image = (2 * grid**2 * 3 * v.patch_size**2 * v.width
             + transformer_flops(grid**2 + 1, v.width, v.layers, int(v.width * v.mlp_ratio))
             + 2 * v.width * cfg.embed_dim)
    text = (transformer_flops(t.context_length, t.width, t.layers, int(t.width * t.mlp_ratio))
            + 2 * t.width * cfg.embed_dim)
    return {"image": image, "text": text}


def pair_forward_flops(name: str, cfg: ModelConfig) -> tuple[float, str]:
    """(FLOPs per pair forward, where the count comes from): the paper's number for ViT-B-32, else analytic."""
    if name == "ViT-B-32":
        return sum(VIT_B_32_FORWARD_GFLOP.values()) * 1e9, "Radford et al. 2021: 8.8 + 6.0 GFLOP"
    parts = forward_flops(cfg)
    return float(sum(parts.values())), (
        f"analytic: image {parts['image'] / 1e9:.3f} + text {parts['text'] / 1e9:.3f} GFLOP")


def image_forward_flops(name: str, cfg: ModelConfig) -> tuple[float, str]:
    """(FLOPs of one image's forward, where the count comes from), as `pair_forward_flops`."""
    if name == "ViT-B-32":
        return VIT_B_32_FORWARD_GFLOP["image"] * 1e9, "Radford et al. 2021: 8.8 GFLOP"
    image = forward_flops(cfg)["image"]
    return float(image), f"analytic: {image / 1e9:.3f} GFLOP"


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 3) -> float:
    """The best FLOP/s of square matmuls of the given sizes in `dtype` (on the current thread count)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up: primitive creation, page faults
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


class PeakMeter:
    """The best fp32 and bf16 matmul rates seen so far; measured several times during a run (between
    phases), because on a shared machine a single measurement may fall in a busy moment."""

    def __init__(self) -> None:
        self.best = {"fp32": 0.0, "bf16": 0.0}
        # emulated bf16 (no AVX-512 BF16 / AMX) runs ~1 GFLOP/s: the default sizes would take minutes per call
        self.bf16_emulated = not cpu_supports_bf16()
        self.note = "; bf16 emulated, 512/1024" if self.bf16_emulated else ""

    def measure(self) -> dict[str, float]:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            small = dtype == torch.bfloat16 and self.bf16_emulated
            rate = matmul_peak(dtype, sizes=(512, 1024), repeats=2) if small else matmul_peak(dtype)
            self.best[name] = max(self.best[name], rate)
        return self.best


def twin_models(name: str) -> tuple[ModelConfig, torch.nn.Module, torch.nn.Module]:
    """(config, clipforge model `name` initialised under seed 0, transformers CLIPModel of the same
    architecture holding the same weights); both on the CPU, modes left to the caller."""
    from clipforge import create_model, get_model_config  # noqa: PLC0415

    cfg = get_model_config(name)
    torch.manual_seed(0)
    ours = create_model(name)
    hf = build_hf_model(cfg)
    copy_weights_to_hf(ours, hf)
    return cfg, ours, hf


def sdpa_attention():  # -> a context manager
    """A context in which clipforge's attention takes PyTorch's fused kernel in bf16 on CPU too: the lever
    measured against the explicit bf16 attention that `clipforge.models.attention` chooses there."""
    from unittest import mock  # noqa: PLC0415

    from clipforge.models import attention  # noqa: PLC0415

    return mock.patch.object(attention, "_explicit_is_faster", lambda q, length: False)


def random_images(cfg: ModelConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Normal noise of the model's input shape, [batch, 3, S, S]."""
    size = cfg.vision_cfg.image_size
    return torch.randn(batch, 3, size, size, generator=generator)


def random_tokens(batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """Token rows shaped like the tokenizer's: start token, random words, end token, zero padding.

    The first row fills the whole context, so every implementation computes all positions (clipforge drops
    padding after the batch's last end-of-text token on CPU, which real, shorter captions benefit from).
    """
    tokens = torch.zeros(batch, context, dtype=torch.long)
    lengths = torch.randint(3, context + 1, (batch,), generator=generator)
    lengths[0] = context
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 0] = SOT_TOKEN
        tokens[i, 1 : length - 1] = torch.randint(1, 49000, (length - 2,), generator=generator)
        tokens[i, length - 1] = EOT_TOKEN
    return tokens


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     block: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, taking turns (A B A B ...) so that a change of the machine's load
    during the run affects all of them alike.

    With `block` > 1 each turn makes `block` calls in a row and the first is not counted: two models trained
    in turn in one process evict each other's caches and allocator pools, a cost that a real run, which
    trains one model, never pays. `repeats` counted calls are made of each function.
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    while any(len(t) < repeats for t in times.values()):
        for name, fn in steps.items():
            for call in range(block):
                start = time.perf_counter()
                fn()
                if call > 0 or block == 1:
                    times[name].append(time.perf_counter() - start)
    return {name: t[:repeats] for name, t in times.items()}


def median(values: list[float]) -> float:
    return statistics.median(values)


def round_ratios(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """How much faster `ours` is than `theirs` (their seconds / ours) in each round of `time_interleaved`,
    whose calls ran back to back, so a change of the machine's load moves both: the median round and the
    range. For n rounds the range covers the median of the per-round ratio with probability 1 - 2^(1-n)
    (the sign-test interval: 75% at 3 rounds, 94% at 5, 98% at 7); a range straddling 1 settles nothing."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"round_ratios: need the same nonzero number of rounds, got {len(ours)} and {len(theirs)}")
    ratios = sorted(t / o for o, t in zip(ours, theirs, strict=True))
    n = len(ratios)
    return {"median": statistics.median(ratios), "low": ratios[0], "high": ratios[-1], "rounds": n,
            "coverage": 1 - 2 ** (1 - n)}


def format_ratio(ratio: float, rounds: dict[str, float]) -> str:
    """`1.08x  (rounds 1.02-1.15, n=7, 98%)`: the ratio of medians, then the per-round range."""
    return (f"{ratio:5.2f}x  (rounds {rounds['low']:.2f}-{rounds['high']:.2f}, n={int(rounds['rounds'])}, "
            f"{rounds['coverage']:.0%})")


def hardware_note(threads: int, device: str = "cpu") -> str:
    """The machine a number was measured on: CPU model and its matmul-relevant flags (or the GPU), torch,
    threads and load."""
    from clipforge.speed import cpu_description  # noqa: PLC0415

    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = cpu_description()
    return f"{where}; {machine_note(threads)}"


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def finish_report(report: dict, threads: int, output: str | None) -> None:
    """Note the machine again after the run (its load may have changed), print it, write the report if asked."""
    import json  # noqa: PLC0415

    report["machine_after"] = hardware_note(threads)
    print(report["machine_after"])
    if output:
        write_atomic(output, json.dumps(report, indent=2))


def machine_note(threads: int) -> str:
    load = os.getloadavg()
    return (f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
