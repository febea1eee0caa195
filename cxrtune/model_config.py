"""Which network a trial trains: ``ModelConfig`` and the backbone table, without torch.

``BACKBONES`` names every backbone with the parts of it that configs and `cxrtune
validate` need to know (weights, head and first-conv paths, input sizes, the ImageNet
weights file). The networks themselves are built in ``models.py``, by name, when a
trial starts: validating a config or a search space never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .registry import Registry

CHEXNET_PREFIX = "chexnet:"
# torchvision's URL of every ImageNet weights file in the table below
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train and how it starts."""

    backbone: str = "densenet121"  # see BACKBONES
    weights: str = "none"  # none | imagenet | chexnet:PATH | path to a state dict (.pt/.pth)
    in_channels: int = 1  # 1 (grayscale) or 3 (gray replicated)
    dropout: float = 0.0  # before the class layer (torchvision heads keep their own)
    freeze_epochs: int = 0  # train only the head for the first N epochs

    def validate(self, where: str = "model") -> None:
        """Check every field; one ConfigError lists all problems."""
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"{where}.backbone={self.backbone!r}: unknown backbone; "
                            f"valid backbones: {', '.join(BACKBONES.names())}")
        problems.extend(_weights_problems(self.weights, self.backbone, where))
        if self.in_channels not in (1, 3):
            problems.append(f"{where}.in_channels={self.in_channels}: must be 1 (grayscale) "
                            "or 3 (gray replicated to RGB)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{where}.dropout={self.dropout}: must be in [0, 1) (e.g. 0.2)")
        if self.freeze_epochs < 0:
            problems.append(f"{where}.freeze_epochs={self.freeze_epochs}: must be >= 0 (0 = off)")
        if problems:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))


def _weights_problems(weights: str, backbone: str, where: str) -> list[str]:
    """Problems with a weights spec that can be seen without reading the file."""
    key = f"{where}.weights={weights!r}"
    if weights == "none":
        return []
    spec = BACKBONES.get(backbone) if backbone in BACKBONES else None  # unknown: reported apart
    if weights == "imagenet":
        if spec is not None and spec.weights_enum is None:
            return [f"{key}: backbone {backbone!r} has no ImageNet weights; use 'none' or a "
                    "path to a state dict"]
        return []
    if weights.startswith(CHEXNET_PREFIX):
        path = weights[len(CHEXNET_PREFIX):]
        problems = []
        if backbone != "densenet121":
            problems.append(f"{key}: CheXNet weights exist only for backbone 'densenet121'")
        if not path:
            problems.append(f"{key}: give the checkpoint path, e.g. chexnet:/models/model.pth.tar")
        elif not Path(path).expanduser().is_file():
            problems.append(f"{key}: CheXNet checkpoint {path} does not exist")
        return problems
    if not Path(weights).expanduser().is_file():
        return [f"{key}: neither 'none', 'imagenet', 'chexnet:PATH' nor an existing "
                "state-dict file; check the spelling or the path"]
    return []


# ---------------------------------------------------------------- the backbone table


@dataclass(frozen=True)
class BackboneSpec:
    """Where one backbone's parts live and what it was designed for."""

    weights_enum: str | None  # torchvision weights enum (its DEFAULT is "imagenet"), None: no weights
    head: str  # attribute path of the class layer (an nn.Linear)
    first_conv: str  # attribute path of the first nn.Conv2d
    weights_file: str | None = None  # file name of weights_enum.DEFAULT (a test checks it)
    input_size: int = 224  # the size the network was designed (and pretrained) for
    min_size: int = 32  # smallest input it trains on
    aux_head: str | None = None  # attribute path of an auxiliary class layer
    aux_module: str | None = None  # the whole auxiliary classifier (optional in checkpoints)


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _add_torchvision() -> None:
    """The torchvision backbones; heads/first convs are torchvision's attribute names."""
    resnet = dict(head="fc", first_conv="conv1")
    vgg = dict(head="classifier.6", first_conv="features.0")
    efficientnet = dict(head="classifier.1", first_conv="features.0.0")
    table: dict[str, tuple[str, str, dict[str, str]]] = {
        "densenet121": ("DenseNet121_Weights", "densenet121-a639ec97.pth",
                        dict(head="classifier", first_conv="features.conv0")),
        "resnet18": ("ResNet18_Weights", "resnet18-f37072fd.pth", resnet),
        "resnet34": ("ResNet34_Weights", "resnet34-b627a593.pth", resnet),
        "resnet50": ("ResNet50_Weights", "resnet50-11ad3fa6.pth", resnet),
        "resnet101": ("ResNet101_Weights", "resnet101-cd907fc2.pth", resnet),
        "vgg16_bn": ("VGG16_BN_Weights", "vgg16_bn-6c64b313.pth", vgg),
        "vgg19_bn": ("VGG19_BN_Weights", "vgg19_bn-c79401a0.pth", vgg),
        "efficientnet_b0": ("EfficientNet_B0_Weights", "efficientnet_b0_rwightman-7f5810bc.pth",
                            efficientnet),
        "efficientnet_b1": ("EfficientNet_B1_Weights", "efficientnet_b1-c27df63c.pth", efficientnet),
        "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "mobilenet_v3_large-5c1a4163.pth",
                               dict(head="classifier.3", first_conv="features.0.0")),
    }
    for name, (enum, file, parts) in table.items():
        BACKBONES.add(name, BackboneSpec(weights_enum=enum, weights_file=file, **parts))
    BACKBONES.add("inception_v3", BackboneSpec(
        weights_enum="Inception_V3_Weights", weights_file="inception_v3_google-0cc3c7bd.pth",
        head="fc", first_conv="Conv2d_1a_3x3.conv", input_size=299, min_size=75,
        aux_head="AuxLogits.fc", aux_module="AuxLogits"))


def _add_small_cnns() -> None:
    """The two small CNNs of the source reports (no pretrained weights)."""
    BACKBONES.add("simple_cnn", BackboneSpec(weights_enum=None, head="fc", first_conv="features.0",
                                             min_size=16))
    BACKBONES.add("convnet5", BackboneSpec(weights_enum=None, head="fc", first_conv="features.0",
                                           min_size=32))


_add_torchvision()
_add_small_cnns()


def input_size(backbone: str) -> int:
    """The input size ``backbone`` was designed for (224; 299 for inception_v3)."""
    return BACKBONES.get(backbone, where="model.backbone").input_size


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: $TORCH_HOME/hub, where TORCH_HOME
    defaults to $XDG_CACHE_HOME/torch and XDG_CACHE_HOME to ~/.cache (torch's own rule;
    cxrtune never calls ``torch.hub.set_dir``, the only other way to move it)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def imagenet_weights_file(backbone: str) -> tuple[Path, str]:
    """(local cache file, download URL) of ``backbone``'s default torchvision weights."""
    spec = BACKBONES.get(backbone, where="model.backbone")
    if spec.weights_file is None:
        raise ConfigError(f"backbone {backbone!r} has no ImageNet weights")
    # resolved on every call: TORCH_HOME may change between runs (and in tests)
    return torch_hub_dir() / "checkpoints" / spec.weights_file, TORCHVISION_WEIGHTS_URL + spec.weights_file


__all__ = ["ModelConfig", "BackboneSpec", "BACKBONES", "CHEXNET_PREFIX", "input_size", "torch_hub_dir",
           "imagenet_weights_file"]
