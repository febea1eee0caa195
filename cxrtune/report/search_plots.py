"""A finished search as an Optuna study, and the figures of how the search went.

Ray's ``OptunaSearch`` keeps its study in memory inside the driver, and a grid search
has no study at all, so after the search the trials are rebuilt from Tune's results
(``search._trial_rows``) as Optuna ``FrozenTrial``s: each with the distributions of the
parameters it actually sampled (taken from the space exactly as ``space.sampling``
suggests them), its best value of the search metric as the objective and that metric
per epoch as intermediate values. Written to an RDB storage, the study is what
``optuna-dashboard`` shows; in memory, it is what Optuna's figures are drawn from.

Figures: Optuna's parameter importances, parallel coordinates and optimisation history
(``optuna.visualization.matplotlib``), plus an "asha" figure of the epochs each trial
reached against the ASHA rungs. Optuna draws with pyplot and sets a global style, so
its figures are drawn on Agg inside a saved-and-restored rcParams context, and every
figure is closed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from ..selection import is_better
from ..space.sampling import SUGGEST
from ..space.spec import Param, SearchSpec
from ..tracking.common import COMPLETED, FAILED, NOT_STARTED, STOPPED_EARLY

log = logging.getLogger(__name__)

_DPI = 100
# Trial labels on the ASHA figure's axis stop being readable beyond this many trials.
_MAX_TRIAL_LABELS = 40
_STATUS_COLOURS = {COMPLETED: "#2a9d8f", STOPPED_EARLY: "#e9c46a", FAILED: "#e63946"}
_OTHER_COLOUR = "#adb5bd"
_OPTUNA_FIGURES = ("param_importances", "parallel_coordinate", "optimization_history")
_STATUS_LABELS = {COMPLETED: "completed", STOPPED_EARLY: "stopped early", FAILED: "failed",
                  NOT_STARTED: "not started"}


# ------------------------------------------------------------------ the study


def study_from_trials(spec: SearchSpec, trials: Sequence[Mapping[str, Any]], storage: Optional[str] = None,
                      study_name: Optional[str] = None) -> optuna.Study:
    """The finished search as an Optuna study: in memory, or written to the RDB ``storage``
    (e.g. ``sqlite:////abs/optuna.db``) as ``study_name`` (default: the space's name),
    replacing an earlier copy of that study and leaving the others there alone.

    ``trials``: dicts with trial_id, status, config ({dotted param: value}), best (the
    trial's best value or None) and history (per-epoch dicts with "epoch" and the metric);
    an optional "epochs" overrides the epochs counted from the history."""
    name = study_name or spec.name
    distributions = space_distributions(spec)
    frozen = [t for t in (_frozen_trial(spec, distributions, row) for row in _in_creation_order(trials))
              if t is not None]
    direction = "maximize" if spec.mode == "max" else "minimize"
    if storage is None:
        study = optuna.create_study(study_name=name, direction=direction)
    else:
        study = _fresh_stored_study(storage, name, direction)
    study.add_trials(frozen)
    log.info("optuna study %r: %d trials (%d complete)%s", name, len(frozen),
             sum(t.state == TrialState.COMPLETE for t in frozen), f" in {storage}" if storage else "")
    return study


def dashboard_command(storage: str) -> str:
    """The command line that opens ``storage``'s studies in optuna-dashboard."""
    return f"optuna-dashboard {shlex.quote(storage)}"


def _fresh_stored_study(url: str, name: str, direction: str) -> optuna.Study:
    """An empty study ``name`` in the RDB at ``url``: an earlier rebuild of the same search
    is deleted first, so rebuilding never duplicates its trials."""
    _make_sqlite_folder(url)
    rdb = optuna.storages.RDBStorage(url)
    with contextlib.suppress(KeyError):  # KeyError: no earlier copy to replace
        optuna.delete_study(study_name=name, storage=rdb)
    return optuna.create_study(storage=rdb, study_name=name, direction=direction)


def _make_sqlite_folder(url: str) -> None:
    """sqlite creates the database file but not the folder it goes in."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix):] not in ("", ":memory:"):
        Path(url[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)


def _in_creation_order(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Tune numbers its trials ..._00000, ..._00001 in creation order; Optuna numbers the
    rebuilt ones in the order they are added, so the optimisation history reads in time."""
    def key(row: Mapping[str, Any]) -> int:
        tail = str(row.get("trial_id") or "").rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else 1 << 30

    return sorted(trials, key=key)  # stable: ids without a number keep their given order


def _frozen_trial(spec: SearchSpec, distributions: Mapping[str, BaseDistribution],
                  row: Mapping[str, Any]) -> Optional[FrozenTrial]:
    """One trial as Optuna records it; None for a trial that never started."""
    status = str(row.get("status"))
    if status == NOT_STARTED:
        return None
    value = _finite_or_none(row.get("best"))
    state = TrialState.COMPLETE if value is not None and status != FAILED else TrialState.FAIL
    params, dists = _sampled(spec, distributions, row)
    return optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None,
        params=params, distributions=dists,
        intermediate_values=_per_epoch(row.get("history") or [], spec.metric),
        user_attrs={"trial_id": str(row.get("trial_id")), "status": status, "epochs": epochs_reached(row)})


def _finite_or_none(value: Any) -> Optional[float]:
    """A trial's best as Optuna takes an objective value (a NaN best is no value)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _per_epoch(history: Sequence[Mapping[str, Any]], metric: str) -> dict[int, float]:
    return {int(h["epoch"]): float(h[metric]) for h in history
            if h.get("epoch") is not None and h.get(metric) is not None}


def epochs_reached(row: Mapping[str, Any]) -> int:
    """The epochs a trial trained: its "epochs" when given, else its history's last epoch."""
    if row.get("epochs") is not None:
        return int(row["epochs"])
    epochs = [int(h["epoch"]) for h in row.get("history") or [] if h.get("epoch") is not None]
    return max(epochs, default=0)


def _sampled(spec: SearchSpec, distributions: Mapping[str, BaseDistribution],
             row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The params the trial sampled and their distributions, in the space's order. A value
    the space cannot give (the search ran an older version of the file) is left out with
    a warning: the rest of the trial still counts."""
    config = dict(row.get("config") or {})
    known = {p.name: p for p in spec.params}
    for name in config.keys() - known.keys():
        log.warning("trial %s: %s=%r is not a parameter of space %r; left out of the study",
                    row.get("trial_id"), name, config[name], spec.name)
    params: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}
    for p in spec.params:
        if p.name not in config:
            continue
        value = config[p.name]
        if not _fits(p, distributions[p.name], value):
            log.warning("trial %s: %s=%r is outside its distribution in space %r (%s); left out of the study",
                        row.get("trial_id"), p.name, value, spec.name, distributions[p.name])
            continue
        params[p.name], dists[p.name] = value, distributions[p.name]
    return params, dists


def space_distributions(spec: SearchSpec) -> dict[str, BaseDistribution]:
    """Each parameter's Optuna distribution, made by suggesting it with the very calls the
    search's define-by-run space makes (``space.sampling``), so the rebuilt trials carry
    the distributions the search sampled from by construction. A FixedTrial (at values
    the space can give) records them without a study; conditions are ignored: here every
    parameter is wanted."""
    scratch = optuna.trial.FixedTrial({p.name: p.candidates()[0] for p in spec.params})
    for p in spec.params:
        SUGGEST[p.kind](scratch, p)
    return dict(scratch.distributions)


def _fits(param: Param, distribution: BaseDistribution, value: Any) -> bool:
    """Whether the space could have sampled ``value`` and Optuna will store it as given
    (the space tells True from 1, Optuna does not)."""
    if not param.can_take(value):
        return False
    try:  # Optuna's own check, the one a FrozenTrial runs
        optuna.trial.create_trial(params={param.name: value}, distributions={param.name: distribution}, value=0.0)
    except (ValueError, TypeError):
        return False
    return True


# ------------------------------------------------------------------ figures


def search_figures(study: optuna.Study, trials: Sequence[Mapping[str, Any]], spec: SearchSpec,
                   out_dir: Path | str) -> dict[str, Path]:
    """PNG figures of the search in ``out_dir``: Optuna's param_importances,
    parallel_coordinate and optimization_history, and the "asha" figure. A figure the
    search cannot give (too few complete trials, nothing that varies) is skipped with the
    reason logged; a figure that fails to draw is skipped with a warning. Returns the
    figures written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, Path] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for key, reason in _optuna_figure_plan(complete).items():
        if reason:
            log.info("search figure %s skipped: %s", key, reason)
            continue
        path = _logged_figure(key, lambda k=key: _optuna_png(k, study, complete, spec, out / f"search_{k}.png"))
        if path is not None:
            drawn[key] = path
    asha = _logged_figure("asha", lambda: asha_png(trials, spec, out / "search_asha.png"))
    if asha is not None:
        drawn["asha"] = asha
    return drawn


def _optuna_figure_plan(complete: Sequence[FrozenTrial]) -> dict[str, str]:
    """Each Optuna figure, with why it cannot be drawn ("" when it can)."""
    if not complete:
        return dict.fromkeys(_OPTUNA_FIGURES, "no trial completed with a value")
    plan = dict.fromkeys(_OPTUNA_FIGURES, "")
    if len(complete) < 2:
        plan["param_importances"] = f"needs at least 2 complete trials, the search has {len(complete)}"
    elif not _varying_params(complete):
        plan["param_importances"] = "no parameter took more than one value in the complete trials"
    if not any(t.params for t in complete):
        plan["parallel_coordinate"] = "no complete trial has a parameter"
    return plan


def _varying_params(complete: Sequence[FrozenTrial]) -> list[str]:
    """Parameters that took at least two values among the complete trials (importance is
    only defined for those)."""
    values: dict[str, set[str]] = {}
    for t in complete:
        for name, value in t.params.items():
            values.setdefault(name, set()).add(repr(value))
    return sorted(n for n, v in values.items() if len(v) > 1)


def _logged_figure(key: str, draw: Callable[[], Path]) -> Optional[Path]:
    """Draw one figure; a figure that cannot be drawn costs that figure, not the others."""
    try:
        return draw()
    except Exception as exc:  # noqa: BLE001 - one figure is not worth the whole report
        log.warning("search figure %s not drawn: %s: %s", key, type(exc).__name__, exc, exc_info=True)
        return None


def _optuna_png(key: str, study: optuna.Study, complete: Sequence[FrozenTrial], spec: SearchSpec,
                path: Path) -> Path:
    from optuna.visualization import matplotlib as ovm

    # Optuna's warnings about a small search (a single value on an axis, an importance from
    # few trials) are worth a line in the log, not a warning per figure on stderr.
    with warnings.catch_warnings(record=True) as caught, _pyplot_on_agg():
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental API
        if key == "param_importances":
            ax = ovm.plot_param_importances(study, params=_varying_params(complete), target_name=spec.metric)
        elif key == "parallel_coordinate":
            ax = ovm.plot_parallel_coordinate(study, target_name=spec.metric)
        else:
            ax = ovm.plot_optimization_history(study, target_name=spec.metric)
        fig = ax.figure
        if key == "parallel_coordinate":  # one axis per parameter: widen with their number
            n_params = len({n for t in complete for n in t.params})
            fig.set_size_inches(max(6.4, 1.3 * (n_params + 1)), 4.8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    for w in caught:
        log.info("search figure %s: %s", key, w.message)
    return path


@contextlib.contextmanager
def _pyplot_on_agg() -> Iterator[None]:
    """pyplot on the Agg backend for the duration, with the backend, rcParams and open
    figures of the rest of the process as they were: Optuna's figures call
    ``plt.style.use("ggplot")`` (a global change) and open pyplot figures (GUI windows on
    an interactive backend). Every figure opened meanwhile is closed."""
    import matplotlib
    import matplotlib.pyplot as plt

    # resolves the backend as pyplot's first use would, so that it can be put back
    previous = matplotlib.get_backend()
    switch = previous.lower() != "agg"
    before = set(plt.get_fignums())
    with matplotlib.rc_context():
        if switch:
            plt.switch_backend("agg")
        try:
            yield
        finally:
            for num in set(plt.get_fignums()) - before:  # those of a plot that failed midway too
                plt.close(num)
            if switch:
                plt.switch_backend(previous)


def asha_rungs(spec: SearchSpec) -> list[int]:
    """The epochs at which ASHA compares trials: grace_period * reduction_factor**k below
    max_epochs (as Ray's ASHAScheduler places them); none for FIFO."""
    s = spec.search.scheduler
    if s.name != "asha" or s.grace_period < 1 or s.reduction_factor < 2:
        return []
    rungs, rung = [], s.grace_period
    while rung < spec.max_epochs:
        rungs.append(rung)
        rung *= s.reduction_factor
    return rungs


def best_trial_id(trials: Sequence[Mapping[str, Any]], mode: str) -> Optional[str]:
    """The trial with the best value that did not fail (the earlier of equal ones)."""
    best_id, best = None, None
    for row in _in_creation_order(trials):
        value = _finite_or_none(row.get("best"))
        if row.get("status") != FAILED and is_better(value, best, mode):
            best_id, best = str(row.get("trial_id")), value
    return best_id


def asha_png(trials: Sequence[Mapping[str, Any]], spec: SearchSpec, path: Path | str) -> Path:
    """Save :func:`asha_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    asha_figure(trials, spec).savefig(path, format="png", bbox_inches="tight")
    return path


def asha_figure(trials: Sequence[Mapping[str, Any]], spec: SearchSpec) -> Any:
    """One bar per trial (in creation order, top to bottom) as long as the epochs it
    reached, coloured by how it ended, with the ASHA rungs (lines with gid "asha-rung")
    and max_epochs as vertical lines and the best trial starred: where the scheduler
    cut the field. A pyplot-free matplotlib Figure."""
    rows = _in_creation_order(trials)
    fig = _new_figure(8.0, min(2.0 + 0.28 * max(len(rows), 1), 20.0))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [epochs_reached(r) for r in rows]
    colours = [_STATUS_COLOURS.get(str(r.get("status")), _OTHER_COLOUR) for r in rows]
    ax.barh(range(len(rows)), epochs, color=colours, height=0.7)
    for rung in asha_rungs(spec):
        ax.axvline(rung, color="#264653", linestyle="--", linewidth=1, gid="asha-rung")
        ax.text(rung, 1.0, f" rung {rung}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    ax.axvline(spec.max_epochs, color="black", linewidth=1, gid="max-epochs")
    ax.text(spec.max_epochs, 1.0, " max", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    _mark_best(ax, rows, epochs, spec.mode)
    _trial_axis(ax, rows)
    ax.set_xlim(0, spec.max_epochs * 1.05 + 0.25)
    ax.set_xlabel("epochs reached")
    ax.set_title(_scheduler_title(spec), pad=14)
    _status_legend(ax, rows)
    return fig


def _scheduler_title(spec: SearchSpec) -> str:
    s = spec.search.scheduler
    if s.name == "asha":
        return f"{spec.name}: ASHA (grace period {s.grace_period}, reduction factor {s.reduction_factor})"
    return f"{spec.name}: {s.name.upper()} (no early stopping)"


def _new_figure(width: float, height: float) -> Any:
    """A pyplot-free figure on an Agg canvas (nothing global to restore or close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _mark_best(ax: Any, rows: Sequence[Mapping[str, Any]], epochs: Sequence[int], mode: str) -> None:
    best = best_trial_id(rows, mode)
    for i, row in enumerate(rows):
        if str(row.get("trial_id")) == best:
            ax.plot([epochs[i]], [i], marker="*", markersize=14, color="#1d3557", linestyle="none",
                    label=f"best: {best} ({float(row['best']):.4g})")


def _trial_axis(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)  # first trial at the top
    if len(rows) <= _MAX_TRIAL_LABELS:
        ax.set_yticks(range(len(rows)), labels=[str(r.get("trial_id")) for r in rows], fontsize=8)
    else:
        ax.set_ylabel(f"{len(rows)} trials, in creation order")
        ax.set_yticks([])


def _status_legend(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Legend entries for the statuses present (and the best-trial marker)."""
    from matplotlib.patches import Patch

    present = list(dict.fromkeys(str(r.get("status")) for r in rows))
    handles = [Patch(color=_STATUS_COLOURS.get(s, _OTHER_COLOUR), label=_STATUS_LABELS.get(s, s)) for s in present]
    handles += ax.get_legend_handles_labels()[0]
    if handles:
        # beside the axes: inside, it would cover the bars of the last trials
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
