"""The report bundle of a finished search: PNG figures and ``report.json`` in one folder.

The search's driver writes it after the best trial's test evaluation (``search._finish``)
and logs it to the MLflow parent run under ``report/``; ``cxrtune report`` renders it as
one HTML file (``report/html.py``). The explanations look at a fixed, seeded sample of
test images, not the whole split, so a search of any size is reported in under a minute
on a CPU."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..atomic import replacing_dir
from ..data.pipeline import PreparedData
from ..pareto import rule_text
from ..space.spec import SearchSpec

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
TABLE_TRIALS = 20  # rows of the trials table
CURVE_TRIALS = 5  # learning curves overlaid: the best and the next ones
OVERLAY_PER_CLASS = 4  # Grad-CAM overlays: up to this many correct and misclassified per class
OCCLUSION_PER_CLASS = 1  # occlusion costs a forward pass per patch: one correct, one wrong per class
SHORTCUT_PER_CLASS = 32  # test images per class the shortcut check averages over
TSNE_PER_SPLIT = 300
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class ReportTrial:
    """What the report shows of one trial."""

    trial_id: str
    status: str
    epochs: int
    best: Optional[float]
    best_epoch: Optional[int]
    config: dict[str, Any]
    error: Optional[str] = None
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics


@dataclass
class Figure:
    file: str
    title: str
    section: str  # test | binary | curves | search | explain


def write_report(out_dir: Path, spec: SearchSpec, data: PreparedData, trials: list[ReportTrial],
                 evaluation: Any = None, optuna_storage: Optional[str] = None, seed: int = 0,
                 tested: Optional[str] = None, pareto: Optional[dict[str, Any]] = None,
                 front_dir: Optional[Path] = None) -> dict[str, Any]:
    """Write the bundle of a search to ``out_dir`` (replaced whole, atomically) and return
    its ``report.json`` content. ``trials`` best first; ``evaluation`` is the test
    ``engine.Evaluation`` of trial ``tested`` (default: the best), None when every trial
    failed. A search that chose its tested trial by a rule passes the choice (``pareto``,
    as its summary has it) and the folder of the front's CSV and plot (``report/front.py``)."""
    start = time.perf_counter()
    with replacing_dir(Path(out_dir)) as tmp:
        figures: list[Figure] = []
        report: dict[str, Any] = {
            "name": spec.name, "space_file": spec.file, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "metric": spec.metric, "mode": spec.mode, "data": data_summary(data), "search": search_settings(spec),
            "counts": _counts(trials), "trials": [_trial_row(t) for t in trials[:TABLE_TRIALS]],
            "status": "finished" if evaluation is not None else "all_failed"}
        report["optuna"] = _search_section(spec, trials, optuna_storage, tmp, figures)
        if pareto and front_dir is not None:
            report["pareto"] = _front_section(pareto, Path(front_dir), tmp, figures)
        if evaluation is not None:
            best = next((t for t in trials if t.trial_id == tested), trials[0])
            report["best"] = {"trial_id": best.trial_id, "val": best.best, "epoch": best.best_epoch,
                              "config": best.config, "chosen_by": pareto["reason"] if pareto else None}
            report["test"] = _test_section(evaluation, data, tmp, figures, seed, spec.report.resamples)
            _curves_section([best, *(t for t in trials if t is not best)], spec.metric, tmp, figures)
            if spec.report.explain:
                report["shortcut"] = _explain_section(evaluation, data, tmp, figures, seed)
        report["figures"] = [asdict(f) for f in figures]
        report["build_s"] = round(time.perf_counter() - start, 1)
        (tmp / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=2))
    log.info("report of %s written to %s in %.0f s", spec.name, out_dir, time.perf_counter() - start)
    return report


def report_dir(spec: SearchSpec) -> Path:
    """Where a search's report bundle goes: in its results folder when that is local, else
    under the working directory (``cxrtune report RUN_ID`` reads it back from MLflow)."""
    where = spec.results_dir
    return Path(where) / "report" if "://" not in where else Path("cxrtune_runs") / spec.name / "report"


def study_storage(spec: SearchSpec, experiment: str) -> Optional[str]:
    """The Optuna RDB storage the search's study is kept in, for optuna-dashboard: beside
    MLflow's sqlite database when the search uses one, else in its local results folder
    (none when both are remote)."""
    uri = spec.tracking.resolved_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).with_name('optuna.db')}"
    if "://" not in experiment:
        return f"sqlite:///{Path(experiment) / 'optuna.db'}"
    return None


