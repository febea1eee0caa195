import pytest

from cxrtune.config import DataConfig, apply_overrides, from_dict, read_yaml
from cxrtune.errors import ConfigError


def test_from_dict_builds_typed_frozen_config():
    cfg = from_dict(DataConfig, {"task": "binary", "image_size": 64, "val_fraction": 1}, "data")
    assert cfg.task == "binary" and cfg.image_size == 64 and cfg.val_fraction == 1.0
    with pytest.raises(AttributeError):
        cfg.task = "x"  # type: ignore[misc]


def test_unknown_keys_and_wrong_types_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict(DataConfig, {"tsak": "binary", "image_size": "big", "resplit_test": "yes"}, "data", "s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: ")
    assert "data.tsak: unknown key; valid keys: source, root, task" in msg
    assert "data.image_size='big': expected an integer" in msg
    assert "data.resplit_test='yes': expected true or false" in msg


def test_validate_names_value_and_fix():
    with pytest.raises(ConfigError) as e:
        DataConfig(val_fraction=1.5, folds=1, on_bad_image="ignore").validate()
    msg = str(e.value)
    assert "data.val_fraction=1.5" in msg and "data.folds=1" in msg and "'error' or 'skip'" in msg


def test_root_required_for_real_sources():
    with pytest.raises(ConfigError, match="data.root is required for source 'kermany'"):
        DataConfig(source="kermany").resolved_root()


def test_read_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(lst)


def test_overrides_parse_yaml_values():
    out = apply_overrides({"data": {"task": "binary"}}, ["data.image_size=64", "data.task=four_class", "x.y=[1, 2]"])
    assert out == {"data": {"task": "four_class", "image_size": 64}, "x": {"y": [1, 2]}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["novalue"])


def test_select_mode_follows_the_metric():
    from cxrtune.config import LoopConfig, load_trial_config

    assert LoopConfig().mode == "max"
    assert LoopConfig(select_metric="val/loss").mode == "min"
    assert LoopConfig(select_metric="val/ece", select_mode="min").mode == "min"
    assert load_trial_config(None, ["loop.select_metric=val/loss"]).loop.mode == "min"


def test_select_mode_contradicting_the_metric_is_an_error():
    from cxrtune.config import load_trial_config

    with pytest.raises(ConfigError) as e:
        load_trial_config(None, ["loop.select_metric=val/loss", "loop.select_mode=max"])
    msg = str(e.value)
    assert "loop.select_mode=max" in msg and "val/loss is lower-is-better" in msg


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    from cxrtune.config import load_trial_config

    assert load_trial_config(None, ["optimizer.lr=1e-3"]).optimizer.lr == 0.001
    f = tmp_path / "t.yaml"
    f.write_text("optimizer:\n  lr: 1e-3\n  weight_decay: 5E-5\n")
    cfg = load_trial_config(f)
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.weight_decay == 5e-5
    with pytest.raises(ConfigError, match="optimizer.lr='fast': expected float"):
        load_trial_config(None, ["optimizer.lr=fast"])


def test_focal_alpha_may_be_a_yaml_list(tmp_path):
    from cxrtune.config import load_trial_config

    f = tmp_path / "t.yaml"
    f.write_text("data: {task: binary}\nloss: {name: focal, alpha: [0.25, 0.75]}\n")
    assert load_trial_config(f).loss.alpha == (0.25, 0.75)
    f.write_text("data: {task: binary}\nloss: {name: focal, alpha: [0.5, 0.3, 0.2]}\n")
    with pytest.raises(ConfigError, match="has 3 values but the task has 2 classes"):
        load_trial_config(f)


def test_empty_config_file_is_refused(tmp_path):
    from cxrtune.config import load_trial_config

    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"config file .*empty.yaml is empty"):
        load_trial_config(f)
