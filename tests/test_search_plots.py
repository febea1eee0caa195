"""A finished search rebuilt as an Optuna study (in memory and in an RDB storage) and its
figures: real search spaces, trials given as data (what ``search._trial_rows`` knows)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from cxrtune.report.search_plots import (asha_figure, asha_rungs, best_trial_id, dashboard_command,
                                         search_figures, study_from_trials)
from cxrtune.space import SearchSpec, define_by_run, grid_points, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTUNA_FIGURES = {"param_importances", "parallel_coordinate", "optimization_history"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- spaces and trials


def write_space(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def demo() -> SearchSpec:
    return load_spec("demo")


@pytest.fixture
def grid_spec(tmp_path) -> SearchSpec:
    """Choices only, one of them conditional; FIFO: no rungs."""
    return load_spec(write_space(tmp_path, """
        name: small-grid
        data: {source: synthetic, task: three_class, image_size: 32}
        fixed:
          model: {backbone: convnet5, weights: none}
          loop: {epochs: 3}
        space:
          loss.name: {choice: [cross_entropy, focal]}
          loss.gamma: {choice: [1.0, 2.0], when: {loss.name: focal}}
          sampler: {choice: [shuffle, oversample]}
        search: {algorithm: grid, scheduler: fifo}
        """, "small-grid"))


@pytest.fixture
def ranges_spec(tmp_path) -> SearchSpec:
    """A conditional int range and a loss metric (minimised)."""
    return load_spec(write_space(tmp_path, """
        name: ranges
        data: {source: synthetic, task: three_class, image_size: 32}
        fixed:
          model: {backbone: convnet5, weights: none}
          loop: {epochs: 4}
        space:
          optimizer.lr: {uniform: [1.0e-4, 1.0e-2]}
          preprocess.method: {choice: [none, cxrnorm]}
          preprocess.tile_grid: {int: [4, 16, 4], when: {preprocess.method: cxrnorm}}
        search: {algorithm: random, metric: val/loss, scheduler: {name: asha, grace_period: 1, reduction_factor: 2}}
        """, "ranges"))


@pytest.fixture
def one_param_spec(tmp_path) -> SearchSpec:
    return load_spec(write_space(tmp_path, """
        name: one-param
        data: {source: synthetic, task: three_class, image_size: 32}
        fixed: {model: {backbone: convnet5, weights: none}, loop: {epochs: 2}}
        space:
          optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        search: {algorithm: random, scheduler: fifo}
        """, "one-param"))


def history(spec: SearchSpec, epochs: int, base: float) -> list[dict[str, float]]:
    """Per-epoch metrics as search._history gives them (floats; the searched metric and others)."""
    sign = 1.0 if spec.mode == "max" else -1.0
    return [{"epoch": float(e), spec.metric: round(base + sign * 0.05 * e, 6), "train/loss": 1.0 / e}
            for e in range(1, epochs + 1)]


def trial_row(spec: SearchSpec, i: int, status: str, epochs: int, config: dict) -> dict:
    """One trial as search._trial_rows knows it (a failed trial keeps the best of the epochs it had)."""
    hist = history(spec, epochs, 0.3 + 0.01 * i)
    values = [h[spec.metric] for h in hist]
    best = (max(values) if spec.mode == "max" else min(values)) if values else None
    return {"trial_id": f"a1b2c_{i:05d}", "status": status, "epochs": epochs, "config": config,
            "best": best, "history": hist}


# what ASHA made of 7 trials of the demo space (6 epochs; rungs 1, 2, 4)
DEMO_OUTCOMES = [("completed", 6), ("stopped_early", 1), ("stopped_early", 2), ("failed", 1),
                 ("not_started", 0), ("completed", 6), ("stopped_early", 4)]


def sampled(spec: SearchSpec, n: int, seed: int = 3) -> list[optuna.trial.FrozenTrial]:
    """Points drawn by the space's own define-by-run function on a real Optuna study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        define_by_run(spec)(trial)
        out.append(study.tell(trial, 0.0))
    return out


def demo_trials(spec: SearchSpec) -> tuple[list[dict], list[optuna.trial.FrozenTrial]]:
    points = sampled(spec, len(DEMO_OUTCOMES))
    rows = [trial_row(spec, i, status, epochs, dict(p.params))
            for i, ((status, epochs), p) in enumerate(zip(DEMO_OUTCOMES, points))]
    # best first, as the search hands them over
    rows.sort(key=lambda r: (r["best"] is None, -(r["best"] or 0.0)))
    return rows, points


