"""The Ray cluster configs: cluster.yaml (AWS) and cluster-local.yaml (on-premises).

Both are checked the way `ray up` checks them, with Ray's own autoscaler code and offline (no AWS
account, credentials or network): Ray's defaults merged in (``prepare_config``), then Ray's schema
and cross-field checks (``validate_config``); the local config goes through the whole of ``ray up``'s
bootstrap, which needs no machine. Ray's schema lets any key through inside an AWS ``node_config``
(it is handed to EC2's RunInstances as is), so those are checked against botocore's own model of that
call. Beyond Ray: the pinned versions the nodes install are pyproject.toml's, the head starts an MLflow
server, and no port but SSH is open to the internet.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
CONFIGS = [pytest.param(AWS, id="aws"), pytest.param(LOCAL, id="local")]


# `ray up` on AWS needs boto3 (and with it botocore) anyway; cxrtune itself does not depend on it.
NO_BOTO = ("boto3 is not installed (pip install boto3): Ray's schema accepted the config, but EC2's "
           "parameter model and Ray's AWS security-group rules were not checked")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------ Ray's own checks


def run_instances_problems(node_config: dict) -> str:
    """What EC2's RunInstances would reject in ``node_config`` (an unknown or misspelled key, a wrong
    type), by botocore's model of the call; "" when nothing. ``SubnetIds`` is Ray's own key (it
    launches in one of them as ``SubnetId``); Ray adds MinCount/MaxCount itself."""
    pytest.importorskip("botocore", reason=NO_BOTO)
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    params = {k: v for k, v in node_config.items() if k != "SubnetIds"}
    params.update(MinCount=1, MaxCount=1)
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


def ray_up_checks(config: dict) -> dict:
    """The config as ``ray up`` resolves it before touching a machine or a cloud API, raising what
    ``ray up`` would raise (ray.autoscaler._private.commands._bootstrap_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(config)
    if config.get("provider", {}).get("type") == "local":
        from ray.autoscaler._private.commands import _bootstrap_config

        return _bootstrap_config(config, no_config_cache=True)
    prepared = prepare_config(config)
    validate_config(prepared)
    for name, node_type in prepared["available_node_types"].items():
        problems = run_instances_problems(node_type["node_config"])
        if problems:
            raise ValueError(f"available_node_types.{name}.node_config: {problems}")
    return prepared


@pytest.mark.parametrize("path", CONFIGS)
def test_ray_accepts_the_config(path):
    resolved = ray_up_checks(load(path))
    assert resolved["head_node_type"] in resolved["available_node_types"]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# Each mistake is made in a copy of the real file and must be refused by the checks above.
AWS_MISTAKES = {
    "misspelled top-level key": (lambda c: _rename(c, "idle_timeout_minutes", "idle_timeout_minute"),
                                 jsonschema.ValidationError),
    "misspelled start commands key": (lambda c: _rename(c, "head_start_ray_commands", "head_start_commands"),
                                      jsonschema.ValidationError),
    "misspelled node type key": (lambda c: _rename(c["available_node_types"]["gpu-1x"], "min_workers",
                                                   "min_worker"), jsonschema.ValidationError),
    "misspelled auth key": (lambda c: _rename(c["auth"], "ssh_user", "ssh_usr"), jsonschema.ValidationError),
    "node type without node_config": (lambda c: c["available_node_types"]["gpu-4x"].pop("node_config"),
                                      jsonschema.ValidationError),
    "non-integer GPU count": (lambda c: c["available_node_types"]["gpu-1x"]["resources"].update(GPU="one"),
                              jsonschema.ValidationError),
    "no head_node_type": (lambda c: c.pop("head_node_type"), ValueError),
    "min_workers above max_workers": (lambda c: c["available_node_types"]["gpu-1x"].update(min_workers=7),
                                      ValueError),
    "misspelled EC2 key in node_config": (lambda c: _rename(c["available_node_types"]["gpu-1x"]["node_config"],
                                                            "InstanceType", "InstanceTyp"), ValueError),
    "misspelled nested EC2 key": (lambda c: _rename(c["available_node_types"]["head"]["node_config"]
                                                    ["BlockDeviceMappings"][0]["Ebs"], "VolumeSize", "VolumeSise"),
                                  ValueError),
}

LOCAL_MISTAKES = {
    "misspelled top-level key": (lambda c: _rename(c, "worker_start_ray_commands", "worker_start_ray_command"),
                                 jsonschema.ValidationError),
    "misspelled auth key": (lambda c: _rename(c["auth"], "ssh_private_key", "ssh_private_keys"),
                            jsonschema.ValidationError),
    "misspelled head_ip": (lambda c: _rename(c["provider"], "head_ip", "head_ips"), click.ClickException),
    "no worker_ips": (lambda c: c["provider"].pop("worker_ips"), click.ClickException),
    "node types on-premises": (lambda c: c.update(available_node_types={"x": {"node_config": {}, "resources": {}}}),
                               click.ClickException),
}


@pytest.mark.parametrize(("path", "mistake", "error"),
                         [pytest.param(AWS, fn, err, id=f"aws: {name}") for name, (fn, err) in AWS_MISTAKES.items()]
                         + [pytest.param(LOCAL, fn, err, id=f"local: {name}")
                            for name, (fn, err) in LOCAL_MISTAKES.items()])
def test_a_mistake_in_the_config_is_refused(path, mistake, error):
    config = load(path)
    mistake(config)
    with pytest.raises(error):
        ray_up_checks(config)


# ------------------------------------------------------------------ node types


def test_aws_gpu_workers_autoscale_and_fit_a_cxrnorm_trial():
    config = load(AWS)
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    trial = load(ROOT / "cxrtune" / "search_spaces" / "cxrnorm.yaml")["resources"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 4]
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["resources"]["CPU"] >= trial["cpu"] and t["resources"]["GPU"] >= trial["gpu"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


# ------------------------------------------------------------------ what every node installs


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies(text: str) -> list[str]:
    """pyproject.toml's [project] dependencies (tomllib from Python 3.11; read off the text before)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
        assert block, "pyproject.toml has no [project] dependencies list"
        return re.findall(r'^\s*"([^"]+)",?\s*(?:#.*)?$', block[1], re.M)
    return tomllib.loads(text)["project"]["dependencies"]


def pyproject_pins() -> dict[str, str]:
    """name -> version of every ``==`` pin in pyproject.toml's dependencies, plus the torch and
    torchvision the tests run against (named in the comment above them)."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = {}
    for dep in project_dependencies(text):
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*==\s*(\S+)\s*", dep)
        if m:
            pins[normalize(m[1])] = m[2]
    torch = re.search(r"installs torch==(\S+) torchvision==(\S+)", text)
    assert torch, "pyproject.toml no longer names the torch/torchvision pair the tests run against"
    pins.update(torch=torch[1], torchvision=torch[2])
    return pins


PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?==([^\s\"';&|)]+)")


def pin_problems(config: dict) -> list[str]:
    """How the versions ``setup_commands`` (run on every node) install differ from pyproject.toml's."""
    installed: dict[str, set[str]] = {}
    for cmd in config.get("setup_commands", []):
        for m in PIN.finditer(cmd):
            installed.setdefault(normalize(m[1]), set()).add(m[2])
    problems = []
    for name, version in pyproject_pins().items():
        if installed.get(name) != {version}:
            problems.append(f"{name}: pyproject.toml pins {version}, setup_commands install "
                            f"{sorted(installed.get(name, [])) or 'nothing'}")
    problems += [f"{name}=={sorted(v)} is not pinned in pyproject.toml"
                 for name, v in installed.items() if name not in pyproject_pins()]
    return problems


@pytest.mark.parametrize("path", CONFIGS)
def test_every_node_installs_pyprojects_pins(path):
    assert pin_problems(load(path)) == []


@pytest.mark.parametrize("path", CONFIGS)
def test_no_other_command_installs_another_version(path):
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(load(path))  # Ray's defaults and the node types' own command lists merged in
    lists = [config.get(k, []) for k in ("initialization_commands", "head_setup_commands", "worker_setup_commands")]
    lists += [t.get(k, []) for t in config["available_node_types"].values()
              for k in ("initialization_commands", "worker_setup_commands")]
    pins = pyproject_pins()
    for cmd in (c for cmds in lists for c in cmds):
        for m in PIN.finditer(cmd):
            assert pins.get(normalize(m[1])) == m[2], cmd


@pytest.mark.parametrize(("old", "new"), [("mlflow==3.17.2", "mlflow==3.17.1"), ("torch==2.14.1", "torch"),
                                          (" optuna==5.0.0", ""), ("mlflow==3.17.2", "mlflow==3.17.2 numpy==2.0.0")])
def test_pin_drift_is_caught(old, new):
    config = load(AWS)
    changed = [c.replace(old, new) for c in config["setup_commands"]]
    assert changed != config["setup_commands"], f"{old!r} is no longer in cluster.yaml's setup_commands"
    config["setup_commands"] = changed
    assert pin_problems(config)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_node_installs_cxrtune_from_the_checkout(path):
    config = load(path)
    assert config["file_mounts"] == {"~/cxrtune": "."}
    assert ".gitignore" in config["rsync_filter"]  # local data, caches and runs stay behind
    assert any(re.search(r"pip install .*-e ~/cxrtune\b", c) for c in config["setup_commands"])


# ------------------------------------------------------------------ start commands


def mlflow_server(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bmlflow server\b", c)]


@pytest.mark.parametrize(("path", "host", "artifacts"), [(AWS, "0.0.0.0", "s3://BUCKET/mlflow"),
                                                         (LOCAL, "127.0.0.1", "/shared/cxrtune/mlflow")])
def test_the_head_starts_ray_and_an_mlflow_server(path, host, artifacts):
    config = load(path)
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert any(re.search(r"\bray start --head\b.*--port=6379", c) for c in head)
    assert any(re.search(r"\bray start --address=\$RAY_HEAD_IP:6379", c) for c in workers)
    assert not mlflow_server(workers)
    [server] = mlflow_server(head)
    assert "nohup " in server and re.search(r">\s*~/mlflow/server\.log 2>&1", server)
    assert server.rstrip(")").rstrip().endswith("&")  # in the background: `ray up` goes on
    assert re.search(r"--backend-store-uri sqlite:///\$HOME/", server)  # on the head's own disk
    assert "--serve-artifacts" in server and f"--artifacts-destination {artifacts}" in server
    assert f"--host {host} --port 5000" in server


# ------------------------------------------------------------------ network


def open_to_the_internet(config: dict) -> list[dict]:
    """Inbound rules of the security group Ray's AWS provider creates for this config (its own
    defaults plus provider.security_group.IpPermissions, built by Ray's own function) that open
    anything but TCP 22 to any address."""
    pytest.importorskip("boto3", reason=NO_BOTO)  # Ray's AWS module imports it
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    bad = []
    for rule in _create_default_inbound_rules({"sg-of-this-cluster"}, extra):
        anywhere = (any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
                    or any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])))
        ssh = rule.get("IpProtocol") == "tcp" and (rule.get("FromPort"), rule.get("ToPort")) == (22, 22)
        if anywhere and not ssh:
            bad.append(rule)
    return bad


def test_only_ssh_is_open_to_the_internet():
    config = load(AWS)
    assert open_to_the_internet(config) == []
    # the rules above are the ones that apply: no node brings a security group of its own
    assert not any("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values())


def test_an_open_port_is_caught():
    config = load(AWS)
    config["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    ray_up_checks(config)  # Ray itself has nothing against it
    assert [r["FromPort"] for r in open_to_the_internet(config)] == [5000]
