"""The training loop: resume exactness, divergence, freezing, outputs of `cxrtune train`."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from cxrtune.cli import app
from cxrtune.config import TrialConfig, from_dict, load_trial_config
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
    # the images held on the device, batches gathered by index and augmented as a whole
    {"loop": {"input_pipeline": "device"}, "sampler": "oversample", "augment": {"preset": "heavy"}},
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
    assert torch.equal(trained["bn1.running_mean"], init["bn1.running_mean"])  # frozen BN: eval mode
    assert trained["layer1.0.bn1.num_batches_tracked"] == 0
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
    out = tmp_path / "out-debug"  # --debug writes beside the real run's folder
    args = ["train", "configs/baseline.yaml", "--debug", "--output", str(tmp_path / "out"), "--json",
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
    assert again.exit_code == 2 and "already holds a run" in again.output
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
    assert summary["epochs"] == 2 and (tmp_path / "out-debug" / "best" / "checkpoint.pt").is_file()


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


# ------------------------------------------------------------------ selection direction


def test_val_loss_selection_keeps_the_lowest_loss_checkpoint(home, data, tmp_path):
    from cxrtune.engine import build_setup
    from cxrtune.train import train

    cfg = small_cfg(home, loop={"epochs": 3, "select_metric": "val/loss"},
                    optimizer={"name": "sgd", "lr": 0.05}, output_dir=str(tmp_path / "out"))
    assert build_setup(cfg, data, torch.device("cpu")).scheduler.scheduler.mode == "min"  # plateau
    summary = train(cfg)
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["val/loss"] for x in rows]
    lowest = losses.index(min(losses)) + 1
    assert len(set(losses)) == 3 and summary["best_epoch"] == lowest
    best = torch.load(tmp_path / "out" / "best" / "checkpoint.pt", weights_only=True)
    assert best["progress"]["epoch"] == lowest and best["progress"]["best"] == min(losses)


# ------------------------------------------------------------------ exact resume


def _killed_then_resumed(cfg, data, tmp_path):
    straight = fit(cfg, data, workdir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_after_first_epoch(metrics, checkpoint):
        raise Killed

    with pytest.raises(Killed):
        fit(cfg, data, kill_after_first_epoch, workdir=tmp_path / "b")
    resumed = fit(cfg, data, workdir=tmp_path / "c", resume=tmp_path / "b" / "checkpoint")
    return straight, resumed


@pytest.mark.parametrize("sampler", ["shuffle", "oversample"])
def test_resume_is_exact_with_dataloader_workers(home, data, tmp_path, sampler):
    cfg = small_cfg(home, loop={"num_workers": 2}, augment={"preset": "heavy"}, sampler=sampler)
    straight, resumed = _killed_then_resumed(cfg, data, tmp_path)
    a, c = weights(tmp_path / "a" / "checkpoint"), weights(tmp_path / "c" / "checkpoint")
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert straight.history[-1]["train/loss"] == resumed.history[-1]["train/loss"]


@pytest.mark.parametrize("sampler", ["shuffle", "undersample"])
def test_without_augmentation_the_device_pipeline_trains_what_the_dataloader_trains(home, data, tmp_path, sampler):
    """Same epoch order, same normalisation: the pipelines differ only in augmentation."""
    runs = {p: fit(small_cfg(home, loop={"input_pipeline": p}, augment={"preset": "none"}, sampler=sampler), data,
                   workdir=tmp_path / p) for p in ("dataloader", "device")}
    a, b = (weights(tmp_path / p / "checkpoint") for p in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert runs["dataloader"].history == [{**h, **{k: v for k, v in runs["dataloader"].history[i].items()
                                                   if k.startswith("time/")}}
                                          for i, h in enumerate(runs["device"].history)]


def test_augmentation_does_not_depend_on_the_number_of_workers(home, data, tmp_path):
    runs = [fit(small_cfg(home, loop={"epochs": 1, "num_workers": n}, augment={"preset": "heavy"}), data,
                workdir=tmp_path / str(n)) for n in (0, 2)]
    assert runs[0].history[-1]["train/loss"] == runs[1].history[-1]["train/loss"]


def test_resume_with_another_lr_or_rho_is_refused_unless_allowed(home, data, tmp_path):
    cfg = small_cfg(home, loop={"epochs": 1}, optimizer={"sam": "sam"})
    fit(cfg, data, workdir=tmp_path / "a")
    changed = dataclasses.replace(
        cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=0.01, rho=0.1),
        loop=dataclasses.replace(cfg.loop, epochs=2, num_workers=1))  # epochs, workers: allowed
    with pytest.raises(ConfigError) as e:
        fit(changed, data, workdir=tmp_path / "b", resume=tmp_path / "a" / "checkpoint")
    msg = str(e.value)
    assert "optimizer.lr: 0.001 in the checkpoint, 0.01 now" in msg
    assert "optimizer.rho: 0.05 in the checkpoint, 0.1 now" in msg and "--resume-with-changes" in msg
    assert "loop.epochs" not in msg and "loop.num_workers" not in msg and "\n" not in msg
    p = fit(changed, data, workdir=tmp_path / "b", resume=tmp_path / "a" / "checkpoint", allow_changes=True)
    assert p.epoch == 2


# ------------------------------------------------------------------ gradient accumulation


def test_gradient_accumulation_steps_on_the_last_partial_group():
    import copy

    from cxrtune.engine import Setup, train_one_epoch
    from cxrtune.optim import ScheduleConfig, build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    batches = [(torch.randn(4, 1, 2, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(ScheduleConfig(name="none"), opt, 1, 2)
    crit = torch.nn.CrossEntropyLoss()
    s = Setup(model, model, crit, opt, sched, batches, [], torch.Generator(), torch.device("cpu"), (0.0, 1.0))
    cfg = from_dict(TrialConfig, {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0,
                                                "grad_accum_steps": 2}})
    train_one_epoch(s, cfg, 0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for group in (batches[:2], batches[2:]):  # mean gradient of each group, then a step
        ref_opt.zero_grad()
        sum(crit(reference(x), y) for x, y in group).div(len(group)).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


# ------------------------------------------------------------------ process-global switches


def test_determinism_is_set_both_ways_each_trial():
    from cxrtune.engine import seed_everything

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    try:
        seed_everything(0, True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        seed_everything(0, False)  # the next trial of a reused worker
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_cublas_workspace_is_configured_at_import():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", "import os, cxrtune.engine; "
                          "print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ":4096:8"


# ------------------------------------------------------------------ `cxrtune train` errors


def _config_file(cfg, path, **changes):
    import yaml

    from cxrtune.config import to_dict

    data = to_dict(cfg)
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_train_resume_from_a_missing_or_empty_folder_is_one_line(home, data, tmp_path):
    conf = _config_file(small_cfg(home, output_dir=str(tmp_path / "out")), tmp_path / "c.yaml")
    (tmp_path / "empty").mkdir()
    line = _one_error_line(runner.invoke(app, ["train", str(conf), "--resume", str(tmp_path / "nope")]))
    assert "nope does not exist" in line and "<output_dir>/checkpoint" in line
    line = _one_error_line(runner.invoke(app, ["train", str(conf), "--resume", str(tmp_path / "empty")]))
    assert "holds no checkpoint.pt" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_train_resume_from_another_backbone_is_one_line(home, data, tmp_path):
    cfg = small_cfg(home, loop={"epochs": 1}, output_dir=str(tmp_path / "out"))
    fit(cfg, data, workdir=tmp_path / "run")
    conf = _config_file(cfg, tmp_path / "c.yaml", model__backbone="simple_cnn")
    ckpt = str(tmp_path / "run" / "checkpoint")
    line = _one_error_line(runner.invoke(app, ["train", str(conf), "--resume", ckpt]))
    assert "model.backbone: 'convnet5' in the checkpoint, 'simple_cnn' now" in line
    args = ["train", str(conf), "--resume", ckpt, "--resume-with-changes"]
    line = _one_error_line(runner.invoke(app, args))
    assert "holds weights of another network (model.backbone='convnet5'" in line


def test_diverging_train_is_one_line(home, data, tmp_path):
    cfg = small_cfg(home, optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0},
                    loop={"epochs": 3, "max_train_batches": 6}, output_dir=str(tmp_path / "out"))
    line = _one_error_line(runner.invoke(app, ["train", str(_config_file(cfg, tmp_path / "c.yaml"))]))
    assert "diverged" in line and "lower the learning rate" in line


def test_debug_run_does_not_block_the_real_run(home, data, tmp_path):
    from cxrtune.train import _check_output, train

    summary = train(small_cfg(home, output_dir=str(tmp_path / "out")), debug=True)
    assert summary["output_dir"] == str(tmp_path / "out-debug")
    assert (tmp_path / "out-debug" / "metrics.jsonl").is_file()
    _check_output(tmp_path / "out", None, overwrite=False)  # the real run may start
