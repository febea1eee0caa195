"""The best model of a search as an MLflow pyfunc model that carries its preprocessing.

What is logged (``ModelPackage.write``), as the pyfunc model's artifacts:

- ``weights.pt``: the network's state dict, read back with ``torch.load(...,
  weights_only=True)`` (no pickled code);
- ``cxrtune_model.json``: the ``ModelSpec``: the model config (backbone, channels,
  dropout), the preprocessing the trial trained and was tested with (task, classes, image
  size, CXR-Norm parameters, input mean and std) and how its evaluation ran (batch
  size, autocast, memory format).

The pyfunc model itself is "models from code" (``pyfunc_code.py``): no Python object is
pickled either; loading it needs the cxrtune package installed, nothing else.
``Classifier`` rebuilds the network with ``models.build_model`` and predicts as the test
evaluation did: ``images.py``'s decode, square crop and CXR-Norm, then
``augment.eval_transform(mean, std)`` and ``engine.eval_logits`` (eval mode, the trial's
channels and autocast, fp32 logits) and ``engine.probabilities`` (fp32 softmax).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from torch import nn

from ..config import LoopConfig, TrialConfig, from_dict, to_dict
from ..data.augment import eval_transform
from ..data.cxrnorm_config import CXRNormConfig
from ..engine import eval_logits, model_inputs, probabilities
from ..errors import ConfigError, DataError
from ..model_config import ModelConfig
from ..models import build_model
from .images import IMAGE_COLUMN, PATH_COLUMN, NamedImage, gray_of, images_of, model_image

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "SPEC_FILE", "WEIGHTS_FILE", "SPEC_ARTIFACT", "WEIGHTS_ARTIFACT", "PREDICTED",
           "BATCH_PARAM", "Preprocessing", "Prepared", "ModelSpec", "ModelPackage", "Classifier", "CXRClassifier", "spec_of",
           "signature", "input_example", "pyfunc_log_arguments"]

FORMAT_VERSION = 1  # of cxrtune_model.json; bump when its meaning changes
SPEC_FILE, WEIGHTS_FILE = "cxrtune_model.json", "weights.pt"
SPEC_ARTIFACT, WEIGHTS_ARTIFACT = "cxrtune_spec", "weights"  # the pyfunc artifacts' keys
PREDICTED = "predicted"  # the output column with the most probable class
BATCH_PARAM = "batch_size"  # the predict parameter: images per forward pass
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
# The input example's image side: small, so the example (and its check at log time) stays cheap.
_EXAMPLE_SIDE = 64


@dataclass(frozen=True)
class Preprocessing:
    """What an image goes through before the network, as the trial trained and was tested."""

    task: str
    classes: tuple[str, ...]
    image_size: int  # the square side of the image cache
    input_mean: float  # eval_transform's normalisation (the trial's training-image statistics)
    input_std: float
    in_channels: int
    cxrnorm: CXRNormConfig

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self), "classes": list(self.classes)}


@dataclass(frozen=True)
class ModelSpec:
    """``cxrtune_model.json``: everything but the weights a served model is rebuilt from."""

    model: ModelConfig  # weights "none": the weights file holds every weight
    preprocessing: Preprocessing
    batch_size: int = 128  # the trial's eval_batch_size: the test evaluation's batches
    amp: bool = True  # bf16 autocast on CUDA, as the trial evaluated (the CPU always runs fp32)
    channels_last: bool = True  # on CUDA
    folds: int = 1  # > 1: the fold models of a cross-validated trial, as one ensemble (cv.FoldEnsemble)
    format_version: int = FORMAT_VERSION
    cxrtune_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self), "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def read(cls, path: Path | str) -> "ModelSpec":
        """Read and check a ``cxrtune_model.json``; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the model's spec ({exc}); the model folder is incomplete: "
                              "download or log it again") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"{path}: format_version {version!r} is not one this cxrtune reads (<= "
                              f"{FORMAT_VERSION}); the model was written by a newer cxrtune: upgrade cxrtune")
        spec = from_dict(cls, data, source=str(path))
        # "none": every weight comes from the weights file; a pretrained file is never looked for
        spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, weights="none"))
        spec.model.validate()
        spec.preprocessing.cxrnorm.validate("preprocessing.cxrnorm")
        return spec

    def trial_config(self) -> TrialConfig:
        """The parts of a trial config the evaluation's forward pass reads (``engine.eval_logits``)."""
        loop = LoopConfig(eval_batch_size=self.batch_size, amp=self.amp, channels_last=self.channels_last)
        return TrialConfig(model=self.model, preprocess=self.preprocessing.cxrnorm, loop=loop)


