"""A study: one base training config, a list of variants (optionally swept), and seeds; expanded into cells.

A study file (YAML) has these top-level keys:

    seeds: [0, 1, 2]            # every variant is trained once per seed
    extra_seeds: {clip: [3, 4], r-mean-0.3: [3, 4]}  # optional: more seeds for the variants where the spread
                                # is large; they run after every other cell, and the baseline needs them too
    order: variants             # run all seeds of a variant before the next (default), or `seeds`
    run_first: [clip, square]   # optional: these variants' cells run before the rest, in this order
    baseline: clip              # the variant id that paired differences are taken against
    model: {...} | NAME         # an architecture (inline, as in model_configs/*.json) or a registered name
    train: {...}                # the base `clipforge train` config of every cell (same keys)
    eval: {...}                 # what each cell measures after training (`CellEval`)
    claims:                     # optional: the paper's claims, each a `stats.ClaimSpec` (verdicts in the report)
      - {id: r-zeroshot, text: "R raises zero-shot accuracy", metric: zeroshot_heldout_top1, sign: 1,
         prefixes: [rmean-]}
    variants:                   # each one a `VariantSpec`
      - {id: clip, name: CLIP, groups: [objective]}
      - id: "mean-{loss.margin_lambda}"
        name: "CLIP + R (mean), λ={loss.margin_lambda}"
        set: {loss.margin_form: mean}
        sweep: {loss.margin_lambda: [0.3, 1.0]}

`set` and `sweep` keys are dotted paths into the train config. A sweep expands into one variant per
combination of its values (the cartesian product, in the order written); `{dotted.key}` in `id` and `name`
is replaced by that variant's value. Cell seed s sets both `seed` (initialisation) and
`data.synthetic.seed` (the training stream and the evaluation images).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from ..config import ConfigError, from_dict, read_yaml_mapping, to_dict
from ..data.synthetic import BACKGROUND_GREY
from ..models.config import ModelConfig
from ..eval.spec import EvalTask
from ..registry import get_model_config
from ..train.config import TrainConfig
from .real import check_tasks, real_columns
from .stats import CLAIM_METRICS, ClaimSpec

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


@dataclass(frozen=True)
class CellEval:
    """What every cell measures after training (all on the synthetic world of the cell's seed).

    zeroshot_per_class / retrieval_pairs: `per_class` / `pairs` of the synthetic zeroshot / retrieval evaluators.
    margin_pairs, margin_batch_size: held-out pairs (complete captions) whose margins are computed within
    consecutive batches of this fixed size, the same for every variant whatever its training batch.
    probe_*: linear probe on frozen image features of single-object images, 64 colour x shape classes;
    `probe_C` null selects C by the CLIP paper's validation sweep (`eval.linear_probe.linear_probe`), a
    number fixes it.
    tasks: the real-data setting. When set, each cell runs these evaluator tasks (`eval.tasks` entries of a
    training config: held-out splits of prepared corpora or manifests) instead of the synthetic battery
    above, and reports their flat metrics (`study.real`).
    """

    zeroshot_per_class: int = 10
    retrieval_pairs: int = 500
    margin_pairs: int = 1024
    margin_batch_size: int = 64
    probe_train_per_class: int = 16
    probe_test_per_class: int = 8
    probe_C: float | None = None
    keep_models: bool = False
    tasks: tuple[EvalTask, ...] = ()

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        check_tasks(self.tasks, prefix or "eval")
        for name in ("zeroshot_per_class", "probe_train_per_class", "probe_test_per_class"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{p}{name}': expected a positive integer, got {getattr(self, name)}")
        if self.retrieval_pairs < 10:
            raise ConfigError(f"config key '{p}retrieval_pairs': expected at least 10, got {self.retrieval_pairs}")
        if self.margin_batch_size < 2:
            raise ConfigError(f"config key '{p}margin_batch_size': expected at least 2, got {self.margin_batch_size}")
        if self.margin_pairs < self.margin_batch_size:
            raise ConfigError(
                f"config key '{p}margin_pairs': {self.margin_pairs} is fewer than one batch of {self.margin_batch_size}"
            )
        if self.probe_train_per_class < 5 and self.probe_C is None:
            raise ConfigError(f"config key '{p}probe_train_per_class': the C sweep needs at least 5 per class")
        if self.probe_C is not None and not self.probe_C > 0:
            raise ConfigError(f"config key '{p}probe_C': expected a positive number or null, got {self.probe_C}")


@dataclass(frozen=True)
class VariantSpec:
    """One row of the study (or, with `sweep`, one row per combination of the swept values)."""

    id: str
    name: str | None = None
    groups: tuple[str, ...] = ()
    set: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyFile:
    seeds: tuple[int, ...]
    variants: tuple[VariantSpec, ...]
    order: Literal["variants", "seeds"] = "variants"
    run_first: tuple[str, ...] = ()
    extra_seeds: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    model: Any = None
    train: dict[str, Any] = field(default_factory=dict)
    eval: CellEval = field(default_factory=CellEval)
    claims: tuple[ClaimSpec, ...] = ()


@dataclass(frozen=True)
class Variant:
    """A variant after sweep expansion: its overrides are final."""

    id: str
    name: str
    groups: tuple[str, ...]
    overrides: dict[str, Any]


# Training options added after studies were run, at the default that changes nothing: left out of a cell's
# fingerprint unless set otherwise, so the cells finished before the option existed still count.
_NEUTRAL_DEFAULTS: dict[tuple[str, ...], Any] = {("finetune", "freeze_bn_stats"): False,
                                                  ("data", "synthetic", "single_attribute_prob"): 0.0,
                                                  ("data", "synthetic", "random_colour_prob"): 0.0,
                                                  ("data", "synthetic", "shape_twin_prob"): 0.0,
                                                  ("data", "synthetic", "train_background_grey"): list(BACKGROUND_GREY),
                                                  ("early_stop", "monitor"): "loss",
                                                  ("early_stop", "fixed_temperature"): 0.07,
                                                  ("early_stop", "restore_best"): False}


def _drop_neutral_defaults(train: dict[str, Any]) -> None:
    for path, neutral in _NEUTRAL_DEFAULTS.items():
        section = train
        for key in path[:-1]:
            section = section.get(key, {})
        if path[-1] in section and section[path[-1]] == neutral:
            del section[path[-1]]


@dataclass(frozen=True)
class Cell:
    """One training run of the study: a variant at one seed, with its fully resolved config."""

    variant: Variant
    seed: int
    train: TrainConfig
    model_config: dict[str, Any]
    eval: CellEval

    @property
    def id(self) -> str:
        return f"{self.variant.id}--seed{self.seed}"

    def fingerprint(self) -> str:
        """A hash of everything configured about this cell: the resolved architecture, training config
        (defaults included) and evaluation settings.

        Defaults are included on purpose: when the code's defaults change (say, the synthetic world's caption
        statistics), finished cells no longer describe this configuration and are run again. Paths and the
        thread count are left out, so a study directory can move and run with any --jobs.
        """
        train = to_dict(self.train)
        for key in ("model", "output_dir", "run_name", "threads"):
            train.pop(key, None)
        train["data"].pop("render_cache", None)  # where rendered pairs are kept changes no result
        _drop_neutral_defaults(train)
        evaluation = to_dict(self.eval)
        if not evaluation["tasks"]:
            # the synthetic setting: hashed without the key, so cells finished before it existed still count
            del evaluation["tasks"]
        payload = {"model": self.model_config, "train": train, "eval": evaluation}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Study:
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    baseline: str | None
    model_config: dict[str, Any]
    train: dict[str, Any]
    eval: CellEval
    order: str = "variants"
    run_first: tuple[str, ...] = ()
    claims: tuple[ClaimSpec, ...] = ()
    extra_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def seeds_of(self, variant_id: str) -> tuple[int, ...]:
        """The seeds variant `variant_id` is trained at: the study's, then its extra seeds."""
        return self.seeds + self.extra_seeds.get(variant_id, ())

    def cell_count(self) -> int:
        return sum(len(self.seeds_of(v.id)) for v in self.variants)

    def groups(self) -> list[str]:
        """Every group name, in order of first appearance."""
        return list(dict.fromkeys(g for v in self.variants for g in v.groups))


