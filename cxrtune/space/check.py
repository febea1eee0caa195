"""Checks of a parsed search space that need the components: each parameter's candidate
values probed through the trial config they give, and the search, resources and
tracking settings."""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..config import TrialConfig, type_name
from ..data.labels import SCHEMES
from ..data.source_check import check_source
from ..errors import ConfigError, CxrtuneError
from ..metrics import check_metric_name
from ..model_config import BACKBONES, imagenet_weights_file
from ..selection import resolve_mode
from ..cost_names import COST_METRICS, cost_metric
from .spec import ALGORITHMS, COST_PREFIX, CV_TESTS, SCHEDULERS, Param, SearchSpec, base_type, same_value


def problem_lines(exc: ConfigError) -> list[str]:
    """The problem lines of a (possibly multi-section) ConfigError, without headers."""
    out = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"(\S+: )?invalid .*:", line):
            continue
        out.append(line)
    return out


def kind_type_problem(p: Param, ftype: Any) -> str | None:
    if p.kind == "choice":
        return None
    tp = base_type(ftype)
    if tp is float:
        return None
    if tp is int:
        if p.kind in ("uniform", "loguniform"):
            return f"{p.kind} gives real numbers but {p.name} is an integer; use int: [low, high]"
        if p.kind == "quniform" and not all(float(x).is_integer() for x in (p.low, p.high, p.step)):
            return f"{p.name} is an integer: a quniform range needs whole low, high and q (or use int)"
        return None
    what = {bool: "true/false", str: "a name"}.get(tp, type_name(tp))
    return f"{p.kind} gives numbers but {p.name} is {what}; use choice: [...]"


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
        return problem_lines(exc)
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as exc:
        problems = problem_lines(exc)
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
            if k in point and not same_value(point[k], v):
                return None
            point[k] = v
    return point


def check_spec(spec: SearchSpec, problems: list[str]) -> None:
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
    fixed_metric = (spec.fixed.get("loop") or {}).get("select_metric")
    if s.metric is not None and fixed_metric is not None and fixed_metric != s.metric:
        problems.append(f"search.metric={s.metric} but fixed.loop.select_metric={fixed_metric}: trials would "
                        "keep their best epoch by one and be ranked by the other; set only one of them")
    try:
        resolve_mode(metric, s.mode, "search.mode")
    except ConfigError as exc:
        problems.append(str(exc))
    _check_objectives(spec, base, problems)
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
        problems.append(f"storage.keep_checkpoints={spec.storage.keep_checkpoints}: must be >= 1 (1 keeps the best and the latest)")
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
    if spec.report.resamples < 1:
        problems.append(f"report.resamples={spec.report.resamples}: must be >= 1 (1000 gives stable 95 % intervals)")
    if not spec.storage.path.strip():
        problems.append("storage.path: empty; give a folder, a shared path or an s3:// URI")


def _metric_problem(spec: SearchSpec, name: str, where: str) -> str | None:
    """Why ``name`` is not a metric a trial reports (a validation metric or a cost), or None."""
    if cost_metric(name):
        return None
    if name.startswith(COST_PREFIX):
        return f"{where}={name}: unknown cost metric; cost metrics: {', '.join(COST_METRICS.names())}"
    if name == "val/loss" or spec.data.task not in SCHEMES:
        return None
    scheme = SCHEMES.get(spec.data.task)
    try:
        check_metric_name(name, scheme.classes, list(scheme.binary_groups) or False)
    except ConfigError as exc:
        return f"{where}: {exc}"
    return None


def _check_objectives(spec: SearchSpec, base: TrialConfig, problems: list[str]) -> None:
    """search.objectives, search.select and search.cost_repeats."""
    s = spec.search
    names = [o.metric for o in s.objectives]
    for i, o in enumerate(s.objectives):
        where = f"search.objectives[{i}].metric"
        problem = _metric_problem(spec, o.metric, where)
        if problem:
            problems.append(problem)
        try:
            resolve_mode(o.metric, o.mode, f"search.objectives[{i}].mode")
        except ConfigError as exc:
            problems.append(str(exc))
    if len(set(names)) < len(names):
        problems.append(f"search.objectives: a metric is listed twice ({', '.join(names)}); list each once")
    if names and cost_metric(names[0]):
        problems.append(f"search.objectives[0].metric={names[0]}: the first objective is what trials keep their "
                        "best epoch by and ASHA compares, so it must be a validation metric (e.g. val/f1_macro); "
                        "put the cost metrics after it")
    if names and s.metric is not None and s.metric != names[0]:
        problems.append(f"search.metric={s.metric} and search.objectives[0].metric={names[0]}: the first "
                        "objective is the search's metric; set only search.objectives")
    if s.algorithm == "optuna_nsga2" and len(names) < 2:
        problems.append("search.algorithm=optuna_nsga2 is for several objectives: list them in "
                        "search.objectives, or use optuna_tpe")
    rule = s.select
    if rule.metric is not None:
        problem = _metric_problem(spec, rule.metric, "search.select.metric")
        if problem:
            problems.append(problem)
    if rule.knee and len(names) < 2:
        problems.append("search.select: knee needs a Pareto front: list two or more search.objectives")
    if rule.knee and (rule.metric is not None or rule.limits()):
        problems.append("search.select: knee picks the trial itself; remove metric and the max_ limits, or knee")
    for metric, bound in rule.limits().items():
        if not bound > 0:
            problems.append(f"search.select.max_{metric[len(COST_PREFIX):]}={bound:g}: must be > 0")
    if s.cv and spec.data.folds < 2:
        problems.append(f"search.cv: true needs folds: set data.folds (e.g. 5; it is {spec.data.folds})")
    if s.cv_test not in CV_TESTS:
        problems.append(f"search.cv_test={s.cv_test!r}: must be one of {', '.join(CV_TESTS)}")
    if s.cost_repeats < 1:
        problems.append(f"search.cost_repeats={s.cost_repeats}: must be >= 1 (timed passes per latency)")
    if spec.cost_metrics and base.loop.cost_repeats < 1:
        problems.append(f"fixed.loop.cost_repeats=0 but the search uses {', '.join(spec.cost_metrics)}: remove "
                        "it (search.cost_repeats sets it) or set it >= 1")


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)




def _values(spec: SearchSpec, key: str, fixed: Any) -> list[Any]:
    """Every value ``key`` can take in a trial: its choices when searched, else the fixed one."""
    p = next((p for p in spec.params if p.name == key), None)
    return list(p.values) if p is not None and p.kind == "choice" else [fixed]


def check_inputs(spec: SearchSpec) -> None:
    """What a YAML check cannot see, on this machine: the dataset is where data.root says
    and the adapter finds images there; every ImageNet weights file a trial may load is in
    the local torch cache (nothing is downloaded). Raises one error naming each problem."""
    problems = []
    try:
        check_source(spec.data)
    except CxrtuneError as exc:
        problems.append(str(exc))
    base = spec.base_config().model
    if "imagenet" in _values(spec, "model.weights", base.weights):
        for backbone in _values(spec, "model.backbone", base.backbone):
            if backbone in BACKBONES and BACKBONES.get(backbone).weights_enum is not None:
                path, url = imagenet_weights_file(backbone)
                if not path.is_file():
                    problems.append(f"model.weights=imagenet: {backbone}'s weights are not in the local torch "
                                    f"cache ({path}); download {url} there on a machine with internet (every "
                                    "node of a cluster needs it), or set TORCH_HOME to where it is")
    if problems:
        raise ConfigError(f"{spec.file}:\n  " + "\n  ".join(problems))
