"""The validated search space: its dataclasses, and which trial-config keys can be searched."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import DataConfig, TrialConfig, from_dict
from ..errors import ConfigError
from ..pareto import Objective
from ..selection import direction

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

KINDS = ("choice", "uniform", "loguniform", "quniform", "int")
ALGORITHMS: dict[str, str] = {
    "optuna_tpe": "Optuna TPE (multivariate, constant liar for parallel trials; one or several objectives)",
    "optuna_nsga2": "Optuna NSGA-II (a genetic algorithm for several objectives)",
    "random": "random sampling (Optuna RandomSampler)",
    "grid": "every combination of the choice lists",
}
SCHEDULERS: dict[str, str] = {
    "asha": "ASHA: stops poor trials early at rungs grace_period * reduction_factor^k",
    "fifo": "no early stopping: every trial runs all its epochs",
}
# how the chosen cross-validated trial is tested: its fold models' ensemble, or a model
# refit on train+val for the best epoch count (cv.py)
CV_TESTS = ("ensemble", "refit")
TOP_KEYS = ("name", "data", "fixed", "space", "search", "resources", "tracking", "storage", "report")
# searching these would make trials select their checkpoints on different things
UNSEARCHABLE = {
    "loop.select_metric": "every trial must select on the same metric; set it in fixed.loop",
    "loop.select_mode": "every trial must select the same way; set it in fixed.loop",
}

Scalar = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One searched parameter: a dotted TrialConfig key and its distribution."""

    name: str  # e.g. "optimizer.lr" or "sampler"
    kind: str  # choice | uniform | loguniform | quniform | int
    low: float | None = None
    high: float | None = None
    step: float | None = None  # quniform: q; int: step (1 by default)
    values: tuple = ()  # choice
    when: tuple[tuple[str, tuple], ...] = ()  # ((param, allowed values), ...): all must hold

    def active(self, point: Mapping[str, Any]) -> bool:
        """True when every condition holds for the values already in ``point``
        (a condition on a parameter absent from ``point`` does not hold)."""
        return all(c in point and any(same_value(point[c], v) for v in allowed) for c, allowed in self.when)

    def can_take(self, value: Any) -> bool:
        """Whether sampling this parameter can ever give ``value``."""
        if self.kind == "choice":
            return any(same_value(value, v) for v in self.values)
        if not is_number(value):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.kind in ("int", "quniform"):
            k = (value - self.low) / (self.step or 1)
            return abs(k - round(k)) < 1e-9
        return True

    def candidates(self) -> list[Any]:
        """Values worth probing: every choice; the ends of a range (and a middle
        value of a stepped one)."""
        if self.kind == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.kind in ("uniform", "loguniform"):
            return [self.low, self.high]
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9))
        ks = [0, n // 2, n]
        if self.kind == "int":
            out = [int(self.low + k * step) for k in ks]
        else:
            out = [round(self.low + k * step, 12) for k in ks]
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler: ASHA early stopping or FIFO (none)."""

    name: str = "asha"  # asha | fifo
    grace_period: int = 1  # epochs every trial runs before it can be stopped
    reduction_factor: int = 3  # keep 1 / reduction_factor of the trials at each rung
    max_epochs: int | None = None  # default: the fixed loop.epochs


@dataclass(frozen=True)
class ObjectiveSpec:
    """One of several objectives: ``{metric: cost/latency_ms, mode: min}``."""

    metric: str
    mode: str | None = None  # follows from the metric; may only agree


# search.select's limits: the field max_<x> bounds the cost metric cost/<x>
LIMIT_PREFIX, COST_PREFIX = "max_", "cost/"


@dataclass(frozen=True)
class SelectRule:
    """Which trial is tested and registered (pareto.py): the best by ``metric`` among the
    trials within every limit given, or, with ``knee``, the knee of the Pareto front."""

    metric: str | None = None  # default: the first objective (the search's metric)
    knee: bool = False
    max_params_m: float | None = None
    max_gflops: float | None = None
    max_latency_ms: float | None = None
    max_latency_b32_ms: float | None = None
    max_train_s: float | None = None

    def limits(self) -> dict[str, float]:
        """{cost metric: upper bound} of the limits given."""
        return {COST_PREFIX + f.name[len(LIMIT_PREFIX):]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(LIMIT_PREFIX) and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str = "optuna_tpe"  # optuna_tpe | optuna_nsga2 | random | grid
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    metric: str | None = None  # default: loop.select_metric; trials select their best epoch on it too
    mode: str | None = None  # follows from the metric (loss, ece: min; the rest: max); may only agree
    # Several objectives (a Pareto front): the first is the search's metric (what trials
    # select their best epoch on and ASHA compares), the others e.g. cost metrics.
    objectives: tuple[ObjectiveSpec, ...] = ()
    select: SelectRule = field(default_factory=SelectRule)
    cost_repeats: int = 10  # timed passes per latency measurement (median), when a cost metric is used
    # Cross-validated trials (data.folds >= 2): each trial trains a model per fold and reports
    # the folds' mean (cv.py); the chosen trial is tested as its folds' ensemble or a refit.
    cv: bool = False
    cv_test: str = "ensemble"  # ensemble | refit
    num_samples: int = 10  # trials (grid: the grid size instead)
    max_concurrent: int = 2  # trials running at once
    time_budget_s: float | None = None  # stop starting trials after this many seconds
    seed: int = 0


@dataclass(frozen=True)
class Resources:
    """What one trial reserves; a fractional gpu lets trials share a device."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None  # default: sqlite:///<working dir>/mlflow.db
    experiment: str | None = None  # default: cxrtune-<space name>
    register_model: str | None = "cxrtune-best"  # registered-model name for the best trial; null = off

    def resolved_uri(self) -> str:
        """The tracking URI; local paths become absolute (trials run in other folders)."""
        if self.uri is None:
            return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
        if "://" in self.uri or self.uri.startswith("databricks"):
            return self.uri
        return str(Path(self.uri).expanduser().resolve())

    def experiment_name(self, spec_name: str) -> str:
        return self.experiment or f"cxrtune-{spec_name}"


@dataclass(frozen=True)
class StorageConfig:
    """Where Ray Tune keeps results and checkpoints: a local folder, a shared path
    every node mounts, or an s3:// (or other pyarrow) URI."""

    path: str = "cxrtune_runs/ray_results"
    # Checkpoints kept per trial: the best by the search metric, and Tune always keeps the
    # latest besides (what a restart continues from), so 1 means at most two per trial and
    # the disk a search needs does not grow with its epochs. Tune snapshots the experiment
    # each time a trial has saved this many since the last snapshot (on 2 CPU cores with
    # 1.5 s epochs, 1 costs about a third of an epoch; on a GPU trial the snapshot is a few
    # milliseconds against seconds).
    keep_checkpoints: int = 1

    def resolved(self) -> str:
        """An absolute local path, or the URI unchanged."""
        if "://" in self.path:
            return self.path
        return str(Path(self.path).expanduser().resolve())


@dataclass(frozen=True)
class ReportConfig:
    """What the report a finished search writes computes (report/build.py)."""

    # Grad-CAM and occlusion overlays, the t-SNE and the shortcut check (a few seconds at
    # 32 px, under a minute at 224 px on a CPU); false leaves them out
    explain: bool = True
    resamples: int = 1000  # patient-bootstrap resamples per test metric's 95 % interval


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space (see the module docstring)."""

    name: str
    file: str
    data: DataConfig
    fixed: dict  # the fixed section as given (plain nested dict)
    params: tuple[Param, ...]
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: Resources = field(default_factory=Resources)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def metric(self) -> str:
        """What trials select their best epoch on, Tune searches and ASHA compares: the
        first objective, search.metric or loop.select_metric."""
        if self.search.objectives:
            return self.search.objectives[0].metric
        return self.search.metric or self.base_config().loop.select_metric

    @property
    def mode(self) -> str:
        return direction(self.metric)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """The search's objectives with their directions (one unless search.objectives)."""
        if not self.search.objectives:
            return (Objective(self.metric, self.mode),)
        return tuple(Objective(o.metric, direction(o.metric)) for o in self.search.objectives)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def select_metric(self) -> str:
        """What the tested trial is the best by (search.select.metric, default the first objective)."""
        return self.search.select.metric or self.metric

    @property
    def cost_metrics(self) -> tuple[str, ...]:
        """The cost metrics the objectives and the selection rule use (measured in every trial)."""
        # (from the settings alone: the default metric needs the base config, built with this)
        s = self.search
        named = [o.metric for o in s.objectives] + [s.select.metric or "", *s.select.limits()]
        return tuple(dict.fromkeys(m for m in named if m.startswith(COST_PREFIX)))

    @property
    def max_epochs(self) -> int:
        return self.search.scheduler.max_epochs or self.base_config().loop.epochs

    @property
    def results_dir(self) -> str:
        """Where Tune keeps this search: a local path or a URI (s3://...)."""
        return f"{self.storage.resolved().rstrip('/')}/{self.name}"

    @property
    def has_conditions(self) -> bool:
        return any(p.when for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def base_config(self) -> TrialConfig:
        """data + fixed; searched keys keep their fixed value or the component default."""
        return self.trial_config({})

    def trial_config(self, point: Mapping[str, Any]) -> TrialConfig:
        """The base config with ``point``'s dotted keys applied (``output_dir`` untouched).
        ``point`` must not hold values for parameters whose conditions do not hold."""
        merged: dict[str, Any] = copy.deepcopy(self.fixed) if self.fixed else {}
        problems: list[str] = []
        by_name = {p.name: p for p in self.params}
        for name, value in point.items():
            p = by_name.get(name)
            if p is not None and not p.active(point):
                conds = ", ".join(f"{c} in {list(a)}" for c, a in p.when)
                problems.append(f"space.{name}={value!r}: given, but its condition ({conds}) does not hold")
                continue
            ftype, problem = key_type(name)
            if problem:
                problems.append(f"{name}: {problem}")
                continue
            value = to_field_type(value, ftype)
            if "." in name:
                section, fld = name.split(".", 1)
                if not isinstance(merged.get(section), dict):
                    merged[section] = {}
                merged[section][fld] = value
            else:
                merged[name] = value
        if problems:
            raise ConfigError(f"{self.file}: invalid trial point:\n  " + "\n  ".join(problems))
        if self.search.metric is not None or self.search.objectives:
            # the search's metric is what every trial selects its best epoch on
            merged.setdefault("loop", {})["select_metric"] = self.metric
        if self.cost_metrics:  # measured in every trial (cost.py), unless fixed.loop says how
            merged.setdefault("loop", {}).setdefault("cost_repeats", self.search.cost_repeats)
        cfg = from_dict(TrialConfig, merged)
        return dataclasses.replace(cfg, data=self.data)


# ---------------------------------------------------------------- searchable keys


def searchable_sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrialConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrialConfig)
            if dataclasses.is_dataclass(hints[f.name]) and f.name != "data"}


