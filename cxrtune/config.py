"""Typed, frozen configs and their YAML loading.

Every config is a frozen dataclass. ``from_dict`` builds one from plain YAML data,
rejecting unknown keys (naming the key and the valid ones) and values of the
wrong type (naming the key, the value and the expected type). All problems of a
file are collected and reported together, so a user fixes a YAML in one pass.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence, TypeVar

import yaml

# the components' light modules: configs (and so `cxrtune validate`) never import torch
from .data.augment_config import AugmentConfig
from .data.cxrnorm_config import CXRNormConfig
from .data.dedupe import DEDUPE_MODE_NAMES, DEDUPE_MODES
from .data.labels import SCHEMES
from .data.sampler_names import SAMPLERS
from .data.sources import SOURCES
from .errors import ConfigError
from .loss_config import LossConfig
from .metrics import check_metric_name
from .model_config import ModelConfig
from .optim_config import OptimConfig, ScheduleConfig
from .selection import resolve_mode

C = TypeVar("C")


def cxrtune_home() -> Path:
    """Where generated data, caches and splits live by default ($CXRTUNE_HOME or ./cxrtune_data)."""
    return Path(os.environ.get("CXRTUNE_HOME", "cxrtune_data")).expanduser()


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from, which task they serve and how they are split and cached."""

    source: str = "synthetic"  # see `cxrtune data sources`
    root: str | None = None  # dataset folder (or CSV for source=csv); synthetic: generated here
    task: str = "three_class"  # binary | three_class | four_class | multi_to_binary
    image_size: int = 224  # side of the square images the cache stores
    split_seed: int = 0
    val_fraction: float = 0.2  # of train+val, drawn grouped by patient
    test_fraction: float = 0.2  # only when the source has no official test split
    resplit_test: bool = False  # ignore the official test split and draw a new one
    folds: int = 0  # k-fold CV over train+val (0 = a single train/val split)
    fold: int = 0  # which fold is validation when folds > 0
    min_class_count: int = 3  # a task class with fewer images (after mapping) is an error naming the fix
    on_bad_image: str = "error"  # error | skip
    cache_dir: str | None = None  # default: <CXRTUNE_HOME>/cache
    synthetic_n: int = 600  # images generated when source=synthetic
    workers: int = 0  # decoding processes (0 = all cores)
    # CXR-Norm results memoised on disk beside the cache (CPU trials): least recently used
    # ones go beyond this many GB, so a long search's disk does not grow with its trials.
    memo_budget_gb: float = 20.0
    # Near-duplicate groups (the same radiograph filed twice): off | within_split |
    # across_splits (no group spans two splits) | all (one image per group); see data/dedupe.py.
    dedupe: str = "across_splits"
    # A text or CSV list of file names or globs removed from training only (never from
    # val/test); see data/exclusions.py and `cxrtune data inspect --write-exclusions`.
    exclude: str | None = None

    def resolved_root(self) -> Path:
        if self.root is not None:
            return Path(self.root).expanduser()
        if self.source == "synthetic":
            return cxrtune_home() / "synthetic"
        raise ConfigError(f"data.root is required for source {self.source!r}: set it to the "
                          "folder the dataset archive unpacked to")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else cxrtune_home() / "cache"

    def validate(self, where: str = "data") -> None:
        """Check values that a type alone does not constrain; all problems at once."""
        problems = []
        sources = ["synthetic", *SOURCES.names()]
        if self.source not in sources:
            problems.append(f"{where}.source={self.source!r}: unknown source; valid sources: {', '.join(sources)}")
        if self.task not in SCHEMES:
            problems.append(f"{where}.task={self.task!r}: unknown task; valid tasks: {', '.join(SCHEMES.names())}")
        if self.image_size < 16:
            problems.append(f"{where}.image_size={self.image_size}: must be an integer >= 16 (e.g. 224)")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                problems.append(f"{where}.{name}={v}: must be between 0 and 1 exclusive (e.g. 0.2)")
        if self.folds == 1 or self.folds < 0:
            problems.append(f"{where}.folds={self.folds}: must be 0 (off) or >= 2 (e.g. 5)")
        if self.folds >= 2 and not 0 <= self.fold < self.folds:
            problems.append(f"{where}.fold={self.fold}: must be in 0..{self.folds - 1}")
        if self.min_class_count < 1:
            problems.append(f"{where}.min_class_count={self.min_class_count}: must be >= 1")
        if self.on_bad_image not in ("error", "skip"):
            problems.append(f"{where}.on_bad_image={self.on_bad_image!r}: must be 'error' or 'skip'")
        if self.synthetic_n < 20:
            problems.append(f"{where}.synthetic_n={self.synthetic_n}: must be >= 20")
        if self.workers < 0:
            problems.append(f"{where}.workers={self.workers}: must be >= 0 (0 = all cores)")
        if self.memo_budget_gb < 0:
            problems.append(f"{where}.memo_budget_gb={self.memo_budget_gb}: must be >= 0 (0 = keep no memo files)")
        if self.dedupe not in DEDUPE_MODES:
            problems.append(f"{where}.dedupe={self.dedupe!r}: unknown mode; valid modes: "
                            f"{', '.join(DEDUPE_MODE_NAMES)} (default across_splits)")
        if self.exclude is not None and not Path(self.exclude).expanduser().is_file():
            problems.append(f"{where}.exclude={self.exclude!r}: file {Path(self.exclude).expanduser()} does "
                            "not exist; fix: give the path of a text or CSV list of file names (e.g. one "
                            "written by `cxrtune data inspect --write-exclusions FILE`), or leave "
                            f"{where}.exclude unset")
        if problems:
            raise ConfigError("invalid data config:\n  " + "\n  ".join(problems))


