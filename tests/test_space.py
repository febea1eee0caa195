"""Search-space files: loading, validation, Optuna define-by-run, grid points, lookup."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import optuna
import pytest

from cxrtune.errors import ConfigError
from cxrtune.space import (BUNDLED_DIR, Param, SearchSpec, bundled_spaces, define_by_run, grid_points,
                           load_spec, optuna_sampler, resolve_space_path)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def ask_points(spec: SearchSpec, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna_sampler(spec), direction=spec.mode + "imize")
    fn = define_by_run(spec)
    points = []
    for i in range(n):
        trial = study.ask()
        assert fn(trial) is None  # pure define-by-run: no constants returned
        points.append(dict(trial.params))
        study.tell(trial, (i * 7919 % 13) / 13.0)  # deterministic "scores"
    return points


# ---------------------------------------------------------------- bundled spaces


def test_bundled_names():
    assert set(bundled_spaces()) >= {"demo", "cxrnorm", "reproduce_grid", "backbones", "pareto"}
    assert (BUNDLED_DIR / "demo.yaml").is_file()


@pytest.mark.parametrize("name", ["demo", "cxrnorm", "reproduce_grid", "backbones", "pareto"])
def test_bundled_space_loads_and_validates(name):
    spec = load_spec(name)
    assert spec.name == name
    spec.base_config().validate()
    assert spec.metric == "val/f1_macro" and spec.mode == "max"
    assert spec.params and spec.resources.cpu > 0
    if spec.data.source != "synthetic":  # real-data roots are placeholders: not checked here
        assert spec.data.root and not Path(spec.data.root).exists()
    if spec.search.algorithm == "grid":
        for point in grid_points(spec):
            spec.trial_config(point).validate()


def test_demo_shape():
    spec = load_spec("demo")
    assert spec.data.source == "synthetic" and spec.search.max_concurrent == 2
    assert spec.search.scheduler.name == "asha" and spec.max_epochs == spec.base_config().loop.epochs
    assert spec.param("optimizer.rho").when == (("optimizer.sam", ("sam",)),)
    assert spec.param("optimizer.lr").kind == "loguniform"
    assert spec.tracking.experiment_name(spec.name) == "cxrtune-demo"
    assert spec.tracking.resolved_uri().startswith("sqlite:///") and spec.tracking.resolved_uri().endswith("mlflow.db")


def test_backbones_sweeps_every_backbone():
    from cxrtune.models import BACKBONES

    spec = load_spec("backbones")
    assert sorted(p["model.backbone"] for p in grid_points(spec)) == BACKBONES.names()


# ---------------------------------------------------------------- define-by-run and samplers


def test_demo_define_by_run_points_validate_and_respect_conditions():
    spec = load_spec("demo")
    points = ask_points(spec, 30)
    saw_rho = saw_no_rho = False
    for point in points:
        spec.trial_config(point).validate()
        assert ("optimizer.rho" in point) == (point["optimizer.sam"] == "sam")
        assert ("loss.gamma" in point) == (point["loss.name"] == "focal")
        assert ("preprocess.clip_limit" in point) == (point["preprocess.method"] == "cxrnorm")
        assert 1e-4 <= point["optimizer.lr"] <= 1e-2
        if "loss.gamma" in point:
            assert point["loss.gamma"] in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
        saw_rho |= "optimizer.rho" in point
        saw_no_rho |= "optimizer.rho" not in point
    assert saw_rho and saw_no_rho
    cfg = spec.trial_config(next(p for p in points if "optimizer.rho" in p))
    assert cfg.optimizer.sam == "sam" and cfg.output_dir == spec.base_config().output_dir


def test_seeded_tpe_is_deterministic():
    spec = load_spec("demo")
    sampler = optuna_sampler(spec)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert ask_points(spec, 6) == ask_points(spec, 6)
    other = load_spec("demo", ["search.seed=1"])
    assert ask_points(other, 3) != ask_points(spec, 3)


def test_random_sampler_and_grid_has_none():
    spec = load_spec("demo", ["search.algorithm=random"])
    assert isinstance(optuna_sampler(spec), optuna.samplers.RandomSampler)
    with pytest.raises(ConfigError, match="grid"):
        optuna_sampler(load_spec("reproduce_grid"))


def test_trial_config_rejects_inactive_values():
    spec = load_spec("demo")
    with pytest.raises(ConfigError, match="optimizer.rho"):
        spec.trial_config({"optimizer.sam": "none", "optimizer.rho": 0.1})
    cfg = spec.trial_config({"preprocess.method": "cxrnorm", "preprocess.median_kernel": 3})
    assert cfg.preprocess.median_kernel == 3 and cfg.model.backbone == "convnet5"


# ---------------------------------------------------------------- grid


def test_reproduce_grid_points():
    spec = load_spec("reproduce_grid")
    points = grid_points(spec)
    assert len(points) == 16
    keys = ["model.backbone", "sampler", "preprocess.method", "optimizer.sam"]
    combos = {tuple(p[k] for k in keys) for p in points}
    assert len(combos) == 16
    assert combos == set(itertools.product(*(spec.param(k).values for k in keys)))
    for point in points:
        cfg = spec.trial_config(point)
        cfg.validate()
        assert cfg.optimizer.rho == 0.05 and cfg.loop.epochs == 50
    assert spec.search.scheduler.name == "fifo"


def test_grid_points_apply_conditions_and_dedupe(tmp_path):
    path = write(tmp_path, """
        data: {source: synthetic, image_size: 64}
        fixed: {model: {backbone: convnet5}}
        space:
          optimizer.sam: {choice: [none, sam]}
          optimizer.rho: {choice: [0.05, 0.1], when: {optimizer.sam: sam}}
          loss.name: {choice: [cross_entropy, focal]}
        search: {algorithm: grid, scheduler: fifo}
        """)
    spec = load_spec(path)
    points = grid_points(spec)
    assert len(points) == 6  # none x 2 losses + sam x 2 rhos x 2 losses
    assert points[0] == {"optimizer.sam": "none", "loss.name": "cross_entropy"}
    assert all(("optimizer.rho" in p) == (p["optimizer.sam"] == "sam") for p in points)
    assert grid_points(spec) == points  # stable order


# ---------------------------------------------------------------- lookup


def test_resolve_space_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arg in ("search_spaces/cxrnorm.yaml", "spaces/cxrnorm.yaml", "cxrnorm", "cxrnorm.yaml"):
        path, how = resolve_space_path(arg)
        assert path == BUNDLED_DIR / "cxrnorm.yaml" and "bundled space 'cxrnorm'" in how
    local = write(tmp_path, "name: local\n", "cxrnorm.yaml")
    assert resolve_space_path("cxrnorm.yaml") == (Path("cxrnorm.yaml"), "file cxrnorm.yaml")
    assert resolve_space_path(local) == (local, f"file {local}")
    with pytest.raises(ConfigError) as err:
        resolve_space_path("nosuchspace")
    msg = str(err.value)
    assert "does not exist" in msg and all(n in msg for n in ("demo", "cxrnorm", "reproduce_grid", "backbones"))


# ---------------------------------------------------------------- validation and overrides


def test_many_problems_reported_at_once(tmp_path):
    path = write(tmp_path, """
        name: broken
        bogus_top: 1
        data: {source: synthetic, task: three_class, image_size: 64}
        fixed:
          model: {backbone: convnet5}
          optimizer: {grad_accum_steps: 2}
          loop: {epochs: 4}
        space:
          optimizer.lr: {loguniform: [0, 0.1]}
          optimizer.sam: {choice: [none, sam]}
          optimizer.rho: {uniform: [0.2, 0.01], when: {optimizer.sam: sam}}
          optimizer.lrr: {uniform: [0.1, 0.2]}
          loss.gamma: {choice: [1.0, 2.0], when: {loss.nam: focal}}
          preprocess.median_kernel: {choice: [3, 4]}
          model.dropout: {choice: [0.0, 0.2]}
          data.image_size: {choice: [32, 64]}
          preprocess.clip_limit: {uniform: [1.0, 4.0]}
          preprocess.tile_grid: {normal: [4, 16]}
          schedule.name: {choice: [reduce_on_plateau, cosine]}
        search:
          algorithm: grid
          metric: val/f1_macroo
          sceduler: {name: asha}
        resources: {cpu: 0}
        """, "broken_space.yaml")
    overrides = ["space.model.backbone={choice: [convnet5, resnet9]}", "fixed.model={}"]
    with pytest.raises(ConfigError) as err:
        load_spec(path, overrides)
    msg = str(err.value)
    assert "broken_space.yaml" in msg
    expected = [
        "bogus_top: unknown top-level key",
        "search.sceduler: unknown key",
        "space.optimizer.lr: loguniform range [0, 0.1] touches zero",
        "space.optimizer.rho: uniform range [0.2, 0.01] is empty or inverted",
        "space.optimizer.lrr: 'lrr' is not a field of optimizer; valid fields: name, lr",
        "space.loss.gamma.when: conditions on unknown parameter 'loss.nam'",
        "space.preprocess.median_kernel = 4: preprocess.median_kernel = 4: must be an odd integer",
        "space.model.backbone = resnet9: model.backbone='resnet9': unknown backbone",
        "space.optimizer.sam = sam: optimizer.grad_accum_steps=2",
        "space.schedule.name = cosine: schedule.name='cosine': unknown schedule",
        "space.data.image_size: data settings cannot be searched",
        "space.preprocess.tile_grid.normal: unknown key",
        "space.preprocess.tile_grid: must be exactly one of choice, uniform, loguniform, quniform, int",
        "space.preprocess.clip_limit: search.algorithm grid needs every parameter to be a choice",
        "search.metric: unknown selection metric 'val/f1_macroo'",
        "resources.cpu=0.0: must be > 0",
    ]
    for piece in expected:
        assert piece in msg, piece
    for line in msg.splitlines()[1:]:
        assert line.strip().startswith("broken_space.yaml: ")
    # valid choices are not reported
    assert "space.model.backbone = convnet5" not in msg and "space.model.dropout" not in msg
    assert "median_kernel = 3" not in msg and "optimizer.sam = none" not in msg


@pytest.mark.parametrize("space, piece", [
    ("optimizer.lr: {loguniform: [-1, 0.1]}", "goes below zero"),
    ("loss.gamma: {quniform: [0.5, 3.0, 0]}", "step q=0 must be > 0"),
    ("loss.gamma: {quniform: [0.5, 1.0, 2.0]}", "larger than the range"),
    ("preprocess.tile_grid: {int: [4, 16, 20]}", "larger than the range"),
    ("preprocess.tile_grid: {uniform: [4, 16]}", "is an integer; use int"),
    ("sampler: {choice: []}", "non-empty list"),
    ("sampler: {uniform: [0, 1]}", "use choice"),
    ("optimizer.lr: 0.01", "kinds: choice, uniform"),
    ("loss.name: {choice: [focal]}\n  loss.gamma: {uniform: [1, 2], when: {loss.name: focall}}",
     "loss.name never takes 'focall'"),
    ("loss.gamma: {uniform: [1, 2], when: {loss.name: focal}}\n  loss.name: {choice: [focal]}",
     "declared later"),
    ("preprocess.tile_grid: {int: [4, 16, 4]}", "fixed.preprocess.tile_grid"),
    ("preprocess.low_pct: {uniform: [0, 200]}", "space.preprocess.low_pct = 200.0: preprocess.low_pct"),
    ("output_dir: {choice: [a, b]}", "output_dir cannot be searched"),
    ("model: {choice: [a]}", "name a field of model"),
])
def test_single_problems(tmp_path, space, piece):
    path = write(tmp_path, f"""
