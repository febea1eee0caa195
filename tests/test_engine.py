"""The training loop: resume exactness, divergence, freezing, outputs of `cxrtune train`."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from cxrtune.cli import app
from cxrtune.config import DataConfig, TrialConfig, from_dict, load_trial_config
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import TrainingDiverged, fit
from cxrtune.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def small_cfg(home, **sections) -> TrialConfig:
    base = {
        "data": {"root": str(home / "synthetic"), "cache_dir": str(home / "cache"), "image_size": 32,
                 "synthetic_n": 120},
        "model": {"backbone": "convnet5"},
        "loop": {"epochs": 2, "batch_size": 16, "max_train_batches": 3, "max_eval_batches": 2},
        "output_dir": str(home / "run"),
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrialConfig, base)


@pytest.fixture(scope="module")
def data(home):
    return prepare_data(small_cfg(home).data, progress=False)


def weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("sections", [
    {},
    {"optimizer": {"name": "sgd", "sam": "sam", "rho": 0.05, "lr": 0.05}, "sampler": "oversample",
     "augment": {"preset": "heavy"}},
    {"optimizer": {"name": "adamw", "sam": "asam", "rho": 0.5}, "schedule": {"name": "one_cycle"},
     "loss": {"name": "focal", "gamma": 2.0, "alpha": "balanced"}, "sampler": "undersample"},
])
def test_two_epochs_equal_one_plus_resume_plus_one(home, data, tmp_path, sections):
    cfg = small_cfg(home, **sections)
    straight = fit(cfg, data, workdir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_after_first_epoch(metrics, checkpoint):
        raise Killed  # the process dies right after epoch 1's checkpoint was reported

    with pytest.raises(Killed):
        fit(cfg, data, kill_after_first_epoch, workdir=tmp_path / "b")
    resumed = fit(cfg, data, workdir=tmp_path / "c", resume=tmp_path / "b" / "checkpoint")
    assert resumed.epoch == 2
    a, c = weights(tmp_path / "a" / "checkpoint"), weights(tmp_path / "c" / "checkpoint")
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert straight.history[-1]["val/f1_macro"] == resumed.history[-1]["val/f1_macro"]
    assert straight.history[-1]["lr"] == resumed.history[-1]["lr"]


def test_report_gets_metrics_and_a_checkpoint_every_epoch(home, data, tmp_path):
    seen = []
    fit(small_cfg(home, data={"task": "three_class"}), data, lambda m, p: seen.append((m, p)),
        workdir=tmp_path)
    assert [m["epoch"] for m, _ in seen] == [1, 2]
    m, p = seen[-1]
    for key in ("train/loss", "val/loss", "val/accuracy", "val/balanced_accuracy", "val/f1_macro",
                "val/roc_auc_macro", "val/sensitivity/viral", "val/specificity/normal", "val/ece", "lr"):
        assert key in m, key
    assert (p / "checkpoint.pt").is_file()


def test_multi_to_binary_reports_binary_metrics(home, tmp_path):
    cfg = small_cfg(home, data={"task": "multi_to_binary"}, loop={"select_metric": "val/binary/f1_macro"})
    progress = fit(cfg, prepare_data(cfg.data, progress=False), workdir=tmp_path)
    assert "val/binary/sensitivity" in progress.history[-1]


def test_nan_loss_stops_the_trial_with_a_reason(home, data, tmp_path):
    cfg = small_cfg(home, optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0},
                    loop={"epochs": 3, "max_train_batches": 6})
    with pytest.raises(TrainingDiverged, match="diverged"):
        fit(cfg, data, workdir=tmp_path)


def test_frozen_backbone_trains_only_the_head(home, data, tmp_path):
    cfg = small_cfg(home, model={"backbone": "resnet18", "freeze_epochs": 1}, loop={"epochs": 1})
    torch.manual_seed(0)
    from cxrtune.models import build_model
    fit(cfg, data, workdir=tmp_path)
    trained = weights(tmp_path / "checkpoint")
    torch.manual_seed(cfg.loop.seed)
    init = build_model(cfg.model, 3, 32).state_dict()
    assert torch.equal(trained["conv1.weight"], init["conv1.weight"])
    assert not torch.equal(trained["fc.weight"], init["fc.weight"])


def test_gradient_accumulation_runs(home, data, tmp_path):
    p = fit(small_cfg(home, optimizer={"grad_accum_steps": 2}), data, workdir=tmp_path)
    assert p.epoch == 2


@pytest.mark.parametrize("override, message", [
    ("model.backbone=resnet5", "model.backbone='resnet5': unknown backbone; valid backbones: convnet5, densenet121"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1: must be > 0"),
    ("preprocess.median_kernel=4", "preprocess.median_kernel = 4"),
    ("optimizer.grad_accum_steps=4", "accumulation"),
    ("sampler=smote", "unknown sampler 'smote'"),
    ("loop.select_metric=val/f1", "unknown selection metric 'val/f1'"),
    ("loop.epochz=3", "loop.epochz: unknown key"),
])
def test_bad_config_values_name_the_value(override, message):
    sets = [override] + (["optimizer.sam=sam"] if "grad_accum" in override else [])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_trial_config(None, sets)


def test_train_cli_debug_writes_its_outputs_and_protects_earlier_runs(home, data, tmp_path):
    out = tmp_path / "out"
    args = ["train", "configs/baseline.yaml", "--debug", "--output", str(out), "--json",
            "--set", f"data.root={home / 'synthetic'}", "--set", f"data.cache_dir={home / 'cache'}",
            "--set", "data.image_size=32", "--set", "data.synthetic_n=120"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["epochs"] == 2
    for name in ("config.yaml", "split.csv", "metrics.csv", "metrics.jsonl", "best/checkpoint.pt",
                 "checkpoint/checkpoint.pt"):
        assert (out / name).exists(), name
    before = (out / "metrics.jsonl").read_text()
    again = runner.invoke(app, args[:-8] + args[-8:])
    assert again.exit_code != 0 and "already holds a run" in str(again.exception or again.output)
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost
    resumed = runner.invoke(app, [*args, "--set", "loop.epochs=3", "--resume", str(out / "checkpoint")])
    assert resumed.exit_code == 0, resumed.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # --debug caps at 2 epochs: nothing re-run


@pytest.mark.parametrize("layout", ["kermany", "imagefolder"])
def test_train_debug_on_other_layouts(tmp_path, layout):
    from cxrtune.data.synthetic import write_synthetic
    from cxrtune.train import train

    write_synthetic(tmp_path / layout, n=80, layout=layout, seed=1)
    cfg = load_trial_config(None, [f"data.source={layout}", f"data.root={tmp_path / layout}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=32",
                                   "model.backbone=simple_cnn", f"output_dir={tmp_path / 'out'}"])
    summary = train(cfg, debug=True)
    assert summary["epochs"] == 2 and (tmp_path / "out" / "best" / "checkpoint.pt").is_file()


def test_inception_trains_with_its_auxiliary_head_at_299(tmp_path, home, monkeypatch):
    cfg = small_cfg(home, data={"image_size": 299, "synthetic_n": 120}, model={"backbone": "inception_v3"},
                    loop={"epochs": 1, "batch_size": 4, "max_train_batches": 2, "max_eval_batches": 1})
    data = prepare_data(cfg.data, progress=False)
    seen = []
    import cxrtune.engine as engine
    real = engine.logits_and_aux

    def spy(out):
        logits, aux = real(out)
        seen.append(aux is not None)
        return logits, aux

    monkeypatch.setattr(engine, "logits_and_aux", spy)
    fit(cfg, data, workdir=tmp_path)
    assert seen[:2] == [True, True] and seen[-1] is False  # aux in training, not at evaluation
