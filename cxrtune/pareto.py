"""Several objectives at once: the Pareto front of a search's trials, and the rule that
picks the one trial to test and register.

A trial is a point: its objectives' values at its best epoch (the epoch its checkpoint
keeps, chosen on the first objective). Trial A dominates B when A is at least as good on
every objective and better on one; the front is the trials nothing dominates. Which
front member is "the" model is the user's call, stated in the space (``search.select``):

- ``{metric: M, max_latency_ms: 20, ...}``: among the trials within every limit, the best
  by M (default: the first objective);
- ``knee``: the front member nearest the ideal point once each objective is scaled to
  [0, 1] over the front (0 its best value on the front, 1 its worst), i.e. the most
  balanced trade-off.

When no trial is within the limits the best by M is taken anyway, with a warning: a
finished search always has a model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .selection import rank_key

log = logging.getLogger(__name__)

__all__ = ["Objective", "Choice", "dominates", "pareto_front", "knee_point", "within", "rule_text", "choose"]

Point = Mapping[str, Optional[float]]


@dataclass(frozen=True)
class Objective:
    """One objective of a search: a metric and its direction (``selection.direction``)."""

    metric: str
    mode: str  # max | min


@dataclass(frozen=True)
class Choice:
    """The trial picked, the front, and why that trial."""

    index: int  # into the points given to ``choose``
    front: tuple[int, ...]  # indices of the front members, in the order given
    reason: str


def _complete(point: Point, objectives: Sequence[Objective]) -> bool:
    return all(_number(point.get(o.metric)) for o in objectives)


def _number(value: Optional[float]) -> bool:
    return value is not None and not math.isnan(value)


def _better_or_equal(a: float, b: float, mode: str) -> bool:
    return a >= b if mode == "max" else a <= b


def dominates(a: Point, b: Point, objectives: Sequence[Objective]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    at_least = all(_better_or_equal(a[o.metric], b[o.metric], o.mode) for o in objectives)
    return at_least and any(a[o.metric] != b[o.metric] for o in objectives)


def pareto_front(points: Sequence[Point], objectives: Sequence[Objective]) -> list[int]:
    """Indices of the points no other point dominates (points missing an objective's value
    take no part), in the order given. Equal points are all on the front."""
    complete = [i for i, p in enumerate(points) if _complete(p, objectives)]
    return [i for i in complete
            if not any(dominates(points[j], points[i], objectives) for j in complete if j != i)]


def knee_point(points: Sequence[Point], front: Sequence[int], objectives: Sequence[Objective]) -> int:
    """The front member nearest the ideal point, each objective scaled to [0, 1] over the
    front (a constant objective counts 0); the earliest on ties."""
    def scaled(i: int) -> float:
        total = 0.0
        for o in objectives:
            values = [points[j][o.metric] for j in front]
            best, worst = (max(values), min(values)) if o.mode == "max" else (min(values), max(values))
            span = abs(best - worst)
            total += (abs(points[i][o.metric] - best) / span) ** 2 if span else 0.0
        return math.sqrt(total)

    return min(front, key=scaled)


def within(point: Point, limits: Mapping[str, float]) -> bool:
    """Whether every limited metric of ``point`` is known and at most its limit."""
    return all(_number(point.get(m)) and point[m] <= bound for m, bound in limits.items())


def _limits_text(limits: Mapping[str, float]) -> str:
    """``cost/latency_ms <= 20, cost/params_m <= 5``: the limits as messages name them."""
    return ", ".join(f"{m} <= {b:g}" for m, b in limits.items())


def rule_text(metric: str, limits: Mapping[str, float], knee: bool) -> str:
    """The rule as the summary, the report and the tags state it."""
    if knee:
        return "the knee of the Pareto front"
    return f"the best by {metric}" + (f" within {_limits_text(limits)}" if limits else "")


def choose(points: Sequence[Point], objectives: Sequence[Objective], metric: str, mode: str,
           limits: Mapping[str, float], knee: bool) -> Choice:
    """Pick the trial to test (see the module docstring). ``points`` are the candidates,
    best-first by the first objective; ties keep that order."""
    if not points:
        raise ValueError("no trial to choose from")
    front = tuple(pareto_front(points, objectives)) if len(objectives) > 1 else ()
    if knee and front:
        return Choice(knee_point(points, front, objectives), front, rule_text(metric, limits, knee=True))
    allowed = [i for i, p in enumerate(points) if within(p, limits)]
    if not allowed:
        shown = _limits_text(limits)
        log.warning("no trial is within %s: taking the best by %s regardless; loosen search.select's limits",
                    shown, metric)
        allowed, why = list(range(len(points))), f"the best by {metric} (no trial within {shown})"
    else:
        why = rule_text(metric, limits, knee=False)
    best = min(allowed, key=lambda i: rank_key(points[i].get(metric), mode))
    return Choice(best, front, why)
