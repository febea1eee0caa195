"""Classifier backbones, their heads and their pretrained weights.

A backbone is chosen by name from ``BACKBONES`` (``model_config.py``, which also holds
``ModelConfig``: configs are validated without torch). ``build_model`` builds it in its
native layout (3 input channels, 1000 ImageNet classes), loads the requested
weights into that layout (so pretrained keys match exactly), then resizes the
class layer to the task and the first convolution to the input channels.

Weights are only ever read from local files (``torch.load(..., weights_only=True)``);
nothing is downloaded: a missing file is a ConfigError that says where to put it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import ConfigError
from .model_config import (BACKBONES, CHEXNET_PREFIX, BackboneSpec, ModelConfig, imagenet_weights_file,
                           input_size)
from .registry import Registry

log = logging.getLogger(__name__)

NATIVE_CLASSES = 1000  # every backbone is first built with ImageNet's head, then resized
SHOW_KEYS = 5  # how many offending state-dict keys an error message lists


# ---------------------------------------------------------------- heads and small CNNs


class DropoutLinear(nn.Linear):
    """A class layer with dropout on its input, computed in float32.

    Under bf16 autocast a Linear would return bf16 logits: 8 mantissa bits make
    near-equal probabilities tie, which coarsens AUC and ECE. The head is a tiny part
    of the compute, so it always runs with autocast off, in the weights' dtype.

    It subclasses ``nn.Linear`` (instead of wrapping dropout and a Linear in a
    Sequential) so its state-dict keys stay ``<head>.weight``/``<head>.bias``
    whatever the dropout: checkpoints stay loadable across dropout settings and
    match torchvision's own head keys.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x, self.p, self.training)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def _flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of features ``features`` yields for one image, by a dry forward on zeros."""
    was_training = features.training
    features.eval()  # eval: BatchNorm accepts one 1x1 sample and keeps its running stats
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, image_size, image_size))
    except RuntimeError as exc:
        raise ConfigError(f"image size {image_size} is too small for this network: {exc}") from None
    finally:
        features.train(was_training)
    return out.flatten(1).shape[1]


class SimpleCNN(nn.Module):
    """The small CNN of the source reports: 3 convs (128-128-256), pools 4-2-2, FC 256."""

    def __init__(self, in_channels: int = 3, num_classes: int = NATIVE_CLASSES,
                 image_size: int = 224) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, pool in ((in_channels, 128, 4), (128, 128, 2), (128, 256, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(pool)]
        self.features = nn.Sequential(*layers)
        flat = _flat_size(self.features, in_channels, image_size)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(inplace=True),
                                    nn.Dropout(0.5))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(self.features(x)))


class ConvNet5(nn.Module):
    """The 5-conv CNN of the source reports: 16-64-128-256-512 convs, FC 64 (+BN)."""

    def __init__(self, in_channels: int = 3, num_classes: int = NATIVE_CLASSES,
                 image_size: int = 224) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = (in_channels, 16, 64, 128, 256, 512)
        for c_in, c_out in zip(widths, widths[1:]):
            # padding=1 keeps the conv size-neutral so 5 pools still leave 1x1 at 32 px
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2), nn.BatchNorm2d(c_out)]
        self.features = nn.Sequential(*layers)
        flat = _flat_size(self.features, in_channels, image_size)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(inplace=True),
                                    nn.BatchNorm1d(64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(self.features(x)))


# ---------------------------------------------------------------- registry


# name -> image_size -> the network in its native layout (3 channels, 1000 classes); the
# names are those of BACKBONES, whose table holds everything else about a backbone
BUILDERS: Registry[Callable[[int], nn.Module]] = Registry("backbone", names=BACKBONES.names())

