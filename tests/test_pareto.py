"""Several objectives: the front and the selection rule on planted points, the cost metrics a
trial measures, the space settings and their errors, and a real multi-objective search of
tiny backbones of very different size (Ray, Optuna, MLflow, real files)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from cxrtune.config import TrialConfig
from cxrtune.cost import measure_costs
from cxrtune.cost_names import COST_METRICS
from cxrtune.errors import ConfigError
from cxrtune.model_config import ModelConfig
from cxrtune.models import build_model
from cxrtune.pareto import Objective, choose, dominates, knee_point, pareto_front
from cxrtune.space import load_spec
from servers import cxrtune, parent_and_children

F1, LAT, PARAMS = Objective("val/f1_macro", "max"), Objective("cost/latency_ms", "min"), Objective("cost/params_m", "min")


def point(f1, lat, params=1.0):
    return {"val/f1_macro": f1, "cost/latency_ms": lat, "cost/params_m": params}


# planted: a (accurate, slow), b (balanced), c (fast, poor), d dominated by b, e missing a value
PLANTED = [point(0.90, 40.0), point(0.85, 12.0), point(0.60, 2.0), point(0.80, 15.0), point(0.95, None)]


# ---------------------------------------------------------------- the front and the rule


def test_the_front_holds_exactly_the_undominated_trials():
    front = pareto_front(PLANTED, [F1, LAT])
    assert front == [0, 1, 2]
    assert dominates(PLANTED[1], PLANTED[3], [F1, LAT]) and not dominates(PLANTED[3], PLANTED[1], [F1, LAT])
    assert not dominates(PLANTED[0], PLANTED[0], [F1, LAT])  # equal points dominate nothing
    # equal points are both on the front; a third objective can bring a point back
    assert pareto_front([point(0.8, 10), point(0.8, 10)], [F1, LAT]) == [0, 1]
    with_params = PLANTED[:4] + [point(0.70, 30.0, params=0.1)]
    assert 4 in pareto_front(with_params, [F1, LAT, PARAMS]) and 4 not in pareto_front(with_params, [F1, LAT])


def test_the_rule_picks_the_best_within_limits_or_the_knee():
    objectives = [F1, LAT]
    assert choose(PLANTED, objectives, "val/f1_macro", "max", {}, knee=False).index == 4  # best F1 overall
    within = choose(PLANTED, objectives, "val/f1_macro", "max", {"cost/latency_ms": 20.0}, knee=False)
    assert within.index == 1 and "within cost/latency_ms <= 20" in within.reason
    assert within.front == (0, 1, 2)
    # the knee: nearest the ideal corner with both objectives scaled over the front
    assert knee_point(PLANTED, [0, 1, 2], objectives) == 1
    assert choose(PLANTED, objectives, "val/f1_macro", "max", {}, knee=True).index == 1
    # no trial within the limits: the best by the metric regardless, and the reason says so
    none = choose(PLANTED, objectives, "val/f1_macro", "max", {"cost/latency_ms": 1.0}, knee=False)
    assert none.index == 4 and "no trial within" in none.reason


# ---------------------------------------------------------------- what a trial measures


def test_costs_are_measured_without_touching_the_model_or_the_random_streams():
    cfg = TrialConfig(model=ModelConfig(backbone="simple_cnn"))
    model = build_model(cfg.model, 3, 32).train()
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    costs = measure_costs(model, cfg, 32, torch.device("cpu"), repeats=3)
    assert torch.equal(torch.random.get_rng_state(), before) and model.training
    assert set(costs) == set(COST_METRICS.names()) - {"cost/train_s"}
    assert costs["cost/params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    # FLOPs: a 3x3 conv's are 2 * k*k * C_in * C_out * H * W; the counter agrees on a lone conv
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 32 * 32, 3))
    flops = measure_costs(conv, cfg, 32, torch.device("cpu"), repeats=1)["cost/gflops"] * 1e9
    assert flops == 2 * 9 * 1 * 8 * 32 * 32 + 2 * 8 * 32 * 32 * 3
    assert 0 < costs["cost/latency_ms"] < costs["cost/latency_b32_ms"] * 5


# ---------------------------------------------------------------- the space


def write(tmp_path: Path, search: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent("""
        name: mo
        data: {source: synthetic, image_size: 32, synthetic_n: 120}
        space:
          model.backbone: {choice: [simple_cnn, convnet5]}
        search:
        """) + textwrap.indent(textwrap.dedent(search), "  "))
    return p


def test_objectives_and_the_rule_are_read_and_turn_cost_measuring_on(tmp_path):
    spec = load_spec(write(tmp_path, """
        objectives: [{metric: val/f1_macro}, {metric: cost/latency_ms, mode: min}]
        select: knee
        """))
    assert spec.multi_objective and spec.metric == "val/f1_macro"
    assert [(o.metric, o.mode) for o in spec.objectives] == [("val/f1_macro", "max"), ("cost/latency_ms", "min")]
    assert spec.search.select.knee and spec.cost_metrics == ("cost/latency_ms",)
    assert spec.base_config().loop.cost_repeats == spec.search.cost_repeats
    single = load_spec(write(tmp_path, "select: {max_params_m: 5}"))
    assert not single.multi_objective and single.search.select.limits() == {"cost/params_m": 5.0}
    assert single.base_config().loop.cost_repeats > 0
    assert load_spec("demo").base_config().loop.cost_repeats == 0  # nothing measured unless asked


@pytest.mark.parametrize("search, message", [
    ("objectives: [{metric: cost/latency_ms}, {metric: val/f1_macro}]", "must be a validation metric"),
    ("objectives: [{metric: val/f1_macro}, {metric: cost/speed}]", "unknown cost metric; cost metrics: "),
    ("objectives: [{metric: val/f1_macro}, {metric: cost/latency_ms, mode: max}]", "lower-is-better"),
    ("objectives: [{metric: val/f1_macro}, {metric: val/f1_macro}]", "listed twice"),
    ("metric: val/accuracy\nobjectives: [{metric: val/f1_macro}, {metric: cost/gflops}]", "set only"),
    ("select: knee", "knee needs a Pareto front"),
    ("algorithm: optuna_nsga2", "optuna_nsga2 is for several objectives"),
    ("select: {max_latency_ms: 0}", "max_latency_ms=0: must be > 0"),
    ("select: {max_fps: 3}", "unknown key"),
])
def test_bad_objective_settings_are_named_before_any_trial(tmp_path, search, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write(tmp_path, search))


# ---------------------------------------------------------------- a real search


SEARCH = """
name: mo
data: {source: synthetic, task: three_class, image_size: 32, synthetic_n: 120}
fixed:
  optimizer: {name: adam, lr: 0.003}
  loop: {epochs: 2, batch_size: 16, max_train_batches: 4, max_eval_batches: 2}