# ------------------------------------------------------------------ data and settings


def data_summary(data: PreparedData) -> dict[str, Any]:
    """Counts per split and class, patients, near-duplicates, dropped labels, skipped images."""
    split = data.split
    classes = list(data.scheme.classes)
    per_split = {}
    for name, part in split.groupby("split", sort=False):
        counts = part["target"].value_counts()
        per_split[str(name)] = {"images": len(part), "patients": int(part["patient_id"].dropna().nunique()),
                                "groups": int(part["group"].nunique()),
                                "classes": {c: int(counts.get(c, 0)) for c in classes}}
    return {"source": data.cfg.source, "task": data.cfg.task, "image_size": data.cache.size,
            "classes": classes, "splits": per_split, "images": len(split),
            "duplicate_clusters": len(data.duplicate_clusters),
            "duplicate_images": sum(len(c) for c in data.duplicate_clusters),
            "dropped": {label: {"images": n, "reason": why} for label, (n, why) in data.dropped.items()},
            "skipped_images": len(data.skipped), "split_file": str(data.split_path)}


def search_settings(spec: SearchSpec) -> dict[str, Any]:
    s = spec.search
    return {"algorithm": s.algorithm, "scheduler": asdict(s.scheduler), "metric": spec.metric,
            "mode": spec.mode, "num_samples": s.num_samples, "max_concurrent": s.max_concurrent,
            "max_epochs": spec.max_epochs, "seed": s.seed, "time_budget_s": s.time_budget_s,
            "resources": asdict(spec.resources), "space": {p.name: _param_text(p) for p in spec.params},
            "choice": _choice_settings(spec)}


def _choice_settings(spec: SearchSpec) -> dict[str, str]:
    """The settings that change what a trial reports or which trial is tested: several
    objectives, a select rule, cross-validated trials (none of them: empty)."""
    rule, out = spec.search.select, {}
    if spec.multi_objective:
        out["objectives"] = ", ".join(f"{o.metric} ({o.mode})" for o in spec.objectives)
    if rule.knee or rule.limits() or spec.select_metric != spec.metric:
        out["select"] = rule_text(spec.select_metric, rule.limits(), rule.knee)
    if spec.search.cv:
        out["cross-validation"] = (f"{spec.data.folds} folds, the fold mean reported each epoch; tested as "
                                   + ("the folds' ensemble" if spec.search.cv_test == "ensemble"
                                      else "a refit on train+val"))
    return out


def _param_text(p: Any) -> str:
    """``loguniform [0.0001, 0.01] when optimizer.sam = sam``: the entry as the space file says it."""
    what = f"{p.kind} {list(p.values)}" if p.kind == "choice" else f"{p.kind} [{p.low:g}, {p.high:g}]"
    if p.step is not None:
        what += f" step {p.step:g}"
    conditions = " and ".join(f"{name} in {list(allowed)}" for name, allowed in p.when)
    return f"{what} when {conditions}" if conditions else what


