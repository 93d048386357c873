"""Terms added to a contrastive objective: the forms of the one-sided margin regularizer R, and CyCLIP's
cyclic-consistency terms.

Both are written as *sums over rows* of the global B x B similarity matrix, divided by the global batch size,
like every part in `clipforge.losses`: evaluated on a strip of rows (one distributed rank's pairs against the
gathered batch) and summed over strips they give the single-process value. `clipforge.losses` picks them by
name; this module knows nothing of configs or of torch.distributed.
"""

from __future__ import annotations

from typing import Literal

import torch

MarginForm = Literal["mean", "squared", "mean-scaled", "squared-scaled", "hinge"]
# The forms of R computed from the positive pairs alone; "hinge" also needs each row's hardest negative and is
# computed by `clipforge.losses` (it shares the margin search with the triplet loss).
POSITIVE_FORMS: tuple[str, ...] = ("mean", "squared", "mean-scaled", "squared-scaled")
MARGIN_FORMS: tuple[str, ...] = POSITIVE_FORMS + ("hinge",)


def positive_gap_sum(positives: torch.Tensor, form: str, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Σ_i r(<f_i, g_i>) over the given positive similarities [n], for a form of R acting on positives only.

    mean:           r = 1 - p            (= ½‖f - g‖² for unit vectors)
    squared:        r = (1 - p)²         (vanishes faster near p = 1: pulls hardest on the worst pairs)
    *-scaled:       the same times the logit scale 1/T, detached. Detached so that R reweights the pull on
                    positives by the current temperature (the CLIP loss's gradients on features carry that same
                    factor) without also pulling the temperature itself: with the scale in the graph,
                    d(λ s R)/ds = λ R > 0 would push T up whatever the contrastive loss wants, which is a
                    different claim (the temperature sets the margin) from the one R is meant to test.
    """
    gap = 1.0 - positives  # [n]
    if form in ("mean", "mean-scaled"):
        total = gap.sum()
    elif form in ("squared", "squared-scaled"):
        total = gap.square().sum()
    else:
        raise ValueError(f"margin form {form!r}: expected one of {list(POSITIVE_FORMS)}")
    if form.endswith("-scaled"):
        scale = logit_scale.detach() if isinstance(logit_scale, torch.Tensor) else torch.tensor(float(logit_scale))
        total = total * scale.to(total.dtype)
    return total


def cyclic_sums(
    image_rows: torch.Tensor, text_rows: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(in-modal, cross-modal) sums of CyCLIP's squared inconsistencies over rows i of a strip, all j:

    in-modal:    Σ_{i,j} (<I_i, I_j> - <T_i, T_j>)²   (image-image vs text-text similarities)
    cross-modal: Σ_{i,j} (<I_i, T_j> - <T_i, I_j>)²   (the similarity matrix vs its transpose)

    rows [n, D] are the strip's own pairs, *_all [B, D] the whole (gathered) batch in the same order.
    """
    in_modal = image_rows @ image_all.t() - text_rows @ text_all.t()  # [n, B]
    cross_modal = image_rows @ text_all.t() - text_rows @ image_all.t()  # [n, B]: S_ij - S_ji
    return in_modal.square().sum(), cross_modal.square().sum()


def cyclic_terms(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CyCLIP's (in-modal, cross-modal) consistency terms for one batch of normalised features [B, D].

    Normalisation as in CyCLIP's own training code (goel-shashank/CyCLIP, src/train.py, `get_loss`, read at
    commit 0042364): it forms the terms from the *scaled* logits, takes `.square().mean()` over the B x B
    entries, divides by logit_scale² and multiplies by the batch size. The scale cancels exactly, so each term
    is Σ_{i,j}(difference)² / B: a sum over B² entries divided by B, not a mean; the temperature plays no part.
    """
    batch = image_features.shape[0]
    in_modal, cross_modal = cyclic_sums(image_features, text_features, image_features, text_features)
    return in_modal / batch, cross_modal / batch