def set_dotted(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """data[a][b][c] = value for path 'a.b.c', creating sections; a non-section on the way is an error."""
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"{where}: '{path}' is not a dotted config key")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{path}' goes through '{part}', which is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _fill(template: str, values: dict[str, Any], where: str) -> str:
    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"{where}: placeholder '{{{key}}}' names no key of this variant's set or sweep")
        return str(values[key])

    return _PLACEHOLDER.sub(one, template)


def expand_variant(spec: VariantSpec, where: str) -> list[Variant]:
    """The variants of one spec: a single one, or one per combination of its sweep's values."""
    for key, values in spec.sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.sweep.{key}: expected a non-empty list of values, got {values!r}")
        if key in spec.set:
            raise ConfigError(f"{where}: '{key}' is both set and swept")
    keys = list(spec.sweep)
    out = []
    for combo in itertools.product(*(spec.sweep[k] for k in keys)):
        overrides = {**spec.set, **dict(zip(keys, combo))}
        variant_id = _fill(spec.id, overrides, f"{where}.id")
        if not _ID.match(variant_id):
            raise ConfigError(f"{where}.id: {variant_id!r} is not a usable file name (letters, digits, _ . = + -)")
        name = _fill(spec.name, overrides, f"{where}.name") if spec.name else variant_id
        out.append(Variant(variant_id, name, tuple(spec.groups), overrides))
    return out


