"""One source of truth for "which way is better" and for the trial the search picks:
metric directions, contradicting modes, best-so-far reporting to Optuna, ranking with
deterministic ties, and a summary that survives trials that never started."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.tune import Result

from cxrtune.errors import ConfigError
from cxrtune.search import (COMPLETED, FAILED, NOT_STARTED, STOPPED_EARLY, TrialSearcher, _check_same_space,
                            _space_record, _trial_rows, searched_metric)
from cxrtune.selection import BestSoFar, best_index, direction, rank_key, resolve_mode
from cxrtune.space import define_by_run, load_spec, optuna_sampler


@pytest.mark.parametrize("metric, mode", [
    ("val/loss", "min"), ("train/loss", "min"), ("val/ece", "min"), ("cost/latency_ms", "min"),
    ("cost/params_m", "min"), ("val/binary/ece", "min"), ("val/f1_macro", "max"), ("val/roc_auc_macro", "max"),
    ("val/sensitivity/covid", "max"), ("val/binary/accuracy", "max"),
])
def test_direction_follows_from_the_name(metric, mode):
    assert direction(metric) == mode and resolve_mode(metric, None, "x") == mode


def test_a_contradicting_mode_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"search.mode=max: val/loss is lower-is-better"):
        resolve_mode("val/loss", "max", "search.mode")
    assert resolve_mode("val/loss", "min", "search.mode") == "min"


def test_best_so_far_keeps_the_earliest_of_equal_values_and_ignores_nan():
    best = BestSoFar("val/loss", "min")
    assert [best.update(v, e) for e, v in enumerate([0.5, 0.4, 0.4, float("nan"), 0.45], 1)] == [
        True, True, False, False, False]
    assert (best.value, best.step) == (0.4, 2)
    assert best_index([0.2, 0.7, 0.7, None], "max") == 1 and best_index([None], "max") is None
    assert sorted([0.3, None, 0.9, float("nan")], key=lambda v: rank_key(v, "max"))[:2] == [0.9, 0.3]


def test_space_mode_follows_the_metric_and_contradictions_are_refused():
    spec = load_spec("demo", ["search.metric=val/loss", "search.mode=null"])
    assert spec.mode == "min"
    # the search's metric is what every trial keeps its best checkpoint by
    assert spec.base_config().loop.select_metric == "val/loss"
    with pytest.raises(ConfigError, match="val/loss is lower-is-better"):
        load_spec("demo", ["search.metric=val/loss", "search.mode=max"])
    with pytest.raises(ConfigError, match="fixed.loop.select_metric=val/accuracy"):
        load_spec("demo", ["search.metric=val/loss", "fixed.loop.select_metric=val/accuracy"])


def _searcher(max_epochs: int = 4) -> TrialSearcher:
    spec = load_spec("demo", ["search.num_samples=4"])
    return TrialSearcher(space=define_by_run(spec), metric=searched_metric(spec.metric), mode=spec.mode,
                         sampler=optuna_sampler(spec), max_epochs=max_epochs)


def _result(epoch: int, raw: float, best: float, **extra) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "val/f1_macro": raw,
            searched_metric("val/f1_macro"): best, **extra}


def test_optuna_learns_the_best_epoch_and_pruned_trials_are_told_pruned():
    import optuna

    searcher = _searcher(max_epochs=4)
    for tid in ("done", "pruned", "patience"):
        assert searcher.suggest(tid) is not None
    # a trial that peaked at epoch 2 and then got worse: Optuna must learn 0.8, not 0.3
    for epoch, raw in enumerate([0.5, 0.8, 0.4, 0.3], 1):
        searcher.on_trial_result("done", _result(epoch, raw, max(0.5, 0.8 if epoch >= 2 else 0.5)))
    searcher.on_trial_complete("done", _result(4, 0.3, 0.8))
    searcher.on_trial_result("pruned", _result(1, 0.2, 0.2))
    searcher.on_trial_complete("pruned", _result(1, 0.2, 0.2))  # ASHA stopped it at epoch 1
    searcher.on_trial_result("patience", _result(2, 0.6, 0.7))
    searcher.on_trial_complete("patience", _result(2, 0.6, 0.7, early_stopped=1.0))  # ended itself
    trials = {t.number: t for t in searcher._ot_study.trials}
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and trials[0].value == 0.8
    assert trials[1].state == optuna.trial.TrialState.PRUNED
    assert trials[2].state == optuna.trial.TrialState.COMPLETE and trials[2].value == 0.7


def _tune_result(tid: str, values: list[float] | None, *, error: Exception | None = None,
                 early_stopped: float = 0.0) -> Result:
    if values is None:  # never reported anything
        return Result(metrics=None, checkpoint=None, error=error, path=f"/x/run_trial_{tid}_7_a=1")
    df = pd.DataFrame({"epoch": range(1, len(values) + 1), "val/f1_macro": values})
    last = {"epoch": len(values), "trial_id": tid, "early_stopped": early_stopped,
            "config": {"optimizer.lr": 0.01}}
    return Result(metrics=last, checkpoint=None, error=error, path=f"/x/run_trial_{tid}", metrics_dataframe=df)


def test_rows_rank_by_best_epoch_ties_go_to_the_earliest_trial_and_unstarted_trials_survive():
    spec = load_spec("demo", ["fixed.loop.epochs=3"])
    results = [
        _tune_result("abcde_00002", [0.4, 0.9, 0.1]),  # best epoch 2: 0.9 although it ended at 0.1
        _tune_result("abcde_00001", [0.9, 0.2, 0.2]),  # the same best, created earlier: wins the tie
        _tune_result("abcde_00000", [0.3]),  # stopped by ASHA at epoch 1
        _tune_result("abcde_00003", None, error=RuntimeError("worker died")),
        _tune_result("abcde_00004", None),  # never started
        _tune_result("abcde_00005", [0.5, 0.6], early_stopped=1.0),  # ended by early stopping
    ]
    rows = _trial_rows(spec, results)
    assert [r["trial_id"] for r in rows[:4]] == ["abcde_00001", "abcde_00002", "abcde_00005", "abcde_00000"]
    assert rows[0]["best"] == 0.9 and rows[0]["best_epoch"] == 1 and rows[1]["best_epoch"] == 2
    status = {r["trial_id"]: r["status"] for r in rows}
    assert status == {"abcde_00001": COMPLETED, "abcde_00002": COMPLETED, "abcde_00005": COMPLETED,
                      "abcde_00000": STOPPED_EARLY, "abcde_00003": FAILED, "abcde_00004": NOT_STARTED}
    failed = next(r for r in rows if r["status"] == FAILED)
    assert failed["error"] == "RuntimeError: worker died" and failed["best"] is None


def test_resume_refuses_a_changed_space_naming_what_differs():
    spec = load_spec("demo")
    state = {"space": _space_record(spec)}
    _check_same_space(spec, state)  # unchanged: fine
    changed = load_spec("demo", ["search.num_samples=3", "space.optimizer.lr.loguniform=[1.0e-5, 1.0e-3]"])
    with pytest.raises(ConfigError, match=r"search.num_samples: 8 -> 3.*differs|differs.*num_samples: 8 -> 3") as exc:
        _check_same_space(changed, state)
    assert "--resume" in str(exc.value)