def spec_of(trial: TrialConfig, preprocessing: Preprocessing, folds: int = 1) -> ModelSpec:
    """The spec of a model trained with ``trial`` (``folds`` > 1: its fold models' ensemble)."""
    from .. import __version__

    return ModelSpec(model=dataclasses.replace(trial.model, weights="none"), preprocessing=preprocessing,
                     batch_size=trial.loop.eval_batch_size, amp=trial.loop.amp,
                     channels_last=trial.loop.channels_last, folds=folds, cxrtune_version=__version__)


def build_network(spec: ModelSpec) -> nn.Module:
    """The network the weights file is for: the model, or its ensemble of ``spec.folds``."""
    prep = spec.preprocessing
    if spec.folds == 1:
        return build_model(spec.model, len(prep.classes), prep.image_size)
    from ..cv import FoldEnsemble

    members = [build_model(spec.model, len(prep.classes), prep.image_size) for _ in range(spec.folds)]
    return FoldEnsemble(members, [(0.0, 1.0)] * spec.folds)  # the real normalisations are in the weights


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A trained network and its spec: what the search logs and registers."""

    model: nn.Module
    spec: ModelSpec

    def write(self, directory: Path) -> dict[str, str]:
        """Write the weights and the spec into ``directory``; returns the pyfunc artifacts
        (key -> file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)
        (directory / SPEC_FILE).write_text(json.dumps(self.spec.to_dict(), indent=2))
        return {WEIGHTS_ARTIFACT: str(directory / WEIGHTS_FILE), SPEC_ARTIFACT: str(directory / SPEC_FILE)}


class Prepared(NamedTuple):
    """An image ready for the network, and what a user should know about it."""

    pixels: np.ndarray  # uint8 (S, S)
    note: Optional[str] = None


def default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