def _model_config(model: Any) -> dict[str, Any]:
    """The architecture as plain data: inline dicts are validated, names are looked up in the registry."""
    if model is None:
        raise ConfigError("study key 'model': required (an architecture mapping or a registered model name)")
    if isinstance(model, str):
        return to_dict(get_model_config(model))
    if not isinstance(model, dict):
        raise ConfigError(f"study key 'model': expected a mapping or a model name, got {model!r}")
    return to_dict(from_dict(ModelConfig, model, prefix="model"))


def build_study(data: dict[str, Any], where: str = "study") -> Study:
    """Validate a study mapping and expand its sweeps; ids must be unique."""
    raw = from_dict(StudyFile, {**data, "variants": [], "seeds": data.get("seeds", [])})
    if not raw.seeds or len(set(raw.seeds)) != len(raw.seeds):
        raise ConfigError(f"{where} key 'seeds': expected a non-empty list of distinct integers, got {raw.seeds}")
    specs = data.get("variants")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{where} key 'variants': expected a non-empty list of variants")
    variants: list[Variant] = []
    for i, spec in enumerate(specs):
        variants += expand_variant(from_dict(VariantSpec, spec, prefix=f"variants[{i}]"), f"variants[{i}]")
    seen: set[str] = set()
    for v in variants:
        if v.id in seen:
            raise ConfigError(f"{where} key 'variants': id {v.id!r} occurs twice (ids name the cells' files)")
        seen.add(v.id)
    unknown = [v for v in raw.run_first if v not in seen]
    if unknown:
        raise ConfigError(f"{where} key 'run_first': {unknown[0]!r} is not a variant id; ids: {sorted(seen)}")
    if raw.baseline is not None and raw.baseline not in seen:
        raise ConfigError(f"{where} key 'baseline': {raw.baseline!r} is not a variant id; ids: {sorted(seen)}")
    _check_claims(raw.claims, [v.id for v in variants], raw.baseline, claim_metrics(raw.eval), where)
    extra = _extra_seeds(raw.extra_seeds, raw.seeds, seen, raw.baseline, where)
    study = Study(raw.seeds, tuple(variants), raw.baseline, _model_config(raw.model), dict(raw.train), raw.eval,
                  raw.order, raw.run_first, raw.claims, extra)
    for v in variants:  # resolve one cell per variant now, so a bad override fails before any training
        resolve_cell(study, v, raw.seeds[0], "model.json")
    return study