INPUT_PIPELINES = ("auto", "dataloader", "device")


@dataclass(frozen=True)
class LoopConfig:
    """How one trial trains: length, batches, selection, numerics, devices."""

    epochs: int = 50
    batch_size: int = 32
    eval_batch_size: int = 128
    seed: int = 0
    select_metric: str = "val/f1_macro"  # what the best checkpoint (and the search) selects on
    # None: follows from select_metric (losses / ece are minimised, the rest maximised);
    # an explicit max | min must agree with the metric (see cxrtune.selection)
    select_mode: str | None = None
    early_stopping_patience: int = 0  # epochs without improvement before stopping (0 = off)
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    aux_loss_weight: float = 0.4  # Inception's auxiliary classifier
    device: str = "auto"  # auto (cuda:0 when present, else cpu) | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model
    # Every RNG is seeded either way; true also forces deterministic kernels (and no cuDNN
    # autotuning), which cost ResNet-50 about a fifth of its speed on an H200 (610 against
    # 770 images/s in a trial) for bit-identical reruns on the same GPU. CPU runs are
    # reproducible either way.
    deterministic: bool = False
    num_workers: int = 0  # DataLoader processes; the cache makes 0-2 enough on most machines
    # dataloader: per-image tensors and augmentation on the CPU (DataLoader workers);
    # device: the images held on the device once, batches gathered by index and augmented
    # as a whole there (data/device_batches.py); auto: device on CUDA, dataloader on CPU.
    input_pipeline: str = "auto"
    gpu_share: float = 1.0  # of the GPU this run may fill with its images (a search sets its trials' share)
    max_train_batches: int = 0  # cap per epoch (0 = all); --debug sets it
    max_eval_batches: int = 0
    # Measure the model's cost (parameters, FLOPs, latency as the median of this many timed
    # passes; cost.py) and report it with every epoch; 0 = off. A search whose objectives or
    # selection rule name a cost metric turns it on.
    cost_repeats: int = 0

    def validate(self, where: str = "loop") -> None:
        problems = []
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{where}.{name}={getattr(self, name)}: must be an integer >= 1")
        try:
            resolve_mode(self.select_metric, self.select_mode, f"{where}.select_mode")
        except ConfigError as exc:
            problems.append(str(exc))
        for name in ("early_stopping_patience", "num_workers", "max_train_batches", "max_eval_batches",
                     "cost_repeats"):
            if getattr(self, name) < 0:
                problems.append(f"{where}.{name}={getattr(self, name)}: must be >= 0")
        if self.grad_clip < 0 or self.aux_loss_weight < 0:
            problems.append(f"{where}.grad_clip / aux_loss_weight: must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"{where}.device={self.device!r}: must be auto, cpu, cuda or cuda:N")
        if not 0.0 < self.gpu_share <= 1.0:
            problems.append(f"{where}.gpu_share={self.gpu_share}: must be in (0, 1]")
        if self.input_pipeline not in INPUT_PIPELINES:
            problems.append(f"{where}.input_pipeline={self.input_pipeline!r}: must be one of "
                            f"{', '.join(INPUT_PIPELINES)}")
        if problems:
            raise ConfigError("invalid loop config:\n  " + "\n  ".join(problems))

    @property
    def mode(self) -> str:
        """The direction of select_metric ("max" or "min"): best checkpoint, plateau
        schedule and early stopping all use this one value."""
        return resolve_mode(self.select_metric, self.select_mode, "loop.select_mode")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs. Defaults follow the source reports' baseline:
    224 px grayscale, batch 32, Adam 1e-3, ReduceLROnPlateau x0.1 after 5 epochs."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: CXRNormConfig = field(default_factory=CXRNormConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: str = "shuffle"  # shuffle | oversample | undersample
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    output_dir: str = "cxrtune_runs/train"

    def validate(self) -> None:
        """Every section's checks plus the cross-section ones; all problems in one error."""
        problems: list[str] = []
        checks = [self.data.validate, self.preprocess.validate, self.augment.validate,
                  self.model.validate, self.optimizer.validate, self.schedule.validate,
                  self.loop.validate, lambda: SAMPLERS.check(self.sampler, where="sampler")]
        for check in checks:
            try:
                check()
            except ConfigError as exc:
                problems.append(str(exc))
        if self.data.task in SCHEMES:
            scheme = SCHEMES.get(self.data.task)
            try:
                self.loss.validate(num_classes=scheme.num_classes)
                if self.loop.select_metric != "val/loss":
                    check_metric_name(self.loop.select_metric, scheme.classes,
                                      list(scheme.binary_groups) or False, where="loop.select_metric")
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("\n".join(problems))


def load_trial_config(path: str | Path | None, overrides: list[str] = ()) -> TrialConfig:
    """A validated TrialConfig from a YAML file (or the defaults) plus --set overrides."""
    data = read_yaml(path) if path else {}
    if path and not data:
        # An empty file is almost always a mistake (wrong file, truncated write); silently
        # training the built-in 50-epoch defaults would hide it.
        raise ConfigError(f"config file {path} is empty: put the settings in it (see "
                          "configs/baseline.yaml), or leave out the file to train the built-in defaults")
    cfg = from_dict(TrialConfig, apply_overrides(data, list(overrides)), "", str(path or "defaults"))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path or 'defaults'}: {exc}") from None
    return cfg