def by_trial_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["trial_id"]: t for t in study.trials}


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path.name} is blank"


# ---------------------------------------------------------------- the study


def test_demo_trials_carry_what_they_sampled(demo):
    rows, points = demo_trials(demo)
    study = study_from_trials(demo, rows)
    trials = by_trial_id(study)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.study_name == "demo"
    # the never-started trial is left out; the others are numbered in creation order
    assert list(trials) == [f"a1b2c_{i:05d}" for i in (0, 1, 2, 3, 5, 6)]
    conditional = set()
    for i, point in enumerate(points):
        tid = f"a1b2c_{i:05d}"
        if tid not in trials:
            continue
        t = trials[tid]
        # exactly the params define_by_run sampled, with the distributions it sampled them from
        assert t.params == point.params
        assert t.distributions == point.distributions
        conditional |= {p.name for p in demo.params if p.when and p.name in t.params}
    assert conditional, "the seed should sample some conditional parameter"
    assert any(p.name not in trials[f"a1b2c_{i:05d}"].params for i in (0, 1, 2, 3, 5, 6)
               for p in demo.params if p.when)


def test_values_intermediate_values_and_states(demo):
    rows, _ = demo_trials(demo)
    trials = by_trial_id(study_from_trials(demo, rows))
    for row in rows:
        if row["status"] == "not_started":
            assert row["trial_id"] not in trials
            continue
        t = trials[row["trial_id"]]
        assert t.intermediate_values == {int(h["epoch"]): h[demo.metric] for h in row["history"]}
        assert t.user_attrs == {"trial_id": row["trial_id"], "status": row["status"], "epochs": row["epochs"]}
        if row["status"] == "failed":
            assert t.state == TrialState.FAIL and t.value is None
        else:
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(row["best"])
    assert [t.state for t in trials.values()].count(TrialState.FAIL) == 1


def test_grid_space_with_a_condition(grid_spec):
    points = grid_points(grid_spec)
    assert len(points) == 6
    rows = [trial_row(grid_spec, i, "completed", 3, p) for i, p in enumerate(points)]
    study = study_from_trials(grid_spec, rows)
    for t, point in zip(study.trials, points):
        assert t.params == point
        # what the space's define-by-run function records when it replays this point
        replay = optuna.trial.FixedTrial(point)
        define_by_run(grid_spec)(replay)
        assert t.distributions == replay.distributions
        assert ("loss.gamma" in t.params) == (point["loss.name"] == "focal")


def test_minimised_metric_and_int_range(ranges_spec):
    points = sampled(ranges_spec, 6, seed=0)
    rows = [trial_row(ranges_spec, i, "completed", 4, dict(p.params)) for i, p in enumerate(points)]
    study = study_from_trials(ranges_spec, rows, study_name="ranges-study")
    assert ranges_spec.mode == "min" and study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.study_name == "ranges-study"
    assert [t.distributions for t in study.trials] == [p.distributions for p in points]
    best = min(rows, key=lambda r: r["best"])
    assert study.best_trial.user_attrs["trial_id"] == best["trial_id"] == best_trial_id(rows, "min")


# ---------------------------------------------------------------- RDB storage


def snapshot(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.value, t.params, t.distributions, t.intermediate_values, t.user_attrs)
            for t in study.trials]


def test_storage_round_trip_is_idempotent_and_keeps_other_studies(tmp_path, demo):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    rows, _ = demo_trials(demo)
    keep = optuna.create_study(storage=url, study_name="another-search", direction="minimize")
    keep.add_trial(optuna.trial.create_trial(value=1.5, params={"x": 0.5},
                                             distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))

    built = study_from_trials(demo, rows, storage=url)
    loaded = optuna.load_study(study_name="demo", storage=url)
    assert snapshot(loaded) == snapshot(built)
    assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(loaded.trials) == 6

    study_from_trials(demo, rows, storage=url)  # the same search again: replaces, no duplicates
    again = optuna.load_study(study_name="demo", storage=url)
    assert len(again.trials) == 6
    assert [t.user_attrs["trial_id"] for t in again.trials] == [t.user_attrs["trial_id"] for t in built.trials]
    names = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}
    assert names == {"demo": 6, "another-search": 1}
    assert optuna.load_study(study_name="another-search", storage=url).best_value == 1.5