data: {{source: synthetic, image_size: 64}}
fixed: {{model: {{backbone: convnet5}}, preprocess: {{tile_grid: 8}}}}
space:
  {space}
""", "one.yaml")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert piece in str(err.value) and "one.yaml" in str(err.value)


def test_search_settings_checks(tmp_path):
    path = write(tmp_path, """
        data: {source: synthetic, image_size: 64}
        fixed: {model: {backbone: resnet18}, loop: {epochs: 3}}
        space: {optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}
        search: {algorithm: hyperopt, scheduler: {name: median, grace_period: 0, reduction_factor: 1},
                 metric: val/loss, mode: max, num_samples: 0, max_concurrent: 0}
        resources: {cpu: 1, gpu: -1}
        report: {resamples: 0}
        """)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    msg = str(err.value)
    for piece in ("search.algorithm='hyperopt': unknown algorithm; valid algorithms: optuna_tpe, optuna_nsga2, random, grid",
                  "search.scheduler.name='median'", "val/loss is lower-is-better", "search.num_samples=0",
                  "search.max_concurrent=0", "resources.gpu=-1.0", "report.resamples=0: must be >= 1"):
        assert piece in msg, piece
    path.write_text(path.read_text().replace("image_size: 64", "image_size: 16"))
    with pytest.raises(ConfigError, match="at least"):  # resnet18 on 16 px images
        load_spec(path, ["search.algorithm=random", "search.mode=min", "search.num_samples=2",
                         "search.max_concurrent=1", "search.scheduler={name: fifo}", "resources.gpu=0",
                         "report.resamples=100"])


def test_overrides_apply():
    spec = load_spec("demo", ["search.num_samples=4", "fixed.loop.epochs=2", "data.image_size=32",
                              "search.scheduler.grace_period=2", "resources.gpu=0.25",
                              "space.optimizer.lr.loguniform=[1.0e-5, 1.0e-3]", "space.sampler=null",
                              "space.model.dropout={uniform: [0.0, 0.5]}"])
    assert spec.search.num_samples == 4 and spec.max_epochs == 2 and spec.data.image_size == 32
    assert spec.base_config().loop.epochs == 2 and spec.resources.gpu == 0.25
    assert spec.search.scheduler.grace_period == 2
    lr = spec.param("optimizer.lr")
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-5, 1e-3)
    names = [p.name for p in spec.params]
    assert "sampler" not in names and names[-1] == "model.dropout"
    assert names[:3] == ["optimizer.lr", "optimizer.sam", "optimizer.rho"]  # file order kept
    with pytest.raises(ConfigError, match="grace_period=3"):
        load_spec("demo", ["fixed.loop.epochs=2", "search.scheduler.grace_period=3"])


def test_param_active_and_candidates():
    p = Param("loss.gamma", "quniform", 0.5, 3.0, 0.5, (), (("loss.name", ("focal",)),))
    assert p.active({"loss.name": "focal"}) and not p.active({"loss.name": "cross_entropy"}) and not p.active({})
    assert p.candidates() == [0.5, 1.5, 3.0]
    assert Param("x.y", "int", 4, 16, 4).candidates() == [4, 8, 16]