def _extra_seeds(data: dict[str, Any], seeds: tuple[int, ...], ids: set[str], baseline: str | None,
                 where: str) -> dict[str, tuple[int, ...]]:
    """Validate `extra_seeds`: known variant ids, each a list of new distinct integer seeds, every one of which
    the baseline also runs (a paired difference needs both cells of the seed)."""
    out: dict[str, tuple[int, ...]] = {}
    for variant_id, values in data.items():
        key = f"{where} key 'extra_seeds.{variant_id}'"
        if variant_id not in ids:
            raise ConfigError(f"{key}: {variant_id!r} is not a variant id; ids: {sorted(ids)}")
        if (not isinstance(values, list) or not values or len(set(values)) != len(values)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in values)):
            raise ConfigError(f"{key}: expected a non-empty list of distinct integers, got {values!r}")
        repeated = sorted(set(values) & set(seeds))
        if repeated:
            raise ConfigError(f"{key}: seed {repeated[0]} is already one of the study's seeds {list(seeds)}")
        out[variant_id] = tuple(values)
    if baseline is not None:
        base = set(out.get(baseline, ()))
        for variant_id, values in out.items():
            missing = [s for s in values if s not in base]
            if missing:
                raise ConfigError(f"{where} key 'extra_seeds.{variant_id}': seed {missing[0]} has no baseline cell to "
                                  f"pair with; add it to 'extra_seeds.{baseline}'")
    return out


def claim_metrics(spec: CellEval) -> tuple[str, ...]:
    """The metrics whose paired differences a study reports (and a claim may name): the synthetic battery's,
    or in the real-data setting the flat metrics of its tasks."""
    if spec.tasks:
        return tuple(key for key, *_ in real_columns(spec.tasks))
    return CLAIM_METRICS


def _check_claims(claims: tuple[ClaimSpec, ...], ids: list[str], baseline: str | None, metrics: tuple[str, ...],
                  where: str) -> None:
    for i, claim in enumerate(claims):
        key = f"{where} key 'claims[{i}]'"
        if baseline is None:
            raise ConfigError(f"{key}: claims are paired differences against the baseline; set 'baseline'")
        if claim.metric not in metrics:
            raise ConfigError(f"{key}.metric: {claim.metric!r} is not one of {list(metrics)}")
        unknown = [v for v in claim.variants if v not in ids]
        if unknown:
            raise ConfigError(f"{key}.variants: {unknown[0]!r} is not a variant id")
        if not claim.members(ids):
            raise ConfigError(f"{key}: claim '{claim.id}' matches no variant")


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file (see the module docstring)."""
    path = Path(path)
    data = read_yaml_mapping(path, "study file")
    try:
        return build_study(data)
    except ConfigError as exc:
        raise ConfigError(f"study file {path}: {exc}") from None


def resolve_cell(study: Study, variant: Variant, seed: int, model_path: str, output_dir: str = "runs") -> Cell:
    """The cell (variant, seed): base train config + the variant's overrides + seed, model and output paths."""
    data = copy.deepcopy(study.train)
    for key, value in variant.overrides.items():
        set_dotted(data, key, value, f"variant {variant.id!r}")
    data["seed"] = seed
    set_dotted(data, "data.synthetic.seed", seed, "seed")
    data.update(model=model_path, output_dir=output_dir, run_name=f"{variant.id}--seed{seed}")
    try:
        train = from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"variant {variant.id!r}: {exc}") from None
    image_size = study.model_config["vision_cfg"]["image_size"]
    if train.data.source == "synthetic" and train.data.synthetic.image_size != image_size:
        raise ConfigError(
            f"variant {variant.id!r}: data.synthetic.image_size {train.data.synthetic.image_size} differs from "
            f"the model's image size {image_size}"
        )
    return Cell(variant, seed, train, study.model_config, study.eval)


def expand_cells(study: Study, model_path: str, output_dir: str = "runs") -> list[Cell]:
    """Every (variant, seed) cell in run order.

    order "variants": all seeds of the first variant, then the next, so a study stopped early has complete
    mean ± std for the variants listed first (list them by priority). order "seeds": one seed of every
    variant, then the next seed, so a partial study covers every variant with fewer seeds. Variants named
    in `run_first` come before all others (tables keep the order of the file). The cells of `extra_seeds`
    come last, seed by seed in the same variant order, so they never delay the study's own seeds.
    """
    first = [study.variant(v) for v in study.run_first]
    rest = [v for v in study.variants if v.id not in study.run_first]
    if study.order == "seeds":
        pairs = [(v, s) for group in (first, rest) for s in study.seeds for v in group]
    else:
        pairs = [(v, s) for v in first + rest for s in study.seeds]
    extra = sorted({s for values in study.extra_seeds.values() for s in values})
    pairs += [(v, s) for s in extra for v in first + rest if s in study.extra_seeds.get(v.id, ())]
    return [resolve_cell(study, v, s, model_path, output_dir) for v, s in pairs]