_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def densenet_new_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename old DenseNet keys (``norm.1``, ``conv.2``) to torchvision's (``norm1``, ``conv2``).

    The torchvision ImageNet file and CheXNet were both saved before '.' was banned
    in module names; same pattern as torchvision's ``densenet._load_state_dict``.
    """
    out = {}
    for key, value in state.items():
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _torchvision(name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    """A builder for torchvision model ``name`` with random weights (they are loaded later)."""

    def build(image_size: int) -> nn.Module:
        return tvm.get_model(name, weights=None, **kwargs)

    build.__name__ = f"build_{name}"
    return build


# transform_input re-normalises 3 ImageNet channels (breaks on 1 channel); cxrtune
# normalises its own images, so it stays off even with pretrained weights.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": dict(aux_logits=True, transform_input=False, init_weights=True),
}
# backbones whose checkpoints (ImageNet's, CheXNet's) use legacy key names
_KEY_FIXES: dict[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {
    "densenet121": densenet_new_keys,
}


def _register_builders() -> None:
    """Every backbone with torchvision weights is a torchvision model; then the small CNNs."""
    for name in BACKBONES:
        if BACKBONES.get(name).weights_enum is not None:
            BUILDERS.add(name, _torchvision(name, **_TORCHVISION_KWARGS.get(name, {})))
    BUILDERS.add("simple_cnn", lambda size: SimpleCNN(image_size=size))
    BUILDERS.add("convnet5", lambda size: ConvNet5(image_size=size))


_register_builders()

# Inception's aux classifier pools the 17x17 Mixed_6e map with a 5x5/3 window and
# then applies a 5x5 conv: anything below 299 px leaves too small a map for it.
INCEPTION_AUX_MIN_SIZE = 299


# ---------------------------------------------------------------- public API


def build_model(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> nn.Module:
    """Build ``cfg.backbone`` for ``num_classes`` classes and ``image_size`` px input,
    with the weights ``cfg.weights`` names."""
    cfg.validate()
    spec = BACKBONES.get(cfg.backbone, where="model.backbone")
    _check_image_size(cfg.backbone, spec, image_size)
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 1 class")
    model = BUILDERS.get(cfg.backbone)(image_size)
    _load_native_weights(model, cfg, spec)
    _resize_heads(model, spec, num_classes, cfg.dropout)
    _adapt_first_conv(model, spec.first_conv, cfg.in_channels)
    if spec.aux_head and image_size < INCEPTION_AUX_MIN_SIZE:
        _drop_inception_aux(model, image_size)
    if _is_state_dict_path(cfg.weights):
        load_state_dict_file(model, cfg.backbone, Path(cfg.weights).expanduser())
    return model


def logits_and_aux(output: Any) -> tuple[Tensor, Tensor | None]:
    """Split a forward output into (logits, auxiliary logits or None).

    Inception in training mode returns ``InceptionOutputs``; the engine adds
    0.4 x the aux loss. Every other case is a plain logits tensor.
    """
    if isinstance(output, tvm.InceptionOutputs):
        return output.logits, output.aux_logits
    return output, None


def head_parameters(model: nn.Module, backbone: str) -> list[nn.Parameter]:
    """Parameters of the class layer(s): the main head and any auxiliary head."""
    return [p for module in _head_modules(model, backbone) for p in module.parameters()]


def set_backbone_frozen(model: nn.Module, backbone: str, frozen: bool) -> None:
    """Turn gradients off (``frozen``) or on for every parameter except the head's.

    BatchNorm running statistics are buffers, not parameters: ``model.train()`` would
    let them drift; call :func:`keep_frozen_batchnorm_in_eval` after ``model.train()``.
    """
    head = {id(p) for p in head_parameters(model, backbone)}
    for param in model.parameters():
        param.requires_grad_(not frozen or id(param) in head)


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Put every BatchNorm whose affine parameters are all frozen in eval mode.

    A frozen layer must compute what it computed when its weights were learnt: in
    train mode it would normalise by batch statistics and update its running ones.
    Call it after ``model.train()`` (which puts every layer back in train mode)."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and params
                and not any(p.requires_grad for p in params)):
            module.eval()


# ---------------------------------------------------------------- building helpers


def _check_image_size(backbone: str, spec: BackboneSpec, image_size: int) -> None:
    if image_size < spec.min_size:
        raise ConfigError(f"image size {image_size} is too small for backbone {backbone!r}: "
                          f"it needs at least {spec.min_size} px (designed for {spec.input_size})")


def _head_modules(model: nn.Module, backbone: str) -> list[nn.Module]:
    spec = BACKBONES.get(backbone, where="model.backbone")
    paths = [spec.head] + ([spec.aux_head] if spec.aux_head else [])
    return [model.get_submodule(p) for p in paths if _has_submodule(model, p)]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _resize_heads(model: nn.Module, spec: BackboneSpec, num_classes: int, dropout: float) -> None:
    """Replace the class layer (and the aux one) by fresh ones for ``num_classes``."""
    heads = [(spec.head, dropout)] + ([(spec.aux_head, 0.0)] if spec.aux_head else [])
    for path, p in heads:
        old = model.get_submodule(path)
        assert isinstance(old, nn.Linear), f"{path} of {type(model).__name__} is not Linear"
        _replace_submodule(model, path, DropoutLinear(old.in_features, num_classes, p))


def _adapt_first_conv(model: nn.Module, path: str, in_channels: int) -> None:
    """Give the first conv ``in_channels`` inputs, keeping what it computes on gray images.

    For 1 channel the new weight is the old one summed over its 3 input channels,
    so a gray image gives the same activations as that image replicated to RGB.
    """
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d), f"{path} of {type(model).__name__} is not Conv2d"
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    with torch.no_grad():
        new.weight.copy_(_convert_conv_weight(old.weight, in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _replace_submodule(model, path, new)


def _convert_conv_weight(weight: Tensor, in_channels: int) -> Tensor:
    """Map a conv weight between 1 and 3 input channels, preserving gray-image outputs."""
    have = weight.shape[1]
    if have == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and in_channels == 3:
        return weight.repeat(1, 3, 1, 1) / 3.0
    return weight


def _drop_inception_aux(model: nn.Module, image_size: int) -> None:
    """Remove inception's aux classifier, which cannot run below 299 px (see above)."""
    log.info("inception_v3 at %d px: auxiliary classifier disabled (it needs >= %d px)",
             image_size, INCEPTION_AUX_MIN_SIZE)
    model.aux_logits = False
    model.AuxLogits = None