def test_storage_folder_is_created(tmp_path, one_param_spec):
    url = f"sqlite:///{tmp_path / 'new' / 'folder' / 'optuna.db'}"
    rows = [trial_row(one_param_spec, 0, "completed", 2, {"optimizer.lr": 1e-3})]
    study_from_trials(one_param_spec, rows, storage=url)
    assert (tmp_path / "new" / "folder" / "optuna.db").is_file()
    assert len(optuna.load_study(study_name="one-param", storage=url).trials) == 1


def test_dashboard_command():
    assert dashboard_command("sqlite:////tmp/x/optuna.db") == "optuna-dashboard sqlite:////tmp/x/optuna.db"
    assert dashboard_command("sqlite:////tmp/my runs/optuna.db") == "optuna-dashboard 'sqlite:////tmp/my runs/optuna.db'"


# ---------------------------------------------------------------- figures


def test_all_figures_of_a_search(tmp_path, demo, caplog):
    rows, _ = demo_trials(demo)
    study = study_from_trials(demo, rows)
    with caplog.at_level(logging.WARNING, logger="cxrtune.report.search_plots"):
        drawn = search_figures(study, rows, demo, tmp_path / "figs")
    assert set(drawn) == OPTUNA_FIGURES | {"asha"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    for key, path in drawn.items():
        assert path == tmp_path / "figs" / f"search_{key}.png"
        assert_png(path)


def test_figures_leave_pyplot_as_they_found_it(tmp_path, demo):
    rows, _ = demo_trials(demo)
    study = study_from_trials(demo, rows)
    backend = matplotlib.get_backend()
    plt.switch_backend("pdf")  # a non-Agg backend some other code chose
    try:
        others = plt.figure()  # another caller's open figure
        facecolor = matplotlib.rcParams["axes.facecolor"]
        search_figures(study, rows, demo, tmp_path)
        assert matplotlib.get_backend() == "pdf"
        assert matplotlib.rcParams["axes.facecolor"] == facecolor  # Optuna's ggplot style did not leak
        assert plt.get_fignums() == [others.number]  # its own figures closed, the other one kept
        plt.close(others)
    finally:
        plt.switch_backend(backend)


def test_asha_rungs_of_the_demo_space(demo):
    assert (demo.search.scheduler.grace_period, demo.search.scheduler.reduction_factor, demo.max_epochs) == (1, 2, 6)
    assert asha_rungs(demo) == [1, 2, 4]
    rows, _ = demo_trials(demo)
    ax = asha_figure(rows, demo).axes[0]
    rungs = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "asha-rung")
    assert rungs == [1, 2, 4]
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "max-epochs"] == [6]
    # one bar per trial (the never-started one too), as long as the epochs it reached
    assert [p.get_width() for p in ax.patches] == [epochs for _, epochs in DEMO_OUTCOMES]
    assert any("best: a1b2c_00005" in text.get_text() for text in ax.get_legend().get_texts())


@pytest.mark.parametrize("overrides, max_epochs", [
    (["fixed.loop.epochs=9", "search.scheduler.reduction_factor=3"], 9),
    (["fixed.loop.epochs=8"], 8),
    (["fixed.loop.epochs=20", "search.scheduler.grace_period=2", "search.scheduler.reduction_factor=3"], 20),
])
def test_asha_rungs_are_rays(overrides, max_epochs):
    """The figure's rungs are where Ray's ASHAScheduler compares trials (its rung at max_t
    itself, where every trial ends anyway, is not drawn)."""
    schedulers = pytest.importorskip("ray.tune.schedulers")
    spec = load_spec("demo", overrides)
    s = spec.search.scheduler
    ray_asha = schedulers.ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=s.grace_period,
                                        reduction_factor=s.reduction_factor)
    ray_rungs = sorted(m for bracket in ray_asha._brackets for m, _ in bracket._rungs if m < max_epochs)
    assert spec.max_epochs == max_epochs and asha_rungs(spec) == ray_rungs


def test_fifo_has_no_rungs(tmp_path, grid_spec):
    assert asha_rungs(grid_spec) == []
    rows = [trial_row(grid_spec, i, "completed", 3, p) for i, p in enumerate(grid_points(grid_spec))]
    ax = asha_figure(rows, grid_spec).axes[0]
    assert not [line for line in ax.get_lines() if line.get_gid() == "asha-rung"]
    drawn = search_figures(study_from_trials(grid_spec, rows), rows, grid_spec, tmp_path)
    assert set(drawn) == OPTUNA_FIGURES | {"asha"}


