"""Linear probes on frozen features: L2-regularised multinomial logistic regression, CLIP paper protocol.

The model minimises  mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C N)  with full-batch L-BFGS in float64; this is
scikit-learn's LogisticRegression(C=C) objective (C times the summed loss plus half the squared norm, bias not
penalised) divided by C N, so the same C gives the same classifier. Protocol (Radford et al. 2021, appendix A.3):
choose C on a validation split by a parametric search over 1e-6..1e6 that starts at every second decade and
halves the step around the best value down to 8 steps per decade; refit on train + validation; score the test
split. Few-shot probes draw k examples per class several times and report mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .metrics import classification_metrics, topk_accuracy

LOG10_C_RANGE = (-6.0, 6.0)
FINEST_STEP = 1.0 / 8.0  # decades


@dataclass(frozen=True)
class LogisticModel:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight + self.bias  # [N, C]


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    C: float,
    num_classes: int | None = None,
    max_iter: int = 1000,
    init: LogisticModel | None = None,
    tol: float = 1e-4,
) -> LogisticModel:
    """Multinomial logistic regression with inverse regularisation strength C (as scikit-learn's C).

    Stops when every gradient entry is within `tol` (scikit-learn's default tol, on the same mean-scaled
    objective) or after `max_iter` L-BFGS iterations (1,000 as in the CLIP paper).
    """
    x = features.to(torch.float64)
    y = labels.long()
    n, dim = x.shape
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    weight = torch.zeros(dim, num_classes, dtype=torch.float64) if init is None else init.weight.clone()
    bias = torch.zeros(num_classes, dtype=torch.float64) if init is None else init.bias.clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    l2 = 1.0 / (C * n)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LogisticModel(weight.detach(), bias.detach())


def _score(model: LogisticModel, features: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    logits = model.logits(features)
    if metric == "acc1":
        return topk_accuracy(logits, labels, ks=(1,))[1]
    return classification_metrics(logits, labels)[metric]


@dataclass
class SweepResult:
    C: float
    scores: dict[float, float] = field(default_factory=dict)  # log10(C) -> validation score


def select_C(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    metric: str = "acc1",
    max_iter: int = 1000,
) -> SweepResult:
    """The C with the best validation score, by the CLIP paper's parametric search (see module docstring).

    Among equal scores the smaller C (stronger regularisation) wins.
    """
    result = SweepResult(C=1.0)
    models: dict[float, LogisticModel] = {}

    def evaluate(log_c: float) -> None:
        if log_c in result.scores or not LOG10_C_RANGE[0] <= log_c <= LOG10_C_RANGE[1]:
            return
        # warm start from the nearest C fitted so far: the objective is convex, so only the speed changes
        nearest = min(models, key=lambda k: abs(k - log_c)) if models else None
        init = models[nearest] if nearest is not None else None
        model = fit_logistic(*train, 10.0**log_c, num_classes, max_iter, init)
        models[log_c] = model
        result.scores[log_c] = _score(model, *val, metric)

    def best() -> float:
        return max(sorted(result.scores), key=lambda k: result.scores[k])  # first of equals = smallest C

    for log_c in range(int(LOG10_C_RANGE[0]), int(LOG10_C_RANGE[1]) + 1, 2):
        evaluate(float(log_c))
    step = 2.0
    while step > FINEST_STEP:
        step /= 2
        centre = best()
        evaluate(centre - step)
        evaluate(centre + step)
    result.C = 10.0 ** best()
    return result


def carve_validation(
    features: torch.Tensor, labels: torch.Tensor, fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random split of a training set into (train, val) for datasets without a validation split."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    n_val = max(1, int(round(fraction * len(labels))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (features[train_idx], labels[train_idx]), (features[val_idx], labels[val_idx])


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_classes: int | None = None,
    metric: str = "acc1",
    seed: int = 0,
) -> dict[str, object]:
    """The CLIP paper's linear probe: C chosen on `val` (carved from `train` when None), refit on train + val,
    test metrics (`acc1`, `acc5`, `mean_per_class_recall`) returned with the chosen C and the sweep."""
    num_classes = int(max(train[1].max(), test[1].max())) + 1 if num_classes is None else num_classes
    if val is None:
        train, val = carve_validation(*train, seed=seed)
    sweep = select_C(train, val, num_classes, metric)
    full = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    model = fit_logistic(*full, sweep.C, num_classes)
    metrics = classification_metrics(model.logits(test[0]), test[1])
    return {**metrics, "C": sweep.C, "val_scores": {10.0**k: v for k, v in sorted(sweep.scores.items())}}


def sample_k_shot(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k random examples of every class (all of a class that has fewer than k)."""
    chosen = []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen)


def kshot_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    C: float | None = None,
    draws: int = 5,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, object]:
    """k-shot linear probes over `draws` random draws of k training examples per class.

    C is fixed when given, else chosen per draw on `val` by `select_C`. Returns mean and standard deviation
    of each test metric across draws (`acc1_mean`, `acc1_std`, ...) and the per-draw results.
    """
    if C is None and val is None:
        raise ValueError("kshot_probe needs a validation set to choose C, or a fixed C")
    num_classes = int(max(train[1].max(), test[1].max())) + 1 if num_classes is None else num_classes
    generator = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(draws):
        idx = sample_k_shot(train[1], k, generator)
        subset = (train[0][idx], train[1][idx])
        chosen_C = C if C is not None else select_C(subset, val, num_classes).C  # type: ignore[arg-type]
        model = fit_logistic(*subset, chosen_C, num_classes)
        runs.append({**classification_metrics(model.logits(test[0]), test[1]), "C": chosen_C})
    out: dict[str, object] = {"k": k, "draws": runs}
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        values = torch.tensor([r[name] for r in runs], dtype=torch.float64)
        out[f"{name}_mean"] = values.mean().item()
        out[f"{name}_std"] = values.std(unbiased=True).item() if draws > 1 else 0.0
    return out


def logspace_c(steps_per_decade: int = 8) -> list[float]:
    """The CLIP paper's grid of C values (1e-6..1e6 at `steps_per_decade`), for exhaustive sweeps."""
    count = int(round((LOG10_C_RANGE[1] - LOG10_C_RANGE[0]) * steps_per_decade)) + 1
    return [10.0 ** (LOG10_C_RANGE[0] + i / steps_per_decade) for i in range(count)]


__all__ = [
    "LogisticModel", "fit_logistic", "select_C", "linear_probe", "kshot_probe", "carve_validation",
    "sample_k_shot", "logspace_c", "SweepResult",
]  # fmt: skip