# ---------------------------------------------------------------- weights


def _fix_keys(backbone: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with ``backbone``'s legacy key names renamed (most backbones have none)."""
    fix = _KEY_FIXES.get(backbone)
    return fix(state) if fix is not None else state


def _is_state_dict_path(weights: str) -> bool:
    return weights not in ("none", "imagenet") and not weights.startswith(CHEXNET_PREFIX)


def _load_native_weights(model: nn.Module, cfg: ModelConfig, spec: BackboneSpec) -> None:
    """Load weights that match the native layout (before head/first-conv surgery)."""
    scheme = "chexnet" if cfg.weights.startswith(CHEXNET_PREFIX) else cfg.weights
    loader = _NATIVE_LOADERS.get(scheme)  # none and state-dict paths have no native loader
    if loader is not None:
        loader(model, cfg, spec)


def load_imagenet_weights(model: nn.Module, cfg: ModelConfig, spec: BackboneSpec) -> None:
    """Load the backbone's default torchvision weights from the local torch hub cache."""
    path, url = imagenet_weights_file(cfg.backbone)
    if not path.is_file():
        raise ConfigError(
            f"ImageNet weights for {cfg.backbone!r} are not in the local cache: expected file "
            f"{path.name} in directory {path.parent} (nothing is downloaded). On a machine with "
            f"internet fetch {url} and copy it there (or set TORCH_HOME to where it is).")
    state = _fix_keys(cfg.backbone, _read_state_dict(path))
    _load_strict(model, state, path, "torchvision ImageNet")
    log.info("loaded ImageNet weights for %s from %s", cfg.backbone, path)


def load_chexnet_weights(model: nn.Module, cfg: ModelConfig, spec: BackboneSpec) -> None:
    """Load the CheXNet DenseNet-121 feature extractor (arnoweng/CheXNet ``model.pth.tar``).

    Its 14-class head is dropped; every feature key must match, since a partial
    load would silently train from a half-random network.
    """
    path = Path(cfg.weights[len(CHEXNET_PREFIX):]).expanduser()
    raw = _read_state_dict(path, "the CheXNet DenseNet-121 checkpoint (arnoweng/CheXNet model.pth.tar, "
                                 "a torch.save file with a 'state_dict')")
    state = _strip_prefix(_strip_prefix(raw, "module."), "densenet121.")
    state = {k: v for k, v in densenet_new_keys(state).items() if not k.startswith("classifier.")}
    expected = {f"features.{k}" for k in model.features.state_dict()}
    missing, unexpected = _key_mismatch(expected, state)
    if missing or unexpected:
        raise ConfigError(f"{path} is not a CheXNet DenseNet-121 checkpoint: "
                          f"{_describe_mismatch(missing, unexpected)}")
    features = {k[len("features."):]: v for k, v in state.items()}
    _load_strict(model.features, features, path, "CheXNet DenseNet-121")
    log.info("loaded CheXNet DenseNet-121 features from %s", path)


_NATIVE_LOADERS: dict[str, Callable[[nn.Module, ModelConfig, BackboneSpec], None]] = {
    "imagenet": load_imagenet_weights,
    "chexnet": load_chexnet_weights,
}


def load_state_dict_file(model: nn.Module, backbone: str, path: Path) -> None:
    """Load a state dict saved for ``backbone`` into the built (task-sized) model.

    The head is loaded when its shape fits the task and skipped with a warning
    otherwise (e.g. ImageNet's 1000 classes); a 3-channel first conv is summed to
    1 channel (or 1 replicated to 3); every other key must match exactly.
    """
    spec = BACKBONES.get(backbone, where="model.backbone")
    state = _fix_keys(backbone, _strip_prefix(_read_state_dict(path), "module."))
    own = model.state_dict()
    conv_key = f"{spec.first_conv}.weight"
    if conv_key in state and conv_key in own:
        state[conv_key] = _convert_conv_weight(state[conv_key], own[conv_key].shape[1])
    head_keys = {k for k in own if _is_head_key(k, spec)}
    state = _keep_fitting_head(state, own, head_keys, path)
    state, aux_keys = _match_aux(state, own, spec, path)
    optional = head_keys | aux_keys
    missing, unexpected = _key_mismatch(set(own) - optional, state, ignore=optional)
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit backbone {backbone!r}: "
                          f"{_describe_mismatch(missing, unexpected)}")
    # optional keys the file lacks keep their fresh values, so the load below is strict
    merged = {**{k: own[k] for k in optional}, **state}
    _load_strict(model, merged, path, f"{backbone} state dict")
    log.info("loaded %s weights from %s", backbone, path)