space:
  model.backbone: {choice: [simple_cnn, mobilenet_v3_large, resnet18]}
search:
  algorithm: grid
  scheduler: fifo
  # simple_cnn has the fewest parameters, mobilenet_v3_large the fewest FLOPs at 32 px:
  # whatever their F1, the front holds at least those two
  objectives: [{metric: val/f1_macro}, {metric: cost/params_m}, {metric: cost/gflops}]
  select: {max_params_m: 5}
  cost_repeats: 2
report: {explain: false, resamples: 200}
"""


def test_a_multi_objective_search_finds_its_front_and_registers_the_rules_choice(tmp_path):
    (tmp_path / "mo.yaml").write_text(SEARCH)
    proc = cxrtune(tmp_path, "search", "mo.yaml", "--json", "--test-front")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    pareto, trials = summary["pareto"], {t["trial_id"]: t for t in summary["trials"]}
    objectives = [Objective(o["metric"], o["mode"]) for o in pareto["objectives"]]
    values = {t: trials[t]["values"] for t in trials}
    assert len(pareto["front"]) >= 2
    for member in pareto["front"]:  # nothing dominates a front member; everything else is dominated
        assert not any(dominates(values[o], values[member], objectives) for o in trials)
    for other in set(trials) - set(pareto["front"]):
        assert any(dominates(values[m], values[other], objectives) for m in pareto["front"])
    # the rule: the best F1 among the trials with at most 5 M parameters (resnet18 has 11 M)
    allowed = [t for t in trials if values[t]["cost/params_m"] <= 5]
    best_f1 = max(values[t]["val/f1_macro"] for t in allowed)
    chosen = pareto["selected"]
    assert chosen == summary["best_trial"] and chosen in allowed
    assert values[chosen]["val/f1_macro"] == best_f1
    assert chosen == min((t for t in allowed if values[t]["val/f1_macro"] == best_f1), key=str)  # ties: earliest
    by_backbone = {trials[t]["config"]["model.backbone"]: values[t] for t in trials}
    assert by_backbone["resnet18"]["cost/params_m"] > 10 > by_backbone["simple_cnn"]["cost/params_m"]
    # --test-front: every member scored on the test split; the chosen one's are the summary's
    assert set(pareto["front_test"]) == set(pareto["front"]) | {chosen}
    assert pareto["front_test"][chosen] == summary["test_metrics"]

    # report: {explain: false, resamples: 200}: no Grad-CAM, occlusion, t-SNE or shortcut check
    bundle = json.loads((Path(summary["experiment_dir"]) / "report" / "report.json").read_text())
    assert "shortcut" not in bundle and bundle["test"]["resamples"] == 200
    assert not {"gradcam.png", "occlusion.png", "tsne.png"} & {f["file"] for f in bundle["figures"]}
    # the report tells the tested trial and why, and shows the front
    assert bundle["best"]["trial_id"] == chosen and bundle["best"]["chosen_by"] == pareto["reason"]
    assert bundle["pareto"]["selected"] == chosen and bundle["pareto"]["front"] == pareto["front"]
    assert {r["trial_id"] for r in bundle["pareto"]["rows"] if r["on_front"]} == set(pareto["front"])
    assert "pareto_front.png" in {f["file"] for f in bundle["figures"]}
    assert bundle["search"]["choice"] == {"objectives": "val/f1_macro (max), cost/params_m (min), cost/gflops (min)",
                                          "select": "the best by val/f1_macro within cost/params_m <= 5"}
    html = (Path(summary["experiment_dir"]) / "report" / "report.html").read_text()
    assert f"Tested trial: {chosen}" in html and 'id="front-table"' in html

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), kids = parent_and_children(client, "cxrtune-mo")
    assert parent.data.tags["cxrtune.pareto_front"] == ",".join(pareto["front"])
    assert parent.data.tags["cxrtune.selected_trial"] == chosen
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert logged == {"pareto_front.csv", "pareto_front.png"}
    table = pd.read_csv(Path(summary["experiment_dir"]) / "pareto" / "pareto_front.csv")
    assert sorted(table.loc[table["on_front"], "trial_id"]) == sorted(pareto["front"])
    assert table.loc[table["selected"], "trial_id"].tolist() == [chosen]
    # the test figures are on the tested trial's run, and on no other
    with_figures = {k.data.tags["cxrtune.trial_id"] for k in kids if client.list_artifacts(k.info.run_id, "report")}
    assert with_figures == {chosen}
    # every trial's run carries its cost metrics, each epoch
    for kid in kids:
        history = client.get_metric_history(kid.info.run_id, "cost/params_m")
        assert len(history) == 2 and np.isclose(history[0].value, by_backbone[
            next(v for k, v in kid.data.params.items() if k.endswith("model.backbone"))]["cost/params_m"])
        assert "cost/latency_ms" in kid.data.metrics and "cost/train_s" in kid.data.metrics


LIMITED = """
name: limited
data: {source: synthetic, task: three_class, image_size: 32, synthetic_n: 120}
fixed:
  optimizer: {name: adam, lr: 0.003}
  loop: {epochs: 1, batch_size: 16, max_train_batches: 4, max_eval_batches: 2}