def _counts(trials: list[ReportTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    return counts


def _trial_row(t: ReportTrial) -> dict[str, Any]:
    return {k: v for k, v in asdict(t).items() if k != "history"}


# ------------------------------------------------------------------ sections


def _search_section(spec: SearchSpec, trials: list[ReportTrial], storage: Optional[str], out: Path,
                    figures: list[Figure]) -> dict[str, Any]:
    """Optuna's figures of the search and the study kept in ``storage`` for optuna-dashboard."""
    from .search_plots import dashboard_command, search_figures, study_from_trials

    rows = [{"trial_id": t.trial_id, "status": t.status, "config": t.config, "best": t.best,
             "epochs": t.epochs, "history": t.history} for t in trials]
    study = _logged("the Optuna study", lambda: study_from_trials(spec, rows, storage=storage))
    if study is None:
        return {}
    titles = {"optimization_history": "optimisation history", "param_importances": "parameter importances",
              "parallel_coordinate": "parallel coordinates", "asha": "epochs each trial reached (ASHA rungs)"}
    drawn = _logged("the search figures", lambda: search_figures(study, rows, spec, out)) or {}
    figures.extend(Figure(Path(p).name, titles.get(k, k), "search") for k, p in drawn.items())
    return {"storage": storage, "dashboard": dashboard_command(storage) if storage else None,
            "study": study.study_name}


FRONT_TEST_COLUMNS = ("test/f1_macro", "test/roc_auc_macro")  # of the front members tested


def _front_section(pareto: dict[str, Any], front_dir: Path, out: Path, figures: list[Figure]) -> dict[str, Any]:
    """How the tested trial was chosen: the objectives, the rule's reason, every trial's
    values at its best epoch (with a few test metrics of the front members that were
    tested), and the front's plot: the files the search wrote in ``front_dir``."""
    import shutil

    import pandas as pd

    from .front import FRONT_CSV, FRONT_PNG

    front = pd.read_csv(front_dir / FRONT_CSV, dtype={"trial_id": str})
    if (front_dir / FRONT_PNG).exists():
        shutil.copyfile(front_dir / FRONT_PNG, out / FRONT_PNG)
        title = (f"the Pareto front: {len(pareto['front'])} of {len(front)} trials" if len(pareto["objectives"]) > 1
                 else f"the {len(front)} trials against the limited metrics")
        figures.append(Figure(FRONT_PNG, f"{title}, the tested trial starred", "pareto"))
    keep = [c for c in front.columns if not c.startswith("test/") or c in FRONT_TEST_COLUMNS]
    return {"objectives": pareto["objectives"], "limits": pareto.get("limits", {}), "front": pareto["front"],
            "selected": pareto["selected"], "reason": pareto["reason"], "columns": keep,
            "rows": front[keep].to_dict("records")}


def _test_section(ev: Any, data: PreparedData, out: Path, figures: list[Figure], seed: int,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Test figures and every test metric with its 95 % bootstrap interval over patients."""
    from .bootstrap import bootstrap_intervals, fast_scheme_metrics
    from .figures import evaluation_figures

    drawn = evaluation_figures(ev.y_true, ev.probs, data.scheme, out, prefix="test")
    titles = {"confusion": "confusion matrix", "roc_pr": "ROC and precision-recall curves per class",
              "calibration": "reliability diagram (calibration) with its ECE"}
    for key, path in drawn.items():
        binary = key.startswith("binary_")
        title = titles.get(key.removeprefix("binary_"), key)
        figures.append(Figure(Path(path).name, f"{title}, binary groups" if binary else title,
                              "binary" if binary else "test"))
    groups = data.split.loc[data.split["split"] == "test", "group"].to_numpy()
    start = time.perf_counter()
    # the numpy metrics (tested equal to metrics.py's) make 1,000 resamples a second, not a minute
    intervals = bootstrap_intervals(ev.y_true, ev.probs, groups,
                                    partial(fast_scheme_metrics, scheme=data.scheme, prefix="test/"),
                                    n=resamples, seed=seed)
    log.info("bootstrap intervals of %d test metrics (%d resamples of %d patients) in %.1f s", len(intervals),
             resamples, len(set(groups)), time.perf_counter() - start)
    return {"metrics": ev.metrics, "intervals": {k: list(v) for k, v in intervals.items()},
            "images": len(ev.y_true), "groups": len(set(groups)), "resamples": resamples,
            "level": 0.95}


def _curves_section(trials: list[ReportTrial], metric: str, out: Path, figures: list[Figure]) -> None:
    """Learning curves of the tested trial (``trials[0]``) alone and with the next ones."""
    from .figures import learning_curves_png

    ranked = [t for t in trials if t.best is not None and t.history][:CURVE_TRIALS]
    if not ranked:
        return
    curves = {t.trial_id: t.history for t in ranked}
    learning_curves_png({ranked[0].trial_id: ranked[0].history}, metric, out / "curves_best.png",
                        best=ranked[0].trial_id)
    figures.append(Figure("curves_best.png", f"learning curves of the tested trial ({ranked[0].trial_id})",
                          "curves"))
    if len(ranked) > 1:
        learning_curves_png(curves, metric, out / "curves_top.png", best=ranked[0].trial_id)
        figures.append(Figure("curves_top.png", f"learning curves of the top {len(ranked)} trials", "curves"))


def _explain_section(ev: Any, data: PreparedData, out: Path, figures: list[Figure], seed: int) -> dict[str, Any]:
    """Grad-CAM and occlusion overlays on a fixed sample, t-SNE of the embeddings, and the
    shortcut check (Grad-CAM energy outside the body region) per class."""
    from . import explain

    start = time.perf_counter()
    backbone = ev.config.model.backbone
    rows = data.rows("test")
    names = list(data.scheme.classes)
    y_pred = ev.probs.argmax(1)
    model = ev.model.eval()

    def maps_of(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = ev.inputs(rows[index]).to(ev.device)
        return explain.gradcam_maps(model, backbone, x, ev.y_true[index].tolist()), x

    def titles(index: np.ndarray) -> list[str]:
        return [f"true {names[ev.y_true[i]]} / pred {names[y_pred[i]]} {ev.probs[i, y_pred[i]]:.2f}"
                for i in index]

    overlay = _flat(explain.explanation_sample(ev.y_true, y_pred, per_class=OVERLAY_PER_CLASS, seed=seed))
    if len(overlay):
        cams, _ = maps_of(overlay)
        explain.overlay_png(ev.images[rows[overlay]], cams, titles(overlay), out / "gradcam.png")
        figures.append(Figure("gradcam.png", "Grad-CAM: correct and misclassified test images per class", "explain"))
        occl = _flat(explain.explanation_sample(ev.y_true, y_pred, per_class=OCCLUSION_PER_CLASS, seed=seed))
        x = ev.inputs(rows[occl]).to(ev.device)
        size = x.shape[-1]
        occ = explain.occlusion_maps(model, x, ev.y_true[occl].tolist(), patch=max(size // 7, 1),
                                     stride=max(size // 14, 1))
        explain.overlay_png(ev.images[rows[occl]], occ, titles(occl), out / "occlusion.png")
        figures.append(Figure("occlusion.png", "occlusion sensitivity: where hiding a patch lowers the "
                                               "true class's probability", "explain"))
    _tsne(ev, data, model, backbone, out, figures, seed)
    shortcut = _shortcut(ev, maps_of, out, figures, seed, names)
    log.info("explanations (Grad-CAM, occlusion, t-SNE, shortcut check) in %.1f s", time.perf_counter() - start)
    return shortcut


def _shortcut(ev: Any, maps_of: Callable, out: Path, figures: list[Figure], seed: int,
              names: list[str]) -> dict[str, Any]:
    from . import explain

    rng = np.random.default_rng(seed)
    index = np.concatenate([rng.permutation(np.flatnonzero(ev.y_true == c))[:SHORTCUT_PER_CLASS]
                            for c in range(len(names))]).astype(np.int64)
    if not len(index):
        return {}
    maps = np.concatenate([maps_of(index[i:i + 64])[0] for i in range(0, len(index), 64)])
    mask = explain.body_mask(maps.shape[-1])
    return _jsonable(explain.shortcut_check(maps, ev.y_true[index], names, mask))


def _tsne(ev: Any, data: PreparedData, model: Any, backbone: str, out: Path, figures: list[Figure],
          seed: int) -> None:
    from . import explain

    rng = np.random.default_rng(seed)
    feats, labels, splits = [], [], []
    for split in ("train", "val", "test"):
        rows, targets = data.rows(split), data.targets(split)
        take = rng.permutation(len(rows))[:TSNE_PER_SPLIT]
        if not len(take):
            continue
        batches = (ev.inputs(rows[take[i:i + 64]]).to(ev.device) for i in range(0, len(take), 64))
        feats.append(explain.embeddings(model, backbone, batches))
        labels.append(targets[take])
        splits += [split] * len(take)
    if not feats:
        return
    explain.tsne_png(np.concatenate(feats), np.concatenate(labels), np.array(splits), list(data.scheme.classes),
                     out / "tsne.png", seed=seed)
    figures.append(Figure("tsne.png", "t-SNE of the penultimate layer, by class and by split", "explain"))


# ------------------------------------------------------------------ helpers


def _flat(sample: Any) -> np.ndarray:
    """The indices of ``explain.explanation_sample``'s answer, in its order."""
    parts = sample.values() if isinstance(sample, dict) else sample
    parts = [np.asarray(p, dtype=np.int64).ravel() for p in parts]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _logged(what: str, fn: Callable[[], Any]) -> Any:
    """Figures of the search are a view, not the result: a failure is logged, not raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported, and the report goes on without it
        log.warning("report: %s could not be drawn: %s: %s", what, type(exc).__name__, exc)
        return None


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, tuples and NaN as JSON can hold them (NaN as null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
