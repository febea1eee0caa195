"""Reading a search-space file: locating it, --set overrides, parsing every section and
parameter (all problems collected), then :func:`check_spec`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import DataConfig, TrialConfig, apply_overrides, from_dict, read_yaml
from ..errors import ConfigError
from .check import check_spec, kind_type_problem, problem_lines
from .spec import (BUNDLED_DIR, KINDS, TOP_KEYS, Param, ReportConfig, Resources, SearchSettings, SearchSpec, StorageConfig,
                   TrackingConfig, is_number, key_type, same_value)

log = logging.getLogger(__name__)

Scalar = (str, int, float, bool, type(None))


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


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpec:
    """Read, override (``--set key=value``) and validate a search space; every problem
    is reported in one ConfigError. ``path`` may also name a bundled space.

    Overrides address the YAML: ``search.num_samples=4``, ``fixed.loop.epochs=2``,
    ``data.image_size=32``; ``space.<param>=<spec>`` replaces (or adds) a parameter,
    ``space.<param>=null`` removes it and ``space.<param>.<key>=...`` sets one key of it
    (e.g. ``space.optimizer.lr.loguniform=[1.0e-5, 1.0e-3]``)."""
    file, _how = resolve_space_path(path)
    raw = read_yaml(file)
    if not raw:
        raise ConfigError(f"{file}: the search-space file is empty; start from a bundled space "
                          f"(e.g. {BUNDLED_DIR / 'demo.yaml'}) and see `cxrtune validate --help`")
    raw = _apply_all_overrides(raw, list(overrides))
    fname = file.name
    problems: list[str] = []
    spec = _build_spec(raw, file, problems)
    if spec is not None:
        check_spec(spec, problems)
    if problems:
        lines = "\n  ".join(f"{fname}: {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"{file}: invalid search space ({n} problem{'s' if n > 1 else ''}):\n  {lines}")
    assert spec is not None
    return spec


def _apply_all_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return apply_overrides(raw, _switching_kinds(raw.get("space"), overrides), flat_sections=("space",))


def _switching_kinds(space: Any, overrides: list[str]) -> list[str]:
    """``--set space.optimizer.lr.uniform=[...]`` gives the parameter a new distribution:
    its old one is removed first (a parameter has exactly one)."""
    out = []
    entries = space if isinstance(space, Mapping) else {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for name, spec in entries.items():
            if isinstance(spec, Mapping) and key.startswith(f"space.{name}.") and key.rsplit(".", 1)[1] in KINDS:
                out += [f"space.{name}.{kind}=null" for kind in spec if kind in KINDS and kind != key.rsplit(".", 1)[1]]
        out.append(item)
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
            problems.extend(problem_lines(exc))
        else:
            good[k] = v
    return good


def _build(cls: type, good: dict[str, Any], where: str, problems: list[str]) -> Any:
    try:
        return from_dict(cls, good, where)
    except ConfigError as exc:  # a combination the key-by-key check could not see
        problems.extend(problem_lines(exc))
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
    if isinstance(search_raw, Mapping) and search_raw.get("select") == "knee":
        search_raw = {**search_raw, "select": {"knee": True}}  # select: knee
    search = _build(SearchSettings, _lenient(SearchSettings, search_raw, "search", problems), "search", problems)
    resources = _build(Resources, _lenient(Resources, raw.get("resources"), "resources", problems),
                       "resources", problems)
    tracking = _build(TrackingConfig, _lenient(TrackingConfig, raw.get("tracking"), "tracking", problems),
                      "tracking", problems)
    storage = _build(StorageConfig, _lenient(StorageConfig, raw.get("storage"), "storage", problems),
                     "storage", problems)
    report = _build(ReportConfig, _lenient(ReportConfig, raw.get("report"), "report", problems), "report", problems)

    params = _parse_space(raw.get("space"), fixed_good, problems)
    return SearchSpec(name=name, file=str(file), data=data, fixed=copy.deepcopy(fixed_good), params=params, search=search, resources=resources,
                      tracking=tracking, storage=storage, report=report)


def _parse_space(space: Any, fixed: Mapping[str, Any], problems: list[str]) -> tuple[Param, ...]:
    if not space:
        # every trial would be the same configuration: N copies of one run
        problems.append("space: no searched parameters, so every trial would train the same configuration; "
                        "add some (e.g. optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}), or train one "
                        "configuration with `cxrtune train`")
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
        ftype, problem = key_type(name)
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
            type_problem = kind_type_problem(p, ftype)
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
        if any(same_value(v, s) for s in seen):
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
        if not is_number(v) or not math.isfinite(v):
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


