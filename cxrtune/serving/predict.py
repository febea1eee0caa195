"""`cxrtune predict`: class probabilities of image files by a logged cxrtune model.

The model is loaded as MLflow loads it to serve it (``mlflow.pyfunc.load_model``) and
the images go through the code its ``predict`` runs (``model.Classifier``), so the
answer equals a REST server's for the same image. An image that cannot be read is
reported by name and the others are still predicted. ``--cam`` adds a Grad-CAM overlay
per image (report/explain.py).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .model import SPEC_ARTIFACT, Classifier, Prepared
from .images import NamedImage

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "Answer", "PredictedImage", "Predictions", "answers", "load_classifier", "image_files", "predict_images"]

# What a folder walk takes as images (a file named on the command line is tried whatever its name).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".dcm", ".dicom"})
MLMODEL_FILE = "MLmodel"
CAM_SUFFIX = ".gradcam.png"
# The schemes of model URIs MLflow resolves (a local folder is given as a path).
_URI_SCHEMES = ("models:/", "runs:/", "file:", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/", "http://",
                "https://", "mlflow-artifacts:/")


@dataclass(frozen=True)
class PredictedImage:
    """One image's answer: its probabilities and predicted class, or why it has none."""

    image: str
    probabilities: Optional[dict[str, float]] = None
    predicted: Optional[str] = None
    error: Optional[str] = None
    cam: Optional[str] = None  # the Grad-CAM overlay PNG written for it

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Predictions:
    """What `cxrtune predict` shows: the model's classes and, lazily, one answer per image."""

    model: str
    classes: tuple[str, ...]
    results: Iterator[PredictedImage]


# ---------------------------------------------------------------- the model


def _is_uri(model: str) -> bool:
    return model.startswith(_URI_SCHEMES)


def _check_store(tracking_uri: str) -> None:
    """A sqlite store that is not there would be created, empty, by the first MLflow call."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise ConfigError(f"--tracking-uri {tracking_uri}: there is no MLflow store at {db}; run from the "
                              "folder the search ran in (its mlflow.db), or give the search's --tracking-uri")


def _download(model: str, tracking_uri: str, into: Path) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from ..tracking import using_tracking_uri

    _check_store(tracking_uri)
    try:
        # download_artifacts' own URI arguments do not reach a registered version's logged
        # model (models:/m-...), which MLflow looks up through the fluent API's URI
        with using_tracking_uri(tracking_uri):
            return Path(download_artifacts(artifact_uri=model, dst_path=str(into), tracking_uri=tracking_uri,
                                           registry_uri=tracking_uri))
    except (MlflowException, OSError) as exc:
        reason = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0][:300]
        raise ConfigError(f"--model {model}: not found at {tracking_uri} ({reason}); give models:/NAME/VERSION "
                          "(a search registers cxrtune-best), runs:/RUN_ID/model or a model folder, and the "
                          "search's --tracking-uri") from None


def _model_folder(model: str, tracking_uri: Optional[str], into: Path) -> Path:
    """A local folder holding the model: the one given, or the model downloaded into ``into``."""
    if _is_uri(model):
        from ..report.locate import default_tracking_uri

        return _download(model, tracking_uri or default_tracking_uri() or "", into)
    folder = Path(model).expanduser()
    if not (folder / MLMODEL_FILE).is_file():
        why = "does not exist" if not folder.exists() else f"holds no {MLMODEL_FILE} file"
        raise ConfigError(f"--model {model}: {why}; give a model folder (with an {MLMODEL_FILE} file), "
                          "models:/NAME/VERSION or runs:/RUN_ID/model")
    return folder


def _check_cxrtune_model(folder: Path, model: str) -> None:
    """A cxrtune pyfunc model carries its spec; an older cxrtune logged a bare network."""
    from mlflow.models import Model

    meta = Model.load(str(folder / MLMODEL_FILE))
    pyfunc = meta.flavors.get("python_function", {})
    if SPEC_ARTIFACT in (pyfunc.get("artifacts") or {}):
        return
    if "pytorch" in meta.flavors:
        raise ConfigError(f"--model {model}: an mlflow.pytorch model, as an older cxrtune logged it: a bare network "
                          "without its preprocessing (image size, CXR-Norm, normalisation), which cannot be "
                          "applied to an image as the trial applied it. Run the search again with this cxrtune "
                          "(its model carries the preprocessing)")
    raise ConfigError(f"--model {model}: not a cxrtune model (flavours {', '.join(meta.flavors) or 'none'}; no "
                      f"{SPEC_ARTIFACT!r} artifact); give a model a cxrtune search logged")


def load_classifier(model: str, tracking_uri: Optional[str] = None) -> Classifier:
    """Load a cxrtune model as MLflow serves it: ``model`` is ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/model`` (read from ``tracking_uri``, default the working folder's
    ``mlflow.db``) or a model folder."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="cxrtune-model-") as tmp:
        folder = _model_folder(model, tracking_uri, Path(tmp))
        _check_cxrtune_model(folder, model)
        return mlflow.pyfunc.load_model(str(folder)).unwrap_python_model().classifier


