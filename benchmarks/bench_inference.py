"""Image and text embedding throughput of clipforge against Hugging Face transformers' CLIPModel.

Both models have the same architecture and weights (checked in fp32). Precisions: fp32, and bf16 weights
(clipforge: `speed.bf16_inference`, matmul weights in bf16 with LayerNorm and embeddings in fp32;
transformers: `model.to(torch.bfloat16)`). Texts are timed twice: full-length token rows (both models
compute all 77 positions), and the synthetic world's short captions, which clipforge's tokenizer pads to 77
and the model cuts back to the longest caption, while transformers gets them padded to the longest caption
as its tokenizer's `padding=True` would give. Calls are interleaved and medians reported.

    OMP_NUM_THREADS=2 PYTHONPATH=src:benchmarks python benchmarks/bench_inference.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Callable

import torch

from common import machine_note, median, random_images, random_tokens, time_interleaved, twin_models

from clipforge import get_tokenizer
from clipforge.data.synthetic import STREAM_EVAL, SyntheticConfig, SyntheticWorld
from clipforge.speed import bf16_inference


def short_captions(count: int) -> list[str]:
    world = SyntheticWorld(SyntheticConfig())
    return [world.pair(STREAM_EVAL, i)[1] for i in range(count)]


def build_calls(name: str, image_batch: int, text_batch: int) -> tuple[dict[str, Callable[[], None]], dict]:
    cfg, ours, hf = twin_models(name)
    ours, hf = ours.eval(), hf.eval()
    gen = torch.Generator().manual_seed(0)
    images = random_images(cfg, image_batch, gen)
    full = random_tokens(text_batch, cfg.text_cfg.context_length, gen)
    short = get_tokenizer(name)(short_captions(text_batch))  # [N, 77]
    longest = int(short.argmax(dim=-1).max()) + 1
    short_hf = short[:, :longest]  # what transformers' tokenizer gives with padding=True
    with torch.inference_mode():
        theirs = hf.get_image_features(pixel_values=images[:2])
        diff = ours.encode_image(images[:2]) - getattr(theirs, "pooler_output", theirs)
        if diff.abs().max() > 1e-4:
            raise RuntimeError(f"clipforge and transformers image features differ by {diff.abs().max():.2e}")
    models = {"fp32": (ours, hf),
              "bf16-weights": (bf16_inference(copy.deepcopy(ours)), copy.deepcopy(hf).to(torch.bfloat16))}
    calls: dict[str, Callable[[], None]] = {}
    for precision, (model, ref) in models.items():
        dtype = torch.bfloat16 if precision != "fp32" else torch.float32
        px = images.to(dtype)

        def ours_image(m=model, px=px) -> None:
            m.encode_image(px)

        def hf_image(r=ref, px=px) -> None:
            r.get_image_features(pixel_values=px)

        calls[f"image clipforge {precision}"] = ours_image
        calls[f"image transformers {precision}"] = hf_image
        for label, ours_tokens, hf_tokens in (("text-full", full, full), ("text-short", short, short_hf)):
            calls[f"{label} clipforge {precision}"] = lambda m=model, t=ours_tokens: m.encode_text(t)
            calls[f"{label} transformers {precision}"] = lambda r=ref, t=hf_tokens: r.get_text_features(input_ids=t)
    info = {"model": name, "image_batch": image_batch, "text_batch": text_batch, "short_caption_tokens": longest}
    return calls, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_note(args.threads))
    calls, info = build_calls(args.model, args.image_batch, args.text_batch)
    with torch.inference_mode():
        times = time_interleaved(calls, args.repeats)
    secs = {k: median(v) for k, v in times.items()}
    print(f"\n{args.model}: {args.image_batch} images / {args.text_batch} texts per call, median of {args.repeats}; "
          f"short captions are {info['short_caption_tokens']} tokens at most")
    rates = {}
    for key, seconds in secs.items():
        count = args.image_batch if key.startswith("image") else args.text_batch
        rates[key] = count / seconds
        print(f"  {key:40s} {rates[key]:9.1f} per s")
    ratios = {}
    for kind in ("image", "text-full", "text-short"):
        for precision in ("fp32", "bf16-weights"):
            ratios[f"{kind} {precision}: clipforge / transformers"] = (
                rates[f"{kind} clipforge {precision}"] / rates[f"{kind} transformers {precision}"])
        for impl in ("clipforge", "transformers"):
            ratios[f"{kind} {impl}: bf16-weights / fp32"] = (
                rates[f"{kind} {impl} bf16-weights"] / rates[f"{kind} {impl} fp32"])
    for label, ratio in ratios.items():
        print(f"  {label:52s} {ratio:5.2f}x")
    print(machine_note(args.threads))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"machine": machine_note(args.threads), **info, "per_s": rates, "ratios": ratios,
                       "all_seconds": times}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
