"""Search spaces: one YAML file says everything a hyperparameter search needs.

A search-space file has these top-level sections::

    name: demo                   # optional; default: the file's stem
    data: {...}                  # DataConfig fields (the image cache is built once per search)
    fixed: {...}                 # TrialConfig sections (except data/output_dir) every trial shares
    space:                       # searched parameters, dotted TrialConfig keys, in sampling order
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optimizer.sam: {choice: [none, sam]}
      optimizer.rho: {uniform: [0.01, 0.2], when: {optimizer.sam: sam}}
      preprocess.tile_grid: {int: [4, 16, 4]}          # optional step
      loss.gamma: {quniform: [0.5, 3.0, 0.5]}          # low, high, q
    search: {algorithm, scheduler: {name, grace_period, reduction_factor, max_epochs},
             metric, mode, num_samples, max_concurrent, time_budget_s, seed}
    resources: {cpu, gpu}        # per trial; fractional gpu shares a device
    tracking: {uri, experiment, register_model}
    storage: {path}

A parameter with ``when`` is only sampled when every condition holds for the values
already drawn (conditions may only use parameters declared above it); otherwise it is
absent from the trial's point and the component default or the fixed value applies.

:func:`load_spec` validates everything before Ray starts and raises one ConfigError
listing every problem with the file and the key. Beyond types and ranges it probes
each parameter's candidate values (choices, range ends, a middle value) by building
the trial config they give and running the components' own ``validate``.

This module never imports Ray; :func:`define_by_run`, :func:`optuna_sampler` and
:func:`grid_points` give the driver what it hands to Ray Tune.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
import yaml

from .config import DataConfig, TrialConfig, apply_overrides, from_dict, read_yaml
from .data.labels import SCHEMES
from .errors import ConfigError
from .metrics import check_metric_name
from .models import BACKBONES

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "search_spaces"

KINDS = ("choice", "uniform", "loguniform", "quniform", "int")
ALGORITHMS: dict[str, str] = {
    "optuna_tpe": "Optuna TPE (multivariate, constant liar for parallel trials)",
    "random": "random sampling (Optuna RandomSampler)",
    "grid": "every combination of the choice lists",
}
SCHEDULERS: dict[str, str] = {
    "asha": "ASHA: stops poor trials early at rungs grace_period * reduction_factor^k",
    "fifo": "no early stopping: every trial runs all its epochs",
}
TOP_KEYS = ("name", "data", "fixed", "space", "search", "resources", "tracking", "storage")
LOWER_IS_BETTER = ("val/loss", "val/ece")
# searching these would make trials select their checkpoints on different things
_UNSEARCHABLE = {
    "loop.select_metric": "every trial must select on the same metric; set it in fixed.loop",
    "loop.select_mode": "every trial must select the same way; set it in fixed.loop",
}

Scalar = (str, int, float, bool, type(None))


# ---------------------------------------------------------------- public dataclasses


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
        return all(c in point and any(_same(point[c], v) for v in allowed) for c, allowed in self.when)

    def can_take(self, value: Any) -> bool:
        """Whether sampling this parameter can ever give ``value``."""
        if self.kind == "choice":
            return any(_same(value, v) for v in self.values)
        if not _is_number(value):
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
class SearchSettings:
    algorithm: str = "optuna_tpe"  # optuna_tpe | random | grid
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    metric: str | None = None  # default: loop.select_metric
    mode: str = "max"  # max | min
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
    # Checkpoints kept per trial (the best by the search metric). Tune snapshots the whole
    # experiment each time a trial has saved this many since the last snapshot, stalling
    # trials meanwhile: 2 cost 30 % of a 1.5 s epoch here, 5 cost 8 %.
    keep_checkpoints: int = 5

    def resolved(self) -> str:
        """An absolute local path, or the URI unchanged."""
        if "://" in self.path:
            return self.path
        return str(Path(self.path).expanduser().resolve())


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

    @property
    def metric(self) -> str:
        return self.search.metric or self.base_config().loop.select_metric

    @property
    def mode(self) -> str:
        return self.search.mode

    @property
    def max_epochs(self) -> int:
        return self.search.scheduler.max_epochs or self.base_config().loop.epochs

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
            ftype, problem = _key_type(name)
            if problem:
                problems.append(f"{name}: {problem}")
                continue
            value = _to_field_type(value, ftype)
            if "." in name:
                section, fld = name.split(".", 1)
                if not isinstance(merged.get(section), dict):
                    merged[section] = {}
                merged[section][fld] = value
            else:
                merged[name] = value
        if problems:
            raise ConfigError(f"{self.file}: invalid trial point:\n  " + "\n  ".join(problems))
        cfg = from_dict(TrialConfig, merged)
        return dataclasses.replace(cfg, data=self.data)


# ---------------------------------------------------------------- locating files


def bundled_spaces() -> list[str]:
    """Names of the search spaces shipped with the package."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def resolve_space_path(arg: str | Path) -> tuple[Path, str]:
    """``(path, how it was found)``. An existing file wins ("file"); otherwise a
    relative path's stem (``cxrnorm``, ``cxrnorm.yaml``, ``search_spaces/cxrnorm.yaml``)
    names a bundled space."""
    p = Path(arg).expanduser()
    if p.is_file():
        return p, f"file {p}"
    stem = p.name
    for suffix in (".yaml", ".yml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if not p.is_absolute() and stem and Path(stem).suffix == "":
        candidate = BUNDLED_DIR / f"{stem}.yaml"
        if candidate.is_file():
            return candidate, f"bundled space {stem!r} ({candidate})"
    what = "is a folder, not a YAML file" if p.is_dir() else "does not exist"
    raise ConfigError(f"search space {str(arg)!r}: {p} {what}, and it names no bundled space; "
                      f"bundled spaces: {', '.join(bundled_spaces()) or '(none)'} "
                      "(give one of these names or the path of a search-space YAML)")


# ---------------------------------------------------------------- loading and validation


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpec:
    """Read, override (``--set key=value``) and validate a search space; every problem
    is reported in one ConfigError. ``path`` may also name a bundled space.

    Overrides address the YAML: ``search.num_samples=4``, ``fixed.loop.epochs=2``,
    ``data.image_size=32``; ``space.<param>=<spec>`` replaces (or adds) a parameter,
    ``space.<param>=null`` removes it and ``space.<param>.<key>=...`` sets one key of it
    (e.g. ``space.optimizer.lr.loguniform=[1.0e-5, 1.0e-3]``)."""
    file, _how = resolve_space_path(path)
    raw = read_yaml(file)
    raw = _apply_all_overrides(raw, list(overrides))
    fname = file.name
    problems: list[str] = []
    spec = _build_spec(raw, file, problems)
    if spec is not None:
        _check_spec(spec, problems)
    if problems:
        lines = "\n  ".join(f"{fname}: {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"{file}: invalid search space ({n} problem{'s' if n > 1 else ''}):\n  {lines}")
    assert spec is not None
    return spec


def _apply_all_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    # apply_overrides round-trips through yaml.safe_dump, which sorts keys: the space
    # section's order (the sampling order) is kept apart and overridden here.
    space = copy.deepcopy(raw.get("space"))
    plain, space_items = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        (space_items if "=" in item and key.startswith("space.") else plain).append(item)
    out = apply_overrides({k: v for k, v in raw.items() if k != "space"}, plain)
    if "space" in raw or space_items:
        out["space"] = space
    for item in space_items:
        key, text = item.split("=", 1)
        rest = key.strip()[len("space."):]
        value = yaml.safe_load(text)
        if out["space"] is None:
            out["space"] = {}
        if not isinstance(out["space"], dict):
            raise ConfigError(f"--set {item!r}: the space section is not a mapping")
        sp = out["space"]
        owner = max((n for n in sp if isinstance(n, str) and rest.startswith(n + ".")), key=len, default=None)
        if owner is not None and rest not in sp:
            sub = rest[len(owner) + 1:]
            if not isinstance(sp[owner], dict):
                sp[owner] = {}
            if sub in KINDS:  # switching the distribution drops the old one
                for k in KINDS:
                    sp[owner].pop(k, None)
            if value is None:
                sp[owner].pop(sub, None)
            else:
                sp[owner][sub] = value
        elif value is None:
            sp.pop(rest, None)
        else:
            sp[rest] = value
    return out


def _lines(exc: ConfigError) -> list[str]:
    """The problem lines of a (possibly multi-section) ConfigError, without headers."""
    out = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"(\S+: )?invalid .*:", line):
            continue
        out.append(line)
    return out


def _lenient(cls: type, data: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """Check ``data`` against the dataclass ``cls`` key by key with ``from_dict``,
    recording every problem; returns the subset that builds."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
        return {}
    hints = typing.get_type_hints(cls)
    good: dict[str, Any] = {}
    for k, v in data.items():
        tp = hints.get(k) if isinstance(k, str) else None
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, Mapping):
            good[k] = _lenient(tp, v, f"{where}.{k}", problems)
            continue
        try:
            from_dict(cls, {k: v}, where)
        except ConfigError as exc:
            problems.extend(_lines(exc))
        else:
            good[k] = v
    return good


def _build(cls: type, good: dict[str, Any], where: str, problems: list[str]) -> Any:
    try:
        return from_dict(cls, good, where)
    except ConfigError as exc:  # a combination the key-by-key check could not see
        problems.extend(_lines(exc))
        return cls()


def _build_spec(raw: dict[str, Any], file: Path, problems: list[str]) -> SearchSpec | None:
    for k in raw:
        if k not in TOP_KEYS:
            problems.append(f"{k}: unknown top-level key; valid keys: {', '.join(TOP_KEYS)}")

    name = raw.get("name")
    if name is None:
        name = file.stem
    elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problems.append(f"name={name!r}: must be a word of letters, digits, '_', '.' or '-' "
                        "(it names the experiment and the results folder)")
        name = file.stem

    data = _build(DataConfig, _lenient(DataConfig, raw.get("data"), "data", problems), "data", problems)

    fixed_raw = raw.get("fixed")
    fixed_good: dict[str, Any] = {}
    if fixed_raw is not None and not isinstance(fixed_raw, Mapping):
        problems.append(f"fixed: expected a mapping of trial settings (model, loop, ...), got {fixed_raw!r}")
    elif fixed_raw:
        sections = [f.name for f in dataclasses.fields(TrialConfig) if f.name not in ("data", "output_dir")]
        kept = {}
        for k, v in fixed_raw.items():
            if k == "data":
                problems.append("fixed.data: data settings go in the top-level data section")
            elif k == "output_dir":
                problems.append("fixed.output_dir: the search gives every trial its own folder under "
                                "storage.path; remove it")
            elif k not in sections:
                problems.append(f"fixed.{k}: unknown key; valid keys: {', '.join(sections)}")
            else:
                kept[k] = v
        fixed_good = _lenient(TrialConfig, kept, "fixed", problems)

    search_raw = raw.get("search")
    if isinstance(search_raw, Mapping) and isinstance(search_raw.get("scheduler"), str):
        search_raw = {**search_raw, "scheduler": {"name": search_raw["scheduler"]}}  # scheduler: fifo
    search = _build(SearchSettings, _lenient(SearchSettings, search_raw, "search", problems), "search", problems)
    resources = _build(Resources, _lenient(Resources, raw.get("resources"), "resources", problems),
                       "resources", problems)
    tracking = _build(TrackingConfig, _lenient(TrackingConfig, raw.get("tracking"), "tracking", problems),
                      "tracking", problems)
    storage = _build(StorageConfig, _lenient(StorageConfig, raw.get("storage"), "storage", problems),
                     "storage", problems)

    params = _parse_space(raw.get("space"), fixed_good, problems)
    return SearchSpec(name=name, file=str(file), data=data, fixed=copy.deepcopy(fixed_good), params=params, search=search, resources=resources,
                      tracking=tracking, storage=storage)


def _parse_space(space: Any, fixed: Mapping[str, Any], problems: list[str]) -> tuple[Param, ...]:
    if space is None:
        return ()
    if not isinstance(space, Mapping):
        problems.append(f"space: expected a mapping of dotted keys to distributions, got {space!r}")
        return ()
    names = [n for n in space]
    declared: dict[str, Param | None] = {}
    params = []
    for name, spec in space.items():
        if not isinstance(name, str):
            problems.append(f"space.{name!r}: a parameter name must be a dotted key like optimizer.lr")
            continue
        key = f"space.{name}"
        ftype, problem = _key_type(name)
        if problem:
            problems.append(f"{key}: {problem}")
        elif "." in name:
            section, fld = name.split(".", 1)
            if isinstance(fixed.get(section), Mapping) and fld in fixed[section]:
                problems.append(f"{key}: also set in fixed.{name}; a key is either fixed or searched, "
                                "remove one of them")
        elif name in fixed:
            problems.append(f"{key}: also set in fixed.{name}; a key is either fixed or searched, remove one")
        p = _parse_param(name, spec, declared, names, problems)
        if p is not None and not problem:
            type_problem = _kind_type_problem(p, ftype)
            if type_problem:
                problems.append(f"{key}: {type_problem}")
                p = None
        declared[name] = p if not problem else None
        if p is not None and not problem:
            params.append(p)
    return tuple(params)


def _parse_param(name: str, spec: Any, declared: dict[str, Param | None], all_names: list[str],
                 problems: list[str]) -> Param | None:
    key = f"space.{name}"
    if not isinstance(spec, Mapping):
        problems.append(f"{key}={spec!r}: expected a distribution such as {{uniform: [low, high]}} or "
                        f"{{choice: [a, b]}}; kinds: {', '.join(KINDS)}")
        return None
    n_before = len(problems)
    for k in spec:
        if k not in KINDS and k != "when":
            problems.append(f"{key}.{k}: unknown key; a parameter has one of {', '.join(KINDS)} "
                            "and an optional when")
    kinds = [k for k in spec if k in KINDS]
    when = _parse_when(name, spec.get("when"), declared, all_names, problems)
    if len(kinds) != 1:
        got = "none" if not kinds else " and ".join(kinds)
        problems.append(f"{key}: must be exactly one of {', '.join(KINDS)} (got {got})")
        return None
    kind = kinds[0]
    args = spec[kind]
    p: Param | None = None
    if kind == "choice":
        p = _parse_choice(key, args, problems)
    elif kind in ("uniform", "loguniform"):
        nums = _parse_numbers(key, kind, args, (2,), "[low, high]", problems)
        if nums is not None:
            lo, hi = nums
            if not lo < hi:
                problems.append(f"{key}: {kind} range [{lo:g}, {hi:g}] is empty or inverted; low must be < high")
            elif kind == "loguniform" and lo <= 0:
                how = "touches zero" if lo == 0 else "goes below zero"
                eg = f"{hi * 1e-4:g}" if hi > 0 else "1e-5"
                problems.append(f"{key}: loguniform range [{lo:g}, {hi:g}] {how}; use a low > 0, e.g. {eg}")
            else:
                p = Param(name, kind, low=float(lo), high=float(hi))
    elif kind == "quniform":
        nums = _parse_numbers(key, kind, args, (3,), "[low, high, q]", problems)
        if nums is not None:
            lo, hi, q = nums
            if not lo < hi:
                problems.append(f"{key}: quniform range [{lo:g}, {hi:g}] is empty or inverted; low must be < high")
            elif not q > 0:
                problems.append(f"{key}: quniform step q={q:g} must be > 0")
            elif q > hi - lo:
                problems.append(f"{key}: quniform step q={q:g} is larger than the range [{lo:g}, {hi:g}]; "
                                "use a smaller q")
            else:
                p = Param(name, kind, low=float(lo), high=float(hi), step=float(q))
    else:  # int
        nums = _parse_numbers(key, kind, args, (2, 3), "[low, high] or [low, high, step]", problems)
        if nums is not None:
            if not all(float(x).is_integer() for x in nums):
                problems.append(f"{key}: int needs whole numbers, got {list(nums)}; use uniform for reals")
            else:
                lo, hi, *rest = (int(x) for x in nums)
                step = rest[0] if rest else 1
                if not lo < hi:
                    problems.append(f"{key}: int range [{lo}, {hi}] is empty or inverted; low must be < high")
                elif step < 1:
                    problems.append(f"{key}: int step {step} must be >= 1")
                elif step > hi - lo:
                    problems.append(f"{key}: int step {step} is larger than the range [{lo}, {hi}]; "
                                    "use a smaller step")
                else:
                    p = Param(name, "int", low=lo, high=hi, step=step)
    if p is None or len(problems) > n_before or when is None:
        return None
    return dataclasses.replace(p, when=when)


def _parse_choice(key: str, args: Any, problems: list[str]) -> Param | None:
    if not isinstance(args, list) or not args:
        problems.append(f"{key}: choice needs a non-empty list of values, got {args!r}")
        return None
    bad = [v for v in args if not isinstance(v, Scalar)]
    if bad:
        problems.append(f"{key}: choice values must be single numbers, strings, booleans or null; "
                        f"got {bad[0]!r}")
        return None
    seen: list[Any] = []
    for v in args:
        if any(_same(v, s) for s in seen):
            problems.append(f"{key}: choice lists {v!r} twice")
            return None
        seen.append(v)
    return Param(key[len("space."):], "choice", values=tuple(args))


def _parse_numbers(key: str, kind: str, args: Any, lengths: tuple[int, ...], form: str,
                   problems: list[str]) -> tuple[float, ...] | None:
    if not isinstance(args, list) or len(args) not in lengths:
        problems.append(f"{key}: {kind} needs a list {form}, got {args!r}")
        return None
    out = []
    for v in args:
        if isinstance(v, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if not _is_number(v) or not math.isfinite(v):
            problems.append(f"{key}: {kind} {form} must be finite numbers, got {args!r}")
            return None
        out.append(v)
    return tuple(out)


def _parse_when(name: str, when: Any, declared: dict[str, Param | None], all_names: list[str],
                problems: list[str]) -> tuple[tuple[str, tuple], ...] | None:
    key = f"space.{name}.when"
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        problems.append(f"{key}: expected a mapping {{earlier_param: value or [values]}}, got {when!r}")
        return None
    out = []
    ok = True
    for cond, allowed in when.items():
        values = allowed if isinstance(allowed, list) else [allowed]
        if not values or not all(isinstance(v, Scalar) for v in values):
            problems.append(f"{key}.{cond}: expected a value or a non-empty list of values, got {allowed!r}")
            ok = False
            continue
        if cond not in declared:
            if cond == name:
                problems.append(f"{key}: a parameter cannot be conditioned on itself")
            elif cond in all_names:
                problems.append(f"{key}: conditions on {cond!r}, which is declared later; move this parameter "
                                f"below {cond!r} (conditions can only use parameters declared above)")
            else:
                earlier = ", ".join(declared) or "(none)"
                problems.append(f"{key}: conditions on unknown parameter {cond!r}; parameters declared "
                                f"above: {earlier}")
            ok = False
            continue
        cp = declared[cond]
        if cp is not None:
            if cp.kind not in ("choice", "int"):
                problems.append(f"{key}: conditions can only test choice or int parameters; {cond} is {cp.kind}")
                ok = False
                continue
            possible = [v for v in values if cp.can_take(v)]
            takes = (f"its choices: {', '.join(map(str, cp.values))}" if cp.kind == "choice"
                     else f"its range: {int(cp.low)}..{int(cp.high)} step {int(cp.step or 1)}")
            if not possible:
                problems.append(f"{key}: {cond} never takes {values if len(values) > 1 else values[0]!r} "
                                f"({takes}), so {name} would never be sampled")
                ok = False
                continue
            if len(possible) < len(values):
                never = [v for v in values if not cp.can_take(v)]
                log.warning("%s: %s never takes %s (%s)", key, cond, never, takes)
        out.append((cond, tuple(values)))
    return tuple(out) if ok else None


def _searchable_sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrialConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrialConfig)
            if dataclasses.is_dataclass(hints[f.name]) and f.name != "data"}


def _key_type(name: str) -> tuple[Any, str | None]:
    """(annotation, None) for a searchable dotted TrialConfig key, else (None, problem)."""
    sections = _searchable_sections()
    top = typing.get_type_hints(TrialConfig)
    scalars = [f for f, tp in top.items() if not dataclasses.is_dataclass(tp) and f != "output_dir"]
    valid = f"sections {', '.join(sections)} (as <section>.<field>) or {', '.join(scalars)}"
    section, _, fld = name.partition(".")
    if section == "data":
        return None, ("data settings cannot be searched: the image cache is built once per search; "
                      "set them in the data section (run one search per value)")
    if section == "output_dir":
        return None, "output_dir cannot be searched: the search gives every trial its own folder"
    if name in _UNSEARCHABLE:
        return None, f"cannot be searched: {_UNSEARCHABLE[name]}"
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


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _kind_type_problem(p: Param, ftype: Any) -> str | None:
    if p.kind == "choice":
        return None
    tp = _base_type(ftype)
    if tp is float:
        return None
    if tp is int:
        if p.kind in ("uniform", "loguniform"):
            return f"{p.kind} gives real numbers but {p.name} is an integer; use int: [low, high]"
        if p.kind == "quniform" and not all(float(x).is_integer() for x in (p.low, p.high, p.step)):
            return f"{p.name} is an integer: a quniform range needs whole low, high and q (or use int)"
        return None
    what = {bool: "true/false", str: "a name"}.get(tp, _type_name(tp))
    return f"{p.kind} gives numbers but {p.name} is {what}; use choice: [...]"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _to_field_type(value: Any, ftype: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if _base_type(ftype) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _extra_problems(cfg: TrialConfig) -> list[str]:
    """Checks across sections that TrialConfig.validate leaves to build time."""
    if cfg.model.backbone in BACKBONES:
        spec = BACKBONES.get(cfg.model.backbone)
        min_size = getattr(spec, "min_size", 0)
        if cfg.data.image_size < min_size:
            return [f"model.backbone={cfg.model.backbone!r}: needs images of at least {min_size} px "
                    f"but data.image_size is {cfg.data.image_size}"]
    return []


def _config_problems(spec: SearchSpec, point: Mapping[str, Any]) -> list[str]:
    try:
        cfg = spec.trial_config(point)
    except ConfigError as exc:
        return _lines(exc)
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as exc:
        problems = _lines(exc)
    return problems + _extra_problems(cfg)


def _satisfying(p: Param, by_name: dict[str, Param], depth: int = 0) -> dict[str, Any] | None:
    """Values of the conditioning parameters that make ``p`` active (first allowed value
    each), or None when that cannot be found."""
    point: dict[str, Any] = {}
    if depth > len(by_name):
        return None
    for cond, allowed in p.when:
        cp = by_name.get(cond)
        if cp is None:
            return None
        value = next((v for v in allowed if cp.can_take(v)), None)
        sub = _satisfying(cp, by_name, depth + 1)
        if sub is None:
            return None
        for k, v in {**sub, cond: value}.items():
            if k in point and not _same(point[k], v):
                return None
            point[k] = v
    return point


def _check_spec(spec: SearchSpec, problems: list[str]) -> None:
    s = spec.search
    # the fixed settings themselves
    base_issues = _config_problems(spec, {})
    for line in base_issues:
        problems.append(line if line.startswith("data.") else f"fixed: {line}")
    try:
        base = spec.base_config()
    except ConfigError:
        base = TrialConfig(data=spec.data)

    # every parameter's candidate values
    by_name = {p.name: p for p in spec.params}
    cache: dict[tuple, list[str]] = {}

    def issues(point: dict[str, Any]) -> list[str]:
        k = tuple(sorted((n, type(v).__name__, repr(v)) for n, v in point.items()))
        if k not in cache:
            cache[k] = _config_problems(spec, point)
        return cache[k]

    for p in spec.params:
        ctx = _satisfying(p, by_name)
        if ctx is None:
            continue
        before = set(issues(ctx))
        seen: set[str] = set()
        for v in p.candidates():
            for line in issues({**ctx, p.name: v}):
                if line not in before and (v, line) not in seen:
                    seen.add((v, line))  # type: ignore[arg-type]
                    problems.append(f"space.{p.name} = {_fmt(v)}: {line}")

    # search settings
    if s.algorithm not in ALGORITHMS:
        problems.append(f"search.algorithm={s.algorithm!r}: unknown algorithm; valid algorithms: "
                        f"{', '.join(ALGORITHMS)}")
    elif s.algorithm == "grid":
        for p in spec.params:
            if p.kind != "choice":
                problems.append(f"space.{p.name}: search.algorithm grid needs every parameter to be a choice "
                                f"list, got {p.kind}; use choice: [...] or algorithm optuna_tpe / random")
    metric = s.metric or base.loop.select_metric
    if s.metric is not None and s.metric != "val/loss" and spec.data.task in SCHEMES:
        scheme = SCHEMES.get(spec.data.task)  # (loop.select_metric is checked with the fixed settings)
        try:
            check_metric_name(s.metric, scheme.classes, list(scheme.binary_groups) or False)
        except ConfigError as exc:
            problems.append(f"search.metric: {exc}")
    if s.mode not in ("max", "min"):
        problems.append(f"search.mode={s.mode!r}: must be 'max' or 'min'")
    elif metric in LOWER_IS_BETTER and s.mode == "max":
        problems.append(f"search.mode=max: {metric} is lower-is-better; set search.mode: min")
    if s.num_samples < 1:
        problems.append(f"search.num_samples={s.num_samples}: must be >= 1")
    if s.max_concurrent < 1:
        problems.append(f"search.max_concurrent={s.max_concurrent}: must be >= 1")
    if s.time_budget_s is not None and not s.time_budget_s > 0:
        problems.append(f"search.time_budget_s={s.time_budget_s}: must be > 0 seconds, or null for no limit")
    sch = s.scheduler
    if sch.name not in SCHEDULERS:
        problems.append(f"search.scheduler.name={sch.name!r}: unknown scheduler; valid schedulers: "
                        f"{', '.join(SCHEDULERS)}")
    max_epochs = sch.max_epochs or base.loop.epochs
    if sch.max_epochs is not None and sch.max_epochs < 1:
        problems.append(f"search.scheduler.max_epochs={sch.max_epochs}: must be >= 1 (or null: loop.epochs)")
    if sch.name == "asha":
        if sch.grace_period < 1:
            problems.append(f"search.scheduler.grace_period={sch.grace_period}: must be >= 1 epoch")
        elif max_epochs >= 1 and sch.grace_period > max_epochs:
            problems.append(f"search.scheduler.grace_period={sch.grace_period}: must be <= max_epochs "
                            f"({max_epochs}); no trial would ever be stopped")
        if sch.reduction_factor < 2:
            problems.append(f"search.scheduler.reduction_factor={sch.reduction_factor}: must be >= 2 (e.g. 3)")

    # resources, tracking, storage
    r = spec.resources
    if not r.cpu > 0:
        problems.append(f"resources.cpu={r.cpu}: must be > 0 (e.g. 1)")
    if spec.storage.keep_checkpoints < 1:
        problems.append(f"storage.keep_checkpoints={spec.storage.keep_checkpoints}: must be >= 1 (e.g. 5)")
    if not r.gpu >= 0:
        problems.append(f"resources.gpu={r.gpu}: must be >= 0 (0 = CPU only; 0.25 = four trials share a GPU)")
    elif r.gpu > 1 and not float(r.gpu).is_integer():
        problems.append(f"resources.gpu={r.gpu}: more than one GPU must be a whole number")
    if r.gpu == 0 and base.loop.device.startswith("cuda"):
        problems.append(f"resources.gpu=0 with fixed.loop.device={base.loop.device!r}: trials get no GPU; "
                        "set resources.gpu (e.g. 0.5) or loop.device auto/cpu")
    for k in ("uri", "experiment", "register_model"):
        v = getattr(spec.tracking, k)
        if v is not None and not v.strip():
            problems.append(f"tracking.{k}: empty; use null for the default")
    if not spec.storage.path.strip():
        problems.append("storage.path: empty; give a folder, a shared path or an s3:// URI")


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# ---------------------------------------------------------------- what the driver hands to Ray


# How each distribution kind is suggested on an Optuna trial.
_SUGGEST: dict[str, Callable[[optuna.Trial, Param], Any]] = {
    "choice": lambda t, p: t.suggest_categorical(p.name, list(p.values)),
    "int": lambda t, p: t.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1)),
    "quniform": lambda t, p: t.suggest_float(p.name, p.low, p.high, step=p.step),
    "uniform": lambda t, p: t.suggest_float(p.name, p.low, p.high),
    "loguniform": lambda t, p: t.suggest_float(p.name, p.low, p.high, log=True),
}


@dataclass(frozen=True)
class DefineByRun:
    """The define-by-run space for Ray's ``OptunaSearch(space=...)``: suggests every
    active parameter in the file's order, skipping those whose conditions fail.
    A picklable object rather than a closure: Tune saves the searcher with it."""

    params: tuple[Param, ...]

    def __call__(self, trial: optuna.Trial) -> None:
        point: dict[str, Any] = {}
        for p in self.params:
            if p.active(point):
                point[p.name] = _SUGGEST[p.kind](trial, p)


def define_by_run(spec: SearchSpec) -> DefineByRun:
    return DefineByRun(spec.params)


def grid_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """Every combination of the choice lists with conditions applied (inactive
    parameters left out), duplicates removed, in file order."""
    not_choice = [p.name for p in spec.params if p.kind != "choice"]
    if not_choice:
        raise ConfigError(f"{spec.file}: grid search needs every parameter to be a choice list; "
                          f"not choices: {', '.join('space.' + n for n in not_choice)}")
    points: list[dict[str, Any]] = [{}]
    for p in spec.params:
        nxt = []
        for point in points:
            if p.active(point):
                nxt.extend({**point, p.name: v} for v in p.values)
            else:
                nxt.append(point)
        points = nxt
    out, seen = [], set()
    for point in points:
        k = tuple((n, type(v).__name__, repr(v)) for n, v in point.items())
        if k not in seen:
            seen.add(k)
            out.append(point)
    if spec.search.algorithm == "grid":
        log.info("grid search %r: %d grid points, one trial each (search.num_samples=%d is ignored)",
                 spec.name, len(out), spec.search.num_samples)
    return out


def optuna_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler for ``search.algorithm`` (optuna_tpe or random)."""
    s = spec.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.algorithm != "optuna_tpe":
        raise ConfigError(f"{spec.file}: search.algorithm={s.algorithm!r} has no Optuna sampler "
                          "(grid search runs grid_points())")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate TPE models parameters jointly; group (which needs multivariate)
        # models each set of parameters that appear together, as conditional spaces need;
        # constant_liar keeps parallel trials from proposing the same point.
        return optuna.samplers.TPESampler(
            seed=s.seed, multivariate=True, constant_liar=True, group=spec.has_conditions,
            n_startup_trials=min(10, max(3, s.num_samples // 3)))


__all__ = ["Param", "SchedulerSpec", "SearchSettings", "Resources", "TrackingConfig", "StorageConfig",
           "SearchSpec", "load_spec", "define_by_run", "grid_points", "optuna_sampler", "BUNDLED_DIR",
           "resolve_space_path", "bundled_spaces", "KINDS", "ALGORITHMS", "SCHEDULERS"]