class Classifier:
    """A served model, loaded: the network in eval mode on its device, and its spec."""

    def __init__(self, model: nn.Module, spec: ModelSpec, device: Optional[torch.device] = None) -> None:
        self.spec = spec
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self._trial = spec.trial_config()
        prep = spec.preprocessing
        self._transform = eval_transform(prep.input_mean, prep.input_std)

    @classmethod
    def load(cls, weights_file: Path | str, spec_file: Path | str,
             device: Optional[torch.device] = None) -> "Classifier":
        """Rebuild the network from the spec and load its weights (``weights_only``: no
        pickled code is run)."""
        spec = ModelSpec.read(spec_file)
        model = build_network(spec)
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, ValueError) as exc:  # unreadable, or not this network's weights
            raise ConfigError(f"{weights_file}: not the weights of the {spec.model.backbone} in {spec_file} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); the model folder is "
                              "damaged or mixed up: download or log it again") from None
        return cls(model, spec, device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.preprocessing.classes

    @property
    def image_size(self) -> int:
        return self.spec.preprocessing.image_size

    def prepare(self, image: NamedImage) -> Prepared:
        """The image as the trial saw it: uint8 (S, S) after decode, square crop and CXR-Norm,
        and a caveat when there is one (logged too). Raises a DataError naming the image
        when it cannot be decoded."""
        prep = self.spec.preprocessing
        gray = gray_of(image)
        note = None
        if min(gray.shape) < prep.image_size:
            note = (f"{gray.shape[1]}x{gray.shape[0]} px, smaller than the model's {prep.image_size} px input: "
                    "upscaled, so blurrier than the images the model learnt from; its prediction is less reliable")
            log.warning("%s is %s", image.name, note)
        return Prepared(model_image(gray, prep.image_size, prep.cxrnorm), note)

    def inputs(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 1, S, S) float inputs, by the evaluation transform (as ``CachedImages`` feeds it)."""
        return torch.stack([self._transform(torch.from_numpy(np.array(img))[None]) for img in prepared])

    def probabilities(self, prepared: Sequence[np.ndarray], batch_size: Optional[int] = None) -> np.ndarray:
        """float32 (N, classes): the fp32 softmax of each prepared image, ``batch_size``
        images per forward pass (default: the test evaluation's)."""
        size = int(batch_size or self.spec.batch_size)
        if size < 1:
            raise DataError(f"{BATCH_PARAM}={batch_size}: must be an integer >= 1")
        out = [probabilities(eval_logits(self.model, self.inputs(prepared[i:i + size]), self.device, self._trial))
               for i in range(0, len(prepared), size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def gradcam(self, prepared: Sequence[np.ndarray], targets: Sequence[int]) -> np.ndarray:
        """Grad-CAM maps (N, S, S) in [0, 1] of class ``targets[i]`` for image ``i`` (report/explain.py)."""
        from ..report.explain import gradcam_maps

        x = model_inputs(self.inputs(prepared), self.device, self._trial)
        return gradcam_maps(self.model, self.spec.model.backbone, x, targets)

    def frame(self, probs: np.ndarray) -> pd.DataFrame:
        """One row per image: a float32 probability column per class, then the predicted class."""
        table = pd.DataFrame({c: probs[:, i].astype(np.float32) for i, c in enumerate(self.classes)})
        table[PREDICTED] = [self.classes[i] for i in probs.argmax(1)] if len(probs) else []
        return table


def prepare_all(classifier: Classifier, images: Sequence[NamedImage]) -> tuple[list[np.ndarray], list[str]]:
    """The prepared images, and an error per image that cannot be used (``name: reason``)."""
    prepared, errors = [], []
    for image in images:
        try:
            prepared.append(classifier.prepare(image).pixels)
        except DataError as exc:
            errors.append(str(exc))
    return prepared, errors


class CXRClassifier(PythonModel):
    """The pyfunc model: ``predict`` takes images (see ``images.images_of``) and returns a
    float32 probability column per class and the ``predicted`` class, one row per image.
    Params: ``batch_size`` (images per forward pass)."""

    classifier: Classifier

    def load_context(self, context: Any) -> None:
        self.classifier = Classifier.load(context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[SPEC_ARTIFACT])

    # Annotated DataFrame: what a pyfunc caller's input becomes under the logged (column)
    # signature, and a hint MLflow infers no signature from. Called directly (the unwrapped
    # model), ``predict`` also takes arrays, paths, bytes and lists of them (images_of).
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        try:
            images = images_of(model_input)
            prepared, errors = prepare_all(self.classifier, images)
            if errors:
                raise DataError(f"{len(errors)} of {len(images)} image(s) cannot be used:\n  " + "\n  ".join(errors))
            probs = self.classifier.probabilities(prepared, (params or {}).get(BATCH_PARAM))
        except DataError as exc:  # the caller's input: a 400 answer from a server, not a 500
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return self.classifier.frame(probs)


def signature(classes: Sequence[str], batch_size: int):
    """Input: an ``image`` column (encoded bytes; base64 in a REST request) or a ``path``
    column; params: ``batch_size``; output: a float column per class and ``predicted``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
                     ColSpec(DataType.string, PATH_COLUMN, required=False)])
    outputs = Schema([*(ColSpec(DataType.float, c) for c in classes), ColSpec(DataType.string, PREDICTED)])
    params = ParamSchema([ParamSpec(BATCH_PARAM, DataType.long, int(batch_size))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """One request's shape: a small grey-gradient PNG in the ``image`` column (not a radiograph)."""
    import cv2

    ramp = np.linspace(0, 255, _EXAMPLE_SIDE * _EXAMPLE_SIDE).reshape(_EXAMPLE_SIDE, _EXAMPLE_SIDE)
    ok, png = cv2.imencode(".png", ramp.astype(np.uint8))
    if not ok:  # pragma: no cover - OpenCV always encodes a plain uint8 image
        raise RuntimeError("OpenCV could not encode the input example")
    return pd.DataFrame({IMAGE_COLUMN: [png.tobytes()]})


def pyfunc_log_arguments(artifacts: dict[str, str], spec: ModelSpec) -> dict[str, Any]:
    """What ``mlflow.pyfunc`` logs the model with (besides name, run, model id and requirements)."""
    return {"python_model": str(CODE_FILE), "artifacts": artifacts,
            "signature": signature(spec.preprocessing.classes, spec.batch_size), "input_example": input_example(),
            "metadata": {"preprocessing": spec.preprocessing.to_dict(), "cxrtune_model_format": FORMAT_VERSION}}
