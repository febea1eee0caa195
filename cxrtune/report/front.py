"""The Pareto front of a search that chose its tested trial by a rule (several objectives,
a select metric or cost limits) as files: a CSV of every trial's values (at its best epoch)
with its place on the front, and a scatter plot of the first objective against each other
metric the choice looked at, the front highlighted, the limits drawn and the chosen trial
marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..atomic import write_text
from ..pareto import Objective
from ..selection import direction
from .figures import new_figure, save_png

__all__ = ["FRONT_CSV", "FRONT_PNG", "front_axes", "front_table", "write_front"]

FRONT_CSV, FRONT_PNG = "pareto_front.csv", "pareto_front.png"


def front_table(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], selected: str,
                front_tests: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per trial with values (``rows`` as the search ranks them): id, status, the
    objectives and other chosen-on metrics, on_front, selected, and the test metrics of
    the front members that were tested."""
    metrics = list(dict.fromkeys(m for r in rows for m in r.get("values", {})))
    first = [o.metric for o in objectives]
    metrics = first + [m for m in metrics if m not in first]
    records = []
    for r in rows:
        if not r.get("values"):
            continue
        record = {"trial_id": r["trial_id"], "status": r["status"], "best_epoch": r["best_epoch"],
                  **{m: r["values"].get(m) for m in metrics},
                  "on_front": bool(r.get("on_front")), "selected": r["trial_id"] == selected}
        record.update(front_tests.get(r["trial_id"], {}))
        records.append(record)
    return pd.DataFrame.from_records(records)


def front_axes(objectives: Sequence[Objective], select_metric: str,
               limits: Mapping[str, float]) -> list[Objective]:
    """What the first objective is plotted against: the other objectives, then the select
    metric and the limited metrics the rule looked at (a single-objective search with
    limits has no other objective)."""
    named = [o.metric for o in objectives[1:]] + [select_metric, *limits]
    first = objectives[0].metric
    return [Objective(m, direction(m)) for m in dict.fromkeys(named) if m != first]


def _panel(ax: Any, table: pd.DataFrame, x: Objective, y: Objective, limit: float | None) -> None:
    others, front = table[~table["on_front"]], table[table["on_front"]].sort_values(x.metric)
    ax.scatter(others[x.metric], others[y.metric], s=22, color="#9aa5b1", label="trials")
    if len(front):  # a single objective with limits has none
        ax.plot(front[x.metric], front[y.metric], "-o", color="#1f4f8f", ms=6, label="Pareto front")
    chosen = table[table["selected"]]
    ax.scatter(chosen[x.metric], chosen[y.metric], s=160, marker="*", color="#d62728", zorder=3,
               label="tested and registered")
    if limit is not None:
        ax.axvline(limit, color="#d62728", ls="--", lw=1, label="select limit")
    for _, r in front.iterrows():
        ax.annotate(str(r["trial_id"]).rsplit("_", 1)[-1], (r[x.metric], r[y.metric]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{x.metric} ({'lower' if x.mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y.metric} ({'lower' if y.mode == 'min' else 'higher'} is better)")
    ax.margins(x=0.12, y=0.1)  # room for the trial labels at the edges
    ax.grid(alpha=0.3)


def write_front(out: Path, table: pd.DataFrame, objectives: Sequence[Objective], select_metric: str,
                limits: Mapping[str, float]) -> list[Path]:
    """``pareto_front.csv`` and ``pareto_front.png`` in ``out`` (the plot only when there
    is something to plot the first objective against)."""
    out.mkdir(parents=True, exist_ok=True)
    csv = write_text(out / FRONT_CSV, table.to_csv(index=False))
    axes = [a for a in front_axes(objectives, select_metric, limits) if a.metric in table]
    if not axes:
        return [csv]
    first = objectives[0]
    fig = new_figure(4.2 * len(axes), 3.8)
    for k, x in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), k + 1)
        _panel(ax, table, x, first, limits.get(x.metric))
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    on_front = int(table["on_front"].sum())
    fig.suptitle(f"Pareto front: {on_front} of {len(table)} trials" if len(objectives) > 1
                 else f"{len(table)} trials and the one search.select chose", fontsize=9)
    fig.tight_layout()
    return [csv, save_png(fig, out / FRONT_PNG)]
