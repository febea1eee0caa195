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
