"""A finished search's report: every figure and the bootstrap intervals on the MLflow
parent run (the test figures on the best trial's run too), the study kept for Optuna's
dashboard, and `cxrtune report` as one self-contained HTML file rendered in a real
headless Chromium, found by search name, by space and by MLflow run id; bad names and a
search whose every trial failed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from servers import cxrtune, parent_and_children

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAILING_GRID = """
name: bad
data: {source: synthetic, image_size: 32, synthetic_n: 120}
fixed: {model: {backbone: convnet5}, optimizer: {name: sgd, momentum: 0.0},
        loop: {epochs: 2, batch_size: 16, max_train_batches: 2, max_eval_batches: 1}}
space:
  optimizer.lr: {choice: [1.0e+30, 1.0e+31]}
search: {algorithm: grid}
"""


def test_a_finished_search_logs_its_figures_and_intervals_to_mlflow(searched):
    cwd, summary = searched
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (parent,), kids = parent_and_children(client, "cxrtune-demo")
    assert parent.info.run_id == summary["mlflow_parent_run"]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    bundle = json.loads((Path(summary["experiment_dir"]) / "report" / "report.json").read_text())
    figures = {f["file"] for f in bundle["figures"]}
    assert {"test_confusion.png", "test_roc_pr.png", "test_calibration.png", "curves_best.png", "curves_top.png",
            "gradcam.png", "occlusion.png", "tsne.png", "search_optimization_history.png", "search_asha.png"} <= figures
    assert figures | {"report.json", "report.html"} <= logged
    # every test metric with its interval; the value inside it (they come from the same predictions)
    metrics = parent.data.metrics
    for key in ("test/f1_macro", "test/accuracy", "test/roc_auc_macro"):
        low, high = metrics[f"{key}/ci95_low"], metrics[f"{key}/ci95_high"]
        assert low <= metrics[key] <= high and low < high, (key, low, metrics[key], high)
        assert summary["test_intervals"][key] == pytest.approx([low, high])
    # the best trial's run carries its own test figures and learning curve
    (best,) = [k for k in kids if k.data.tags.get("cxrtune.best") == "true"]
    on_best = {Path(a.path).name for a in client.list_artifacts(best.info.run_id, "report")}
    assert {"test_confusion.png", "test_roc_pr.png", "test_calibration.png", "curves_best.png"} <= on_best
    assert bundle["shortcut"]["per_class"].keys() == set(summary["classes"])


def test_the_study_is_kept_beside_mlflow_for_optuna_dashboard(searched):
    cwd, summary = searched
    storage = f"sqlite:///{cwd / 'optuna.db'}"
    assert summary["optuna_dashboard"] == f"optuna-dashboard {storage}"
    study = optuna.load_study(study_name=summary["name"], storage=storage)
    ran = [t for t in summary["trials"] if t["status"] != "not_started"]
    assert len(study.trials) == len(ran)
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    for t in ran:
        if t["best"] is not None:
            assert by_id[t["trial_id"]].value == pytest.approx(t["best"])
            assert by_id[t["trial_id"]].params == t["config"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs Debian's)")
def test_cxrtune_report_is_one_offline_html_file_that_renders_in_chromium(searched, tmp_path):
    cwd, summary = searched
    out = tmp_path / "demo.html"
    proc = cxrtune(cwd, "report", "demo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"search {summary['name']!r}" in proc.stdout and str(out) in proc.stdout
    html = out.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "the report must not load anything"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    bundle = json.loads((Path(summary["experiment_dir"]) / "report" / "report.json").read_text())
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', dom)) == len(bundle["figures"])
    for table in ("split-table", "settings-table", "trials-table", "best-config", "test-metrics", "shortcut-table"):
        assert f'id="{table}"' in dom, table
    test_f1 = summary["test_metrics"]["test/f1_macro"]
    assert f"{test_f1:.4g}" in dom
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,6000", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.3  # heat maps and curves, not text
    assert pixels.std() > 0.05 and colourful.mean() > 0.01, (pixels.std(), colourful.mean())


def test_a_report_is_found_by_search_name_and_by_mlflow_run_id(searched, tmp_path):
    cwd, summary = searched
    by_name = cxrtune(cwd, "report", summary["name"], "--out", str(tmp_path / "a.html"), "--json")
    by_run = cxrtune(tmp_path, "report", summary["mlflow_parent_run"], "--out", str(tmp_path / "b.html"), "--json",
                     "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}")
    for proc in (by_name, by_run):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow run" in json.loads(by_run.stdout)["found"]
    strip = lambda p: re.sub(r"Report built in .*", "", p.read_text())  # noqa: E731
    assert strip(tmp_path / "a.html") == strip(tmp_path / "b.html")


def test_an_unknown_search_or_run_is_a_clear_error_listing_what_exists(searched):
    cwd, summary = searched
    proc = cxrtune(cwd, "report", "no-such-search")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no search report 'no-such-search'" in proc.stderr and summary["name"] in proc.stderr, proc.stderr
    proc = cxrtune(cwd, "report", "0" * 32)
    assert proc.returncode == 2 and "MLflow run 0000" in proc.stderr and "not found" in proc.stderr, proc.stderr


def test_a_search_whose_every_trial_failed_gets_a_report_that_says_so(tmp_path):
    (tmp_path / "bad.yaml").write_text(FAILING_GRID)
    proc = cxrtune(tmp_path, "search", "bad.yaml")
    assert proc.returncode == 1, proc.stderr[-3000:]
    proc = cxrtune(tmp_path, "report", "bad.yaml", "--out", "bad.html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (tmp_path / "bad.html").read_text()
    assert "Every trial of this search failed" in html and html.count("TrainingDiverged") == 2
    assert 'id="test-metrics"' not in html


def test_the_shortcut_check_reads_as_numbers_per_class(searched):
    _, summary = searched
    bundle = json.loads((Path(summary["experiment_dir"]) / "report" / "report.json").read_text())
    for row in bundle["shortcut"]["per_class"].values():
        # null: no map of the class held any evidence (Grad-CAM keeps positive evidence only)
        assert (row["outside"] is None or 0 <= row["outside"] <= 1) and isinstance(row["flag"], bool)
    assert np.isfinite(bundle["test"]["intervals"]["test/f1_macro"]).all()