space:
  model.backbone: {choice: [resnet18, simple_cnn]}
search: {algorithm: grid, scheduler: fifo, select: {max_params_m: 5}, cost_repeats: 2}
report: {explain: false, resamples: 100}
"""


def test_a_limit_in_a_single_objective_search_tests_the_trial_within_it(tmp_path):
    """One objective and a cost limit: no front, but the trial tested is the best within the
    limit, and the report, the plot and MLflow all speak of that trial."""
    (tmp_path / "limited.yaml").write_text(LIMITED)
    proc = cxrtune(tmp_path, "search", "limited.yaml", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    by_backbone = {t["config"]["model.backbone"]: t["trial_id"] for t in summary["trials"]}
    chosen = by_backbone["simple_cnn"]  # resnet18 has 11 M parameters
    assert summary["best_trial"] == summary["pareto"]["selected"] == chosen and summary["pareto"]["front"] == []
    results = Path(summary["experiment_dir"])
    assert imread(results / "pareto" / "pareto_front.png").shape[1] > 100
    bundle = json.loads((results / "report" / "report.json").read_text())
    assert bundle["best"]["trial_id"] == chosen
    assert bundle["search"]["choice"] == {"select": "the best by val/f1_macro within cost/params_m <= 5"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, kids = parent_and_children(client, "cxrtune-limited")
    with_figures = {k.data.tags["cxrtune.trial_id"] for k in kids if client.list_artifacts(k.info.run_id, "report")}
    assert with_figures == {chosen}


def test_the_report_names_the_tested_trial_not_the_best_by_the_metric(tmp_path, monkeypatch):
    """Planted: trial a has the best F1, the rule tested b. The report's trial section, its
    learning curves and the front table are b's; the HTML says so."""
    from cxrtune.data.pipeline import prepare_data
    from cxrtune.engine import Evaluation
    from cxrtune.report.build import ReportTrial, write_report
    from cxrtune.report.front import front_table, write_front
    from cxrtune.report.html import render

    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    spec = load_spec(write(tmp_path, "objectives: [{metric: val/f1_macro}, {metric: cost/params_m}]\n"
                                      "select: knee\nscheduler: fifo\n"), ["report.explain=false",
                                                                          "report.resamples=20"])
    data = prepare_data(spec.data, progress=False)
    history = [{"epoch": 1.0, "val/f1_macro": 0.5, "train/loss": 1.0, "val/loss": 1.1}]
    trials = [ReportTrial("a", "completed", 1, 0.9, 1, {"model.backbone": "convnet5"}, history=history),
              ReportTrial("b", "completed", 1, 0.7, 1, {"model.backbone": "simple_cnn"}, history=history)]
    rows = [{"trial_id": t.trial_id, "status": t.status, "best_epoch": 1, "on_front": True,
             "values": {"val/f1_macro": t.best, "cost/params_m": p}} for t, p in zip(trials, (1.6, 0.7))]
    pareto = {"objectives": [{"metric": "val/f1_macro", "mode": "max"}, {"metric": "cost/params_m", "mode": "min"}],
              "front": ["a", "b"], "selected": "b", "reason": "the knee of the Pareto front", "limits": {}}
    test = data.split[data.split["split"] == "test"]
    y = test["target"].map(list(data.scheme.classes).index).to_numpy()
    probs = np.full((len(y), len(data.scheme.classes)), 0.1)
    probs[np.arange(len(y)), y] = 0.8
    probs /= probs.sum(1, keepdims=True)
    ev = Evaluation({}, np.eye(3), y, probs, None, None, (0.5, 0.25), None, torch.device("cpu"))
    write_front(tmp_path / "pareto", front_table(rows, spec.objectives, "b", {}), spec.objectives,
                spec.select_metric, {})
    report = write_report(tmp_path / "bundle", spec, data, trials, ev, tested="b", pareto=pareto,
                          front_dir=tmp_path / "pareto")
    assert report["best"]["trial_id"] == "b" and report["best"]["chosen_by"] == "the knee of the Pareto front"
    titles = {f["file"]: f["title"] for f in report["figures"]}
    assert "(b)" in titles["curves_best.png"] and "pareto_front.png" in titles
    assert [(r["trial_id"], r["selected"]) for r in report["pareto"]["rows"]] == [("a", False), ("b", True)]
    html = render(tmp_path / "bundle")
    assert "Tested trial: b" in html and "Best trial" not in html and "the knee of the Pareto front" in html
