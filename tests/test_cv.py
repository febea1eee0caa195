"""Cross-validated trials: the folds' means against separate runs of each fold, a failing
fold named, the ensemble and the refit, and a real cross-validated search (Ray, MLflow,
the registered ensemble predicting the test split as the search scored it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from cxrtune.config import TrialConfig, from_dict
from cxrtune.cv import FoldFailed, evaluate_ensemble, fit_cv, fold_data, refit_and_evaluate, refit_data
from cxrtune.data.labels import SCHEMES
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import fit
from cxrtune.metrics import scheme_metrics
from servers import TINY, cxrtune, parent_and_children

FOLDS = 3


def small_cfg(home: Path, **loop) -> TrialConfig:
    return from_dict(TrialConfig, {
        "data": {"root": str(home / "synthetic"), "cache_dir": str(home / "cache"), "image_size": 32,
                 "synthetic_n": 120, "folds": FOLDS},
        "model": {"backbone": "convnet5"},
        "loop": {"epochs": 3, "batch_size": 16, "max_train_batches": 3, "max_eval_batches": 2, "device": "cpu",
                 **loop}})


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("cv-home")


@pytest.fixture(scope="module")
def data(home):
    return prepare_data(small_cfg(home).data, progress=False)


def test_each_fold_validates_on_its_own_fold_and_trains_on_the_rest(data):
    pool = data.split[data.split["split"] != "test"]
    for k in range(FOLDS):
        split = fold_data(data, k).split
        assert (split.loc[split["split"] == "val", "fold"] == k).all()
        assert (split.loc[split["split"] == "train", "fold"] != k).all()
        assert split["split"].eq("test").sum() == data.split["split"].eq("test").sum()
        assert len(split[split["split"] != "test"]) == len(pool)
    refit = refit_data(data).split
    assert sorted(refit.loc[refit["split"] == "train", "path"]) == sorted(pool["path"])


def test_the_reported_epochs_are_the_means_of_separate_runs_of_each_fold(home, data, tmp_path):
    cfg = small_cfg(home)
    reported: list[dict] = []
    checkpoints: list[Path] = []

    def report(metrics, checkpoint):
        reported.append(metrics)
        checkpoints.append(checkpoint)

    state = fit_cv(cfg, data, report, workdir=tmp_path / "cv")
    # each fold trained alone, straight through: the lock-step run is each of them exactly
    alone = [fit(cfg, fold_data(data, k), workdir=tmp_path / f"alone{k}").history for k in range(FOLDS)]
    assert [m["epoch"] for m in reported] == [1, 2, 3]
    for e, metrics in enumerate(reported):
        per_fold = [alone[k][e]["val/f1_macro"] for k in range(FOLDS)]
        assert [metrics[f"cv/fold{k}/val/f1_macro"] for k in range(FOLDS)] == per_fold
        assert metrics["val/f1_macro"] == pytest.approx(np.mean(per_fold), abs=1e-12)
        assert metrics["cv/std/val/f1_macro"] == pytest.approx(np.std(per_fold), abs=1e-12)
        assert metrics["val/loss"] == pytest.approx(np.mean([alone[k][e]["val/loss"] for k in range(FOLDS)]))
    means = [m["val/f1_macro"] for m in reported]
    assert state["best_epoch"] == int(np.argmax(means)) + 1 == reported[-1]["best_epoch"]

    # the ensemble of the best epoch's checkpoint: the mean of the fold models' probabilities
    ev = evaluate_ensemble(checkpoints[-1], data, "test")
    x, ensemble = ev.inputs(data.rows("test")), ev.model.eval()
    with torch.no_grad():
        expected = torch.stack([torch.softmax(net(x * ensemble.scales[k] + ensemble.shifts[k]), 1)
                                for k, net in enumerate(ensemble.members)]).mean(0).numpy()
    assert np.allclose(ev.probs, expected, atol=1e-6)
    assert {f"test/fold{k}/f1_macro" for k in range(FOLDS)} <= set(ev.metrics)
    # a refit on train+val: the same configuration, trained on every non-test image
    refit = refit_and_evaluate(checkpoints[-1], data, best_epoch=2)
    assert refit.model is not ev.model and "test/f1_macro" in refit.metrics


def test_a_failing_fold_fails_the_trial_naming_the_fold(home, data, tmp_path):
    diverging = from_dict(TrialConfig, {"data": {"root": str(home / "synthetic"), "cache_dir": str(home / "cache"),
                                                 "image_size": 32, "synthetic_n": 120, "folds": FOLDS},
                                        "model": {"backbone": "convnet5"},
                                        "optimizer": {"name": "sgd", "lr": 1.0e+30, "momentum": 0.0},
                                        "loop": {"epochs": 2, "batch_size": 16, "max_train_batches": 2,
                                                 "max_eval_batches": 1, "device": "cpu"}})
    with pytest.raises(FoldFailed, match=rf"fold 0 of {FOLDS}: TrainingDiverged"):
        fit_cv(diverging, data, lambda *_: None, workdir=tmp_path / "cv")


# ---------------------------------------------------------------- a real search


def test_a_cross_validated_search_logs_every_fold_and_registers_the_ensemble(tmp_path):
    sets = [*TINY, f"data.folds={FOLDS}", "search.cv=true", "search.num_samples=2", "fixed.loop.epochs=2",
            "search.scheduler.name=fifo"]
    proc = cxrtune(tmp_path, "search", "demo", "--json", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), kids = parent_and_children(client, "cxrtune-demo")
    assert parent.data.params["cv"] == "True"
    for kid in kids:  # the trial's value each epoch is the mean of its folds'
        history = {m.step: m.value for m in client.get_metric_history(kid.info.run_id, "val/f1_macro")}
        folds = [{m.step: m.value for m in client.get_metric_history(kid.info.run_id, f"cv/fold{k}/val/f1_macro")}
                 for k in range(FOLDS)]
        assert sorted(history) == [1, 2]
        for step, value in history.items():
            assert value == pytest.approx(np.mean([f[step] for f in folds]), abs=1e-9)
    assert {f"test/fold{k}/f1_macro" for k in range(FOLDS)} <= set(parent.data.metrics)
    # the summary gives the spread over folds of the tested trial at its best epoch
    (best,) = [k for k in kids if k.data.tags["cxrtune.trial_id"] == summary["best_trial"]]
    at_best = [next(m.value for m in client.get_metric_history(best.info.run_id, f"cv/fold{k}/val/f1_macro")
                    if m.step == summary["best_epoch"]) for k in range(FOLDS)]
    assert summary["cv"] == {"folds": FOLDS, "test": "ensemble", "std": pytest.approx(np.std(at_best), abs=1e-9)}
    bundle = json.loads((Path(summary["experiment_dir"]) / "report" / "report.json").read_text())
    assert bundle["search"]["choice"]["cross-validation"].startswith(f"{FOLDS} folds")

    # the registered model is the ensemble: it predicts the test split as the search scored it
    import mlflow.pyfunc

    from cxrtune.tracking import using_tracking_uri

    (csv,) = [a.path for a in client.list_artifacts(parent.info.run_id) if a.path.endswith(".csv")
              and "removed" not in a.path]
    split = pd.read_csv(client.download_artifacts(parent.info.run_id, csv, str(tmp_path / "split")))
    test = split[split["split"] == "test"].reset_index(drop=True)
    with using_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model("models:/cxrtune-best/1")
    assert model.unwrap_python_model().classifier.spec.folds == FOLDS
    classes = summary["classes"]
    probs = model.predict(pd.DataFrame({"path": test["path"].tolist()}))[classes].to_numpy(np.float32)
    scheme = SCHEMES.get("three_class")
    scored = scheme_metrics(np.array([scheme.index_of(t) for t in test["target"]]), probs, scheme, "test/")
    for key in ("test/f1_macro", "test/accuracy", "test/roc_auc_macro"):
        assert scored[key] == pytest.approx(summary["test_metrics"][key], abs=1e-6), key