# ---------------------------------------------------------------- the images


def image_files(targets: Sequence[Path]) -> list[Path]:
    """The files given, and the images under the folders given (walked, sorted). A file
    that does not exist stays in the list: its error names it, the others are predicted."""
    files: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            found = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                log.warning("%s holds no image files (%s)", target, ", ".join(sorted(IMAGE_SUFFIXES)))
            files.extend(found)
        else:
            files.append(target)
    if not files:
        raise ConfigError(f"no images to predict in {', '.join(map(str, targets))}: give image files or folders "
                          f"holding some ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _cam_names(files: Sequence[Path]) -> list[str]:
    """One overlay file name per image: its stem, numbered when two images share one."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen[f.stem] = seen.get(f.stem, 0) + 1
        names.append(f"{f.stem}{'' if n == 1 else f'-{n}'}{CAM_SUFFIX}")
    return names


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(frozen=True, eq=False)
class Answer:
    """The model's answer for one image (``answers``): its probabilities and predicted
    class, or why it has none; with ``cams``, the image as the model saw it and the
    Grad-CAM map of the predicted class."""

    name: str
    probabilities: Optional[dict[str, float]] = None
    predicted: Optional[str] = None
    error: Optional[str] = None
    note: Optional[str] = None  # a caveat, e.g. an image smaller than the model's input
    image: Optional[np.ndarray] = None  # uint8 (S, S), after CXR-Norm
    cam: Optional[np.ndarray] = None  # (S, S) in [0, 1]

    def overlay(self, out: Path | BinaryIO) -> None:
        """The Grad-CAM map over the image the model saw, as one PNG (a file or a stream)."""
        from ..report.explain import overlay_png

        title = f"{Path(self.name).name}\npred {self.predicted} {self.probabilities[self.predicted]:.2f}"
        overlay_png(self.image[None], self.cam[None], [title], out, cols=1)


def _prepared(classifier: Classifier, image: NamedImage) -> tuple[Optional[Prepared], Optional[str]]:
    """(the image as the model takes it, None), or (None, why it cannot be read)."""
    try:
        return classifier.prepare(image), None
    except DataError as exc:
        return None, getattr(exc, "reason", str(exc))


def answers(classifier: Classifier, images: Sequence[NamedImage], size: int, cams: bool = False
            ) -> Iterator[Answer]:
    """One answer per image, in order, ``size`` images per forward pass (what `cxrtune
    predict` and `cxrtune serve` both show)."""
    for chunk in _chunks(images, size):
        items = [(named, *_prepared(classifier, named)) for named in chunk]
        prepared = [ready.pixels for _, ready, _ in items if ready is not None]
        probs = classifier.probabilities(prepared, size)
        predicted = probs.argmax(1)
        maps = classifier.gradcam(prepared, predicted.tolist()) if cams and prepared else None
        k = 0
        for named, ready, error in items:
            if ready is None:
                yield Answer(named.name, error=error)
                continue
            yield Answer(named.name, {c: float(p) for c, p in zip(classifier.classes, probs[k])},
                         classifier.classes[predicted[k]], note=ready.note, image=ready.pixels,
                         cam=None if maps is None else maps[k])
            k += 1


def _predicted(classifier: Classifier, files: Sequence[Path], size: int,
               cam_dir: Optional[Path]) -> Iterator[PredictedImage]:
    """`cxrtune predict`'s answers, each overlay written to ``cam_dir``."""
    named = [NamedImage(str(path), path) for path in files]
    for answer, cam in zip(answers(classifier, named, size, cam_dir is not None), _cam_names(files)):
        written = None
        if answer.cam is not None:
            answer.overlay(cam_dir / cam)
            written = str(cam_dir / cam)
        yield PredictedImage(answer.name, answer.probabilities, answer.predicted, answer.error, written)


def predict_images(model: str, targets: Sequence[Path], *, tracking_uri: Optional[str] = None,
                   batch_size: Optional[int] = None, cam_dir: Optional[Path] = None) -> Predictions:
    """`cxrtune predict`: load ``model`` and list the images (bad input raises a
    ConfigError here); the answers come lazily, in order, one per image, an unreadable
    image as one with an ``error``."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch {batch_size}: must be an integer >= 1 (images per forward pass)")
    files = image_files(targets)
    classifier = load_classifier(model, tracking_uri)
    if cam_dir is not None:
        cam_dir = Path(cam_dir)
        try:
            cam_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--cam {cam_dir}: cannot create the folder ({exc.strerror or exc})") from None
    size = batch_size or classifier.spec.batch_size
    return Predictions(model, classifier.classes, _predicted(classifier, files, size, cam_dir))