# ---------------------------------------------------------------- small and broken searches


def test_single_trial(tmp_path, demo, caplog):
    point = sampled(demo, 1)[0].params
    rows = [trial_row(demo, 0, "completed", 6, dict(point))]
    study = study_from_trials(demo, rows)
    with caplog.at_level(logging.INFO, logger="cxrtune.report.search_plots"):
        drawn = search_figures(study, rows, demo, tmp_path)
    assert set(drawn) == {"parallel_coordinate", "optimization_history", "asha"}
    assert "param_importances skipped: needs at least 2 complete trials" in caplog.text
    for path in drawn.values():
        assert_png(path)


def test_every_trial_failed(tmp_path, demo, caplog):
    points = sampled(demo, 3)
    rows = [trial_row(demo, i, "failed", e, dict(p.params)) for i, (e, p) in enumerate(zip((0, 1, 2), points))]
    rows[0]["best"] = None  # failed before its first epoch
    study = study_from_trials(demo, rows)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    with caplog.at_level(logging.INFO, logger="cxrtune.report.search_plots"):
        drawn = search_figures(study, rows, demo, tmp_path)
    assert set(drawn) == {"asha"}
    assert caplog.text.count("no trial completed with a value") == 3
    assert_png(drawn["asha"])


def test_no_trials_at_all(tmp_path, demo):
    study = study_from_trials(demo, [])
    assert study.trials == []
    assert set(search_figures(study, [], demo, tmp_path)) == {"asha"}


def test_one_parameter(tmp_path, one_param_spec, caplog):
    rows = [trial_row(one_param_spec, i, "completed", 2, {"optimizer.lr": lr})
            for i, lr in enumerate((1e-4, 1e-3, 5e-3))]
    study = study_from_trials(one_param_spec, rows)
    with caplog.at_level(logging.WARNING, logger="cxrtune.report.search_plots"):
        drawn = search_figures(study, rows, one_param_spec, tmp_path)
    assert set(drawn) == OPTUNA_FIGURES | {"asha"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_parameter_that_never_varied(tmp_path, one_param_spec, caplog):
    rows = [trial_row(one_param_spec, i, "completed", 2, {"optimizer.lr": 1e-3}) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="cxrtune.report.search_plots"):
        drawn = search_figures(study_from_trials(one_param_spec, rows), rows, one_param_spec, tmp_path)
    assert set(drawn) == {"parallel_coordinate", "optimization_history", "asha"}
    assert "no parameter took more than one value" in caplog.text


def test_values_from_an_older_space_are_left_out(tmp_path, demo, caplog):
    rows, _ = demo_trials(demo)
    first = next(r for r in rows if r["trial_id"] == "a1b2c_00000")
    first["config"] = {**first["config"], "optimizer.lr": 0.5, "sampler": "weighted", "optimizer.momentum": 0.9}
    with caplog.at_level(logging.WARNING, logger="cxrtune.report.search_plots"):
        study = study_from_trials(demo, rows)
    t = by_trial_id(study)["a1b2c_00000"]
    kept = {k: v for k, v in first["config"].items() if k not in ("optimizer.lr", "sampler", "optimizer.momentum")}
    assert t.params == kept and t.state == TrialState.COMPLETE
    for name in ("optimizer.lr=0.5", "sampler='weighted'", "optimizer.momentum=0.9"):
        assert name in caplog.text
    assert len(study.trials) == 6
    drawn = search_figures(study, rows, demo, tmp_path)
    assert set(drawn) == OPTUNA_FIGURES | {"asha"}


def test_bool_is_not_a_numeric_choice(tmp_path, grid_spec, caplog):
    """Optuna would store True as the choice 1.0; the space tells them apart."""
    rows = [trial_row(grid_spec, 0, "completed", 3, {"loss.name": "focal", "loss.gamma": True, "sampler": "shuffle"})]
    with caplog.at_level(logging.WARNING, logger="cxrtune.report.search_plots"):
        study = study_from_trials(grid_spec, rows)
    assert study.trials[0].params == {"loss.name": "focal", "sampler": "shuffle"}
    assert "loss.gamma=True" in caplog.text
