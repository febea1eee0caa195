"""The Pareto front of a multi-objective search as files: a CSV of every trial's objectives
(at its best epoch) with its place on the front, and a scatter plot of the first objective
against each other one with the front highlighted and the chosen trial marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..atomic import write_text
from ..pareto import Objective
from .figures import new_figure, save_png

__all__ = ["FRONT_CSV", "FRONT_PNG", "front_table", "write_front"]

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


def _panel(ax: Any, table: pd.DataFrame, x: Objective, y: Objective) -> None:
    others, front = table[~table["on_front"]], table[table["on_front"]].sort_values(x.metric)
    ax.scatter(others[x.metric], others[y.metric], s=22, color="#9aa5b1", label="trials")
    ax.plot(front[x.metric], front[y.metric], "-o", color="#1f4f8f", ms=6, label="Pareto front")
    chosen = table[table["selected"]]
    ax.scatter(chosen[x.metric], chosen[y.metric], s=160, marker="*", color="#d62728", zorder=3,
               label="tested and registered")
    for _, r in front.iterrows():
        ax.annotate(str(r["trial_id"]).rsplit("_", 1)[-1], (r[x.metric], r[y.metric]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{x.metric} ({'lower' if x.mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y.metric} ({'lower' if y.mode == 'min' else 'higher'} is better)")
    ax.grid(alpha=0.3)


def write_front(out: Path, table: pd.DataFrame, objectives: Sequence[Objective]) -> list[Path]:
    """``pareto_front.csv`` and ``pareto_front.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    csv = write_text(out / FRONT_CSV, table.to_csv(index=False))
    first, rest = objectives[0], objectives[1:]
    fig = new_figure(4.2 * len(rest), 3.8)
    for k, other in enumerate(rest):
        ax = fig.add_subplot(1, len(rest), k + 1)
        _panel(ax, table, other, first)
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Pareto front: {len(table[table['on_front']])} of {len(table)} trials", fontsize=9)
    fig.tight_layout()
    return [csv, save_png(fig, out / FRONT_PNG)]