def _is_head_key(key: str, spec: BackboneSpec) -> bool:
    heads = [spec.head] + ([spec.aux_head] if spec.aux_head else [])
    return any(key.startswith(h + ".") for h in heads)


def _keep_fitting_head(state: dict[str, Tensor], own: Mapping[str, Tensor],
                       head_keys: set[str], path: Path) -> dict[str, Tensor]:
    """Drop the file's head tensors whose shape does not fit the task (with a warning)."""
    file_head = [k for k in state if k in head_keys]
    misfit = [k for k in file_head if state[k].shape != own[k].shape]
    if misfit:
        log.warning("%s: class layer %s has shape %s but the task needs %s: head skipped, "
                    "it starts from random weights", path, misfit[0],
                    tuple(state[misfit[0]].shape), tuple(own[misfit[0]].shape))
        # a head is loaded whole or not at all: weight without its bias makes no sense
        drop = {k.rpartition(".")[0] for k in misfit}
        return {k: v for k, v in state.items() if k.rpartition(".")[0] not in drop}
    if head_keys and not file_head:
        log.warning("%s: no class-layer weights in the file; the head starts random", path)
    return state


def _match_aux(state: dict[str, Tensor], own: Mapping[str, Tensor], spec: BackboneSpec,
               path: Path) -> tuple[dict[str, Tensor], set[str]]:
    """Make the auxiliary classifier optional in both directions.

    Inception drops its aux classifier below 299 px, so a checkpoint trained at
    224 px lacks it and one trained at 299 px has it; it only helps training, so
    a mismatch is not an error. Returns (state without unusable aux keys, model aux keys).
    """
    if spec.aux_module is None:
        return state, set()
    prefix = spec.aux_module + "."
    own_aux = {k for k in own if k.startswith(prefix)}
    file_aux = {k for k in state if k.startswith(prefix)}
    if file_aux and not own_aux:
        log.info("%s: auxiliary classifier weights ignored (the model has none)", path)
        state = {k: v for k, v in state.items() if k not in file_aux}
    elif own_aux and not file_aux:
        log.warning("%s: no auxiliary classifier weights; it starts random", path)
    return state, own_aux


def _read_state_dict(path: Path, expected: str = "a PyTorch state dict saved with torch.save "
                     "(.pt/.pth)") -> dict[str, Tensor]:
    """Read a state dict, unwrapping ``{'state_dict': ...}`` or ``{'model': ...}``;
    ``expected`` says in an error what the file should have been."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage input raises anything (KeyError, EOFError, ...)
        # torch's own message for a non-checkpoint is an opaque byte value ("KeyError: 101")
        raise ConfigError(f"{path} is not PyTorch weights: {_unreadable_kind(path, exc)}; "
                          f"expected {expected}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: not a state dict (expected a mapping of names to tensors, "
                          "optionally under 'state_dict' or 'model')")
    return dict(obj)


def _unreadable_kind(path: Path, exc: Exception) -> str:
    """What a file torch.load rejected is, in words."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":  # torch.save writes a zip archive since PyTorch 1.6
        return f"a damaged or incompatible torch.save archive ({type(exc).__name__}: {exc})".splitlines()[0]
    if magic[:1] == b"\x80":  # a pickle: legacy torch.save, or pickled non-tensor objects
        return f"a pickle torch cannot load safely ({type(exc).__name__}: {exc})".splitlines()[0]
    return "not a file written by torch.save (neither a zip archive nor a pickle)"


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from keys that have it (DataParallel's ``module.`` etc.)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _key_mismatch(expected: set[str], state: Mapping[str, Tensor],
                  ignore: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys. Missing ``num_batches_tracked`` is fine: checkpoints
    from PyTorch < 0.4 have none and BatchNorm fills it in on load."""
    missing = sorted(k for k in expected - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - expected - ignore)
    return missing, unexpected


def _describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
            parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:SHOW_KEYS])}{more}")
    return "; ".join(parts)


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a ConfigError naming the file on mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit as {what} weights: {exc}") from None


__all__ = [
    "ModelConfig", "BackboneSpec", "BACKBONES", "BUILDERS", "build_model", "input_size",
    "logits_and_aux", "head_parameters", "set_backbone_frozen", "keep_frozen_batchnorm_in_eval",
    "imagenet_weights_file",
    "load_state_dict_file", "densenet_new_keys", "DropoutLinear", "SimpleCNN", "ConvNet5",
]