# ---------------------------------------------------------------- generic loading


# YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; YAML 1.2 and users read a number.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the (lightly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}={value!r}: expected {' or '.join(type_name(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return value
        return _build(tp, value, key, problems)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}={value!r}: expected a list")
            return value
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{key}={value!r}: expected a mapping")
        return dict(value) if isinstance(value, Mapping) else value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        problems.append(f"{key}={value!r}: expected true or false")
        return value
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{key}={value!r}: expected an integer")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{key}={value!r}: expected {type_name(tp)}")
    return value


def _build(cls: type[C], data: Mapping[str, Any], where: str, problems: list[str]) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    for k in unknown:
        problems.append(f"{where}.{k}: unknown key; valid keys: {', '.join(fields)}" if where
                        else f"{k}: unknown key; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        if name in fields:
            key = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(value, hints[name], key, problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reached when problems were already recorded
        problems.append(f"{where}: {exc}")
        return None  # type: ignore[return-value]


def from_dict(cls: type[C], data: Mapping[str, Any] | None, where: str = "", source: str = "") -> C:
    """Build the frozen dataclass ``cls`` from YAML-like data, or raise one ConfigError
    listing every unknown key and mistyped value (prefixed by ``source``, e.g. the file)."""
    problems: list[str] = []
    obj = _build(cls, data or {}, where, problems)
    if problems:
        head = f"{source}: " if source else ""
        raise ConfigError(f"{head}invalid config:\n  " + "\n  ".join(problems))
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str],
                    flat_sections: Collection[str] = ()) -> dict[str, Any]:
    """A copy of nested config ``data`` with ``key.sub=value`` overrides applied (values
    parsed as YAML); key order is kept.

    Below a section named in ``flat_sections`` (a search space's ``space``) the entries'
    names are dotted themselves: ``space.optimizer.lr.low=...`` sets ``low`` of the entry
    ``optimizer.lr``, ``space.model.dropout={...}`` sets (or adds) the entry
    ``model.dropout`` and ``space.sampler=null`` removes the entry ``sampler``."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. data.task=binary")
        key, raw = item.split("=", 1)
        path = _override_path(out, key.strip().split("."), flat_sections)
        node = out
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = node[part]
        value = yaml.safe_load(raw)
        if value is None and len(path) > 1 and path[0] in flat_sections:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


def _override_path(data: Mapping[str, Any], parts: list[str], flat_sections: Collection[str]) -> list[str]:
    """The keys an override walks. Below a flat section one key is a dotted name: the
    longest existing entry that starts the rest of the key, else the whole rest."""
    if len(parts) < 2 or parts[0] not in flat_sections:
        return parts
    section = data.get(parts[0]) or {}
    rest = ".".join(parts[1:])
    owner = max((k for k in section if isinstance(k, str) and (rest == k or rest.startswith(k + "."))),
                key=len, default=rest)
    tail = rest[len(owner) + 1:]
    return [parts[0], owner, *(tail.split(".") if tail else [])]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config (for saving the resolved config next to results)."""
    return dataclasses.asdict(cfg)


__all__ = ["DataConfig", "LoopConfig", "TrialConfig", "load_trial_config", "from_dict", "read_yaml",
           "apply_overrides", "to_dict"]