def key_type(name: str) -> tuple[Any, str | None]:
    """(annotation, None) for a searchable dotted TrialConfig key, else (None, problem)."""
    sections = searchable_sections()
    top = typing.get_type_hints(TrialConfig)
    scalars = [f for f, tp in top.items() if not dataclasses.is_dataclass(tp) and f != "output_dir"]
    valid = f"sections {', '.join(sections)} (as <section>.<field>) or {', '.join(scalars)}"
    section, _, fld = name.partition(".")
    if section == "data":
        return None, ("data settings cannot be searched: the image cache is built once per search; "
                      "set them in the data section (run one search per value)")
    if section == "output_dir":
        return None, "output_dir cannot be searched: the search gives every trial its own folder"
    if name in UNSEARCHABLE:
        return None, f"cannot be searched: {UNSEARCHABLE[name]}"
    if not fld:
        if section in scalars:
            return top[section], None
        if section in sections:
            fields = [f.name for f in dataclasses.fields(sections[section])]
            return None, f"name a field of {section}, e.g. {section}.{fields[0]}; valid fields: {', '.join(fields)}"
        return None, f"not a trial setting; searchable keys: {valid}"
    if section in scalars:
        return None, f"{section} is a single value: use the key {section!r}"
    if section not in sections:
        return None, f"unknown section {section!r}; searchable keys: {valid}"
    hints = typing.get_type_hints(sections[section])
    fields = [f.name for f in dataclasses.fields(sections[section])]
    if fld not in fields:
        return None, f"{fld!r} is not a field of {section}; valid fields: {', '.join(fields)}"
    return hints[fld], None


def base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def to_field_type(value: Any, ftype: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if base_type(ftype) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def same_value(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


