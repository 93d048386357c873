"""Image-text retrieval recall@k over paired features, with several captions per image allowed."""

from __future__ import annotations

import torch

from .metrics import recall_at_k


def retrieval_scores(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in both directions.

    image_features [N, D] and text_features [T, D] normalised; text_to_image [T] gives each caption's image.
    Image->text: an image is a hit if any of its captions is in the top k. Text->image: its own image is.
    """
    similarity = image_features @ text_features.t()  # [N, T]
    owner = text_to_image.view(1, -1) == torch.arange(image_features.shape[0]).view(-1, 1)  # [N, T]
    i2t = recall_at_k(similarity, owner, ks)
    t2i = recall_at_k(similarity.t(), owner.t(), ks)
    out = {}
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = i2t[k]  # CLIP_benchmark's names: retrieving texts from images
        out[f"image_retrieval_recall@{k}"] = t2i[k]
    return out
