"""What the driver hands to Ray Tune: the Optuna define-by-run space, the seeded sampler
and the grid's points. Never imports Ray."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError
from .spec import Param, SearchSpec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


# How each distribution kind is suggested on an Optuna trial.
SUGGEST: dict[str, Callable[[optuna.Trial, Param], Any]] = {
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
                point[p.name] = SUGGEST[p.kind](trial, p)


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
    """The seeded Optuna sampler for ``search.algorithm`` (optuna_tpe, optuna_nsga2 or random)."""
    import optuna  # here, not at the top: `cxrtune validate` and the CLI start without it

    s = spec.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.algorithm == "optuna_nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
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


