"""What the best model of a search looks at: Grad-CAM, occlusion, embeddings and a shortcut check.

A chest X-ray classifier can score well for the wrong reason: burned-in text, the
side marker, a hospital's label or a device in the image's border and corners may
correlate with the class (one hospital, one scanner, sicker patients lying down).
This module gives the report the means to see that on a fixed, seeded sample of
test images:

- Grad-CAM maps (the ``grad-cam`` package) on the last convolutional block of every
  backbone of the registry, chosen from a table keyed by backbone name;
- occlusion-sensitivity maps: how much the class probability drops when a patch is
  replaced by the image's mean, computed with batched forwards;
- the penultimate-layer embeddings (the class layer's input) and their t-SNE;
- the shortcut check: per class, the share of Grad-CAM energy outside the region
  where the body is expected (:func:`body_mask`), flagged against a threshold derived
  from what a map that ignores location would give (:func:`density_threshold`).

Every function leaves the model as it found it: training flags, ``requires_grad``,
``.grad`` and hooks are restored or removed, so the report can run on the very model
object the evaluation returned. matplotlib (``Figure`` + ``FigureCanvasAgg``, never
pyplot), scikit-learn and ``pytorch_grad_cam`` are imported inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..model_config import BACKBONES
from ..models import logits_and_aux
from ..registry import Registry
from .figures import new_figure, save_png

log = logging.getLogger(__name__)

LayerPicker = Callable[[nn.Module], nn.Module]

OVERLAY_ALPHA = 0.4  # heat-map opacity: the anatomy must stay readable under it
OCCLUSION_BATCH = 128  # occluded copies per forward pass
TSNE_PERPLEXITY = 30.0  # scikit-learn's default, clipped for small samples
TSNE_PCA_DIMS = 50  # PCA before t-SNE (as scikit-learn advises for wide features)

# The body region (body_mask): a centred ellipse with these semi-axes, as fractions
# of the image side. On a PA/AP chest film the lungs, heart and diaphragm fill the
# middle; what lies outside this ellipse is a band along each edge (5% of the side
# at the left/right midlines, 3% at the top/bottom ones) widening into the four
# corners (about the outer 17% of the side along the diagonals), which is where
# burned-in text, the L/R marker, hospital labels and collimator edges sit. On a film
# cropped to the thorax the ellipse reaches the apices and comes to about the lateral
# costophrenic angles, so a model looking at the lungs keeps its energy inside.
BODY_HALF_WIDTH = 0.45
BODY_HALF_HEIGHT = 0.47
# A class is flagged when the Grad-CAM energy per pixel outside the body region is on
# average at least this many times the energy per pixel inside it (density_threshold).
SHORTCUT_DENSITY_RATIO = 2.0
# A class is judged only when at least this share of its maps has any energy (shortcut_check).
MIN_EVIDENCE_SHARE = 0.5


# ---------------------------------------------------------------- target layers


def _module(path: str) -> LayerPicker:
    """The submodule at ``path``."""
    return lambda model: model.get_submodule(path)


def _last_child(path: str) -> LayerPicker:
    """The last child of the Sequential at ``path`` (its final conv block)."""
    return lambda model: list(model.get_submodule(path).children())[-1]


def _last_relu(path: str) -> LayerPicker:
    """The last ReLU under ``path``: the rectified output of the last convolution, before
    the final pooling (the layer of the Grad-CAM paper for VGG). After that pooling the
    map halves again (VGG: 7x7 at 224 px; convnet5: 2x2 at 64 px), coarser than the
    border band the shortcut check looks at."""

    def pick(model: nn.Module) -> nn.Module:
        relus = [m for m in model.get_submodule(path).modules() if isinstance(m, nn.ReLU)]
        return relus[-1]

    return pick


# backbone -> the layer Grad-CAM reads: the last block that still has a spatial map
TARGET_LAYERS: Registry[LayerPicker] = Registry("Grad-CAM target layer", names=BACKBONES.names())


def _register_target_layers() -> None:
    """Attribute paths are torchvision's (and models.py's for the small CNNs)."""
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        TARGET_LAYERS.add(name, _module("layer4"))
    for name in ("vgg16_bn", "vgg19_bn", "simple_cnn", "convnet5"):
        TARGET_LAYERS.add(name, _last_relu("features"))
    for name in ("efficientnet_b0", "efficientnet_b1", "mobilenet_v3_large"):
        TARGET_LAYERS.add(name, _last_child("features"))  # the final 1x1 conv + norm + activation
    TARGET_LAYERS.add("densenet121", _module("features.norm5"))  # the forward applies ReLU after it
    TARGET_LAYERS.add("inception_v3", _module("Mixed_7c"))


_register_target_layers()


def target_layer(model: nn.Module, backbone: str) -> nn.Module:
    """The layer Grad-CAM uses for ``backbone`` (its last convolutional block)."""
    return TARGET_LAYERS.get(backbone, where="model.backbone")(model)


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks in ``model``: itself, or the fold models of a cross-validated trial's
    ensemble (cv.FoldEnsemble), whose Grad-CAM is the mean of theirs."""
    return list(getattr(model, "members", [model]))


# ---------------------------------------------------------------- leaving the model untouched


@contextlib.contextmanager
def _eval_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; then every module's own training flag back (a frozen
    BatchNorm inside a training model stays in eval, as the engine left it)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _parameters_untouched(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for the duration (Grad-CAM needs gradients of
    activations, not of weights); afterwards ``requires_grad`` and ``.grad`` are restored
    (grad-cam's ``model.zero_grad()`` would otherwise drop a caller's gradients)."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    return logits_and_aux(model(x))[0].float()


# ---------------------------------------------------------------- Grad-CAM and occlusion


def _check_targets(x: Tensor, targets: Sequence[int]) -> list[int]:
    targets = [int(t) for t in targets]
    if x.ndim != 4 or len(targets) != x.shape[0]:
        raise ValueError(f"expected a (B, C, H, W) batch and B targets; got {tuple(x.shape)} and "
                         f"{len(targets)} targets")
    return targets


def gradcam_maps(model: nn.Module, backbone: str, x: Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM of class ``targets[i]`` for image ``x[i]``: float32 (B, H, W) in [0, 1] at
    the input's size, each map min-max scaled by grad-cam (with its 1e-7 guard, so a map
    of near-zero raw values stays faint; an all-zero map: no positive evidence anywhere).

    Only the input requires gradients during the call, so frozen backbones work too and
    no weight gradient is computed; the model's modes, parameters and hooks are as
    before afterwards."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = _check_targets(x, targets)
    layers = [target_layer(net, backbone) for net in networks(model)]
    with _eval_restored(model), _parameters_untouched(model), torch.enable_grad():
        cam = GradCAM(model=model, target_layers=layers)
        try:
            # a fresh leaf: activations downstream of it carry gradients even when every
            # parameter is frozen, and the caller's tensor gets no .grad
            inputs = x.detach().clone().requires_grad_(True)
            maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in targets])
        finally:
            # not `with GradCAM(...)`: its __exit__ swallows IndexError
            cam.activations_and_grads.release()
            cam.outputs = None  # drops the retained autograd graph
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)


def _patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis; the last patch sits flush with the far edge so every
    pixel is covered."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def _patch_masks(height: int, width: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """(P, 1, H, W) float masks, one per patch position, 1 inside the patch."""
    ph, pw = min(patch, height), min(patch, width)
    boxes = [(top, left) for top in _patch_starts(height, ph, stride)
             for left in _patch_starts(width, pw, stride)]
    masks = torch.zeros(len(boxes), 1, height, width, device=device)
    for i, (top, left) in enumerate(boxes):
        masks[i, :, top:top + ph, left:left + pw] = 1.0
    return masks


def _occluded_drops(model: nn.Module, x: Tensor, target: Tensor, masks: Tensor) -> Tensor:
    """(B, P) drop of each image's target probability when patch p is filled with the
    image's mean; the B x P occluded copies go through the model ``OCCLUSION_BATCH`` at a time."""
    b, n_pos = len(x), len(masks)
    rows = torch.arange(b, device=x.device)
    base = torch.softmax(_logits(model, x), 1)[rows, target]
    fill = x.mean(dim=(2, 3), keepdim=True)  # per image and channel
    image_of, patch_of = rows.repeat_interleave(n_pos), torch.arange(n_pos, device=x.device).repeat(b)
    drops = torch.empty(b * n_pos, device=x.device)
    for start in range(0, b * n_pos, OCCLUSION_BATCH):
        i, p = image_of[start:start + OCCLUSION_BATCH], patch_of[start:start + OCCLUSION_BATCH]
        occluded = x[i] * (1 - masks[p]) + fill[i] * masks[p]
        probs = torch.softmax(_logits(model, occluded), 1)
        drops[start:start + len(i)] = base[i] - probs[torch.arange(len(i), device=x.device), target[i]]
    return drops.reshape(b, n_pos)


@torch.no_grad()
def occlusion_maps(model: nn.Module, x: Tensor, targets: Sequence[int], patch: int,
                   stride: int) -> np.ndarray:
    """Occlusion sensitivity: float32 (B, H, W) in [0, 1].

    Every ``patch`` x ``patch`` square on a ``stride`` grid is replaced, in turn, by the
    image's mean; a pixel's value is the mean drop of the target class's probability
    over the patches that cover it, negatives (occlusion helped) clipped to 0. The
    (image, patch) pairs run through the model in batches of ``OCCLUSION_BATCH``."""
    targets = _check_targets(x, targets)
    if patch < 1 or stride < 1:
        raise ValueError(f"patch={patch}, stride={stride}: both must be >= 1")
    b, _, h, w = x.shape
    with _eval_restored(model):
        device = next(model.parameters()).device
        masks = _patch_masks(h, w, patch, stride, device)
        drops = _occluded_drops(model, x.detach().to(device), torch.tensor(targets, device=device), masks)
    flat = masks.reshape(len(masks), h * w)
    # each pixel: the mean drop over the patches covering it (every pixel has at least one)
    maps = (drops @ flat) / flat.sum(0).clamp_min(1)
    return maps.reshape(b, h, w).clamp(0, 1).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------- which images


def explanation_sample(y_true: Sequence[int], y_pred: Sequence[int], per_class: int = 4,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed sample of test indices: for each true class ``c`` present, up to
    ``per_class`` correctly classified (key ``"c:correct"``) and up to ``per_class``
    misclassified (``"c:misclassified"``) images, sorted, keys in class order.

    Each group is drawn with its own generator seeded by (seed, class, kind), so the
    sample of one class does not change when another class's images do."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    sample: dict[str, np.ndarray] = {}
    for c in np.unique(y_true):
        for kind, right in ((0, True), (1, False)):
            pool = np.flatnonzero((y_true == c) & ((y_pred == y_true) == right))
            rng = np.random.default_rng([seed, int(c), kind])
            pick = np.sort(rng.permutation(pool)[:per_class]).astype(np.int64)
            sample[f"{int(c)}:{'correct' if right else 'misclassified'}"] = pick
    return sample


# ---------------------------------------------------------------- embeddings


def _batches(loader_or_batches: Iterable[Any]) -> Iterator[Tensor]:
    """The input tensors of a DataLoader ((x, y) pairs) or of an iterable of tensors."""
    for item in loader_or_batches:
        yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def embeddings(model: nn.Module, backbone: str, loader_or_batches: Iterable[Any]) -> np.ndarray:
    """Penultimate-layer features (the input of the class layer, read by a forward hook
    on it; of an ensemble's first network): float32 (N, D), D the class layer's ``in_features``."""
    head = networks(model)[0].get_submodule(BACKBONES.get(backbone, where="model.backbone").head)
    device = next(model.parameters()).device
    features: list[np.ndarray] = []

    def keep(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        features.append(inputs[0].detach().flatten(1).float().cpu().numpy())

    handle = head.register_forward_pre_hook(keep)
    try:
        with _eval_restored(model):
            for x in _batches(loader_or_batches):
                model(x.to(device))
    finally:
        handle.remove()
    if not features:
        return np.zeros((0, getattr(head, "in_features", 0)), dtype=np.float32)
    return np.concatenate(features).astype(np.float32)


# ---------------------------------------------------------------- figures


def overlay_png(images: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: Path | str | BinaryIO,
                cols: int = 4) -> Path | BinaryIO:
    """A grid of grayscale ``images`` (uint8 (N, H, W)) with ``maps`` ((N, h, w) in
    [0, 1], stretched over the image) drawn on top in jet at ``OVERLAY_ALPHA``, each
    under its title (e.g. "true viral / pred bacterial 0.71")."""
    images, maps = np.asarray(images), np.asarray(maps, dtype=np.float32)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    n = len(images)
    if n == 0 or len(maps) != n or len(titles) != n:
        raise ValueError(f"need as many maps and titles as images (>= 1); got {n} images, "
                         f"{len(maps)} maps, {len(titles)} titles")
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = new_figure(2.6 * cols, 2.8 * rows)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        h, w = images[i].shape
        # a shared extent lets a map of another resolution cover the whole image
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
        ax.imshow(maps[i], cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1, extent=(0, w, h, 0),
                  interpolation="bilinear")
        ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def _tsne_points(emb: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of ``emb`` (PCA to ``TSNE_PCA_DIMS`` first when wider)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(emb)
    emb = np.nan_to_num(emb.astype(np.float64))
    if emb.shape[1] > TSNE_PCA_DIMS and n > TSNE_PCA_DIMS:
        emb = PCA(n_components=TSNE_PCA_DIMS, random_state=seed).fit_transform(emb)
    # scikit-learn requires perplexity < n_samples
    perplexity = min(TSNE_PERPLEXITY, n - 1.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)


def _scatter_groups(ax: Any, points: np.ndarray, groups: np.ndarray, names: Sequence[str],
                    title: str) -> None:
    from matplotlib import colormaps

    colors = colormaps["tab10"]
    for k, name in enumerate(names):
        sel = groups == k
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=6, color=colors(k % 10), label=str(name),
                       alpha=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2)


def tsne_png(emb: np.ndarray, labels: Sequence[int], splits: Sequence[str], class_names: Sequence[str],
             path: Path | str, seed: int = 0, max_points: int = 2000) -> Path:
    """Two t-SNE panels of the embeddings: coloured by class and by split. More than
    ``max_points`` points are subsampled (seeded) first: t-SNE is quadratic-ish in N."""
    emb, labels, splits = np.asarray(emb), np.asarray(labels), np.asarray(splits)
    if not len(emb) == len(labels) == len(splits) or len(emb) < 2:
        raise ValueError(f"need >= 2 points with a label and a split each; got {len(emb)} embeddings, "
                         f"{len(labels)} labels, {len(splits)} splits")
    if len(emb) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(emb), max_points, replace=False))
        emb, labels, splits = emb[keep], labels[keep], splits[keep]
    points = _tsne_points(emb, seed)
    split_names = list(dict.fromkeys(splits.tolist()))  # in order of appearance
    split_index = np.array([split_names.index(s) for s in splits.tolist()])
    fig = new_figure(11, 5)
    _scatter_groups(fig.add_subplot(1, 2, 1), points, labels, class_names, "by class")
    _scatter_groups(fig.add_subplot(1, 2, 2), points, split_index, split_names, "by split")
    fig.suptitle(f"t-SNE of the penultimate layer ({len(emb)} images)")
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------- the shortcut check


def body_mask(size: int, half_width: float = BODY_HALF_WIDTH,
              half_height: float = BODY_HALF_HEIGHT) -> np.ndarray:
    """Where the body is expected on a ``size`` x ``size`` chest film: bool (S, S), True
    inside the centred ellipse with semi-axes ``half_width`` x S (horizontal) and
    ``half_height`` x S (vertical), tested at pixel centres. Outside it: the border band
    and the corners, where text, markers and labels are burned in (see BODY_HALF_WIDTH)."""
    centres = (np.arange(size) + 0.5) / size - 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return (x / half_width) ** 2 + (y / half_height) ** 2 <= 1.0


def outside_energy(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per map, the fraction of its energy (sum of values) outside ``mask``; NaN for a map
    with no energy at all (Grad-CAM found no positive evidence anywhere)."""
    maps, mask = np.asarray(maps, dtype=np.float64), np.asarray(mask, dtype=bool)
    if maps.shape[1:] != mask.shape:
        raise ValueError(f"maps of shape {maps.shape[1:]} and a mask of shape {mask.shape} differ")
    total = maps.sum(axis=(1, 2))
    outside = maps[:, ~mask].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, outside / total, np.nan)


def density_threshold(area: float, ratio: float = SHORTCUT_DENSITY_RATIO) -> float:
    """The outside fraction at which energy per pixel outside a mask covering ``area`` of
    the image is ``ratio`` times that inside.

    A map that ignores location (uniform) puts ``1 - area`` outside: that is ratio 1.
    Flagging there would flag every blurry map, and Grad-CAM's maps are blurry (a 7x7
    map upsampled to the image bleeds a body-centred blob across the mask's edge);
    ratio 2 asks that the border and corners be, per pixel, twice as hot as the body:
    a map concentrated on a marker is far above it, one on the lungs far below."""
    outside = ratio * (1.0 - area)
    return float(outside / (outside + area))


def _class_row(fractions: np.ndarray, threshold: float) -> dict[str, Any]:
    """One class's line of the shortcut check from its maps' outside fractions."""
    with_evidence = fractions[np.isfinite(fractions)]
    n, k = len(fractions), len(with_evidence)
    outside = float(with_evidence.mean()) if k else float("nan")
    undetermined = k < MIN_EVIDENCE_SHARE * n or k == 0
    return {"outside": outside, "flag": bool(not undetermined and outside > threshold), "n": n,
            "with_evidence": k, "undetermined": bool(undetermined)}


def shortcut_check(maps: np.ndarray, y_true: Sequence[int], class_names: Sequence[str],
                   mask: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Per class, the mean fraction of Grad-CAM energy outside the body ``mask`` over the
    class's maps, and a flag when it exceeds ``threshold`` (default
    :func:`density_threshold` of the mask's area).

    Grad-CAM keeps only positive evidence: a class the model recognises by the absence
    of something (no lesion, no marker) gets empty maps on most images, and its few
    non-empty ones are noise stretched to [0, 1] by the per-map scaling. Such a class
    (maps with any energy for fewer than ``MIN_EVIDENCE_SHARE`` of its images) is
    ``undetermined`` and never flagged: its outside fraction says nothing about where
    the model looks.

    Returns ``{"per_class": {name: {"outside", "flag", "n", "with_evidence",
    "undetermined"}}, "flagged": [names], "threshold", "mask_area", "uniform_outside",
    "method"}``; ``outside`` is the mean over the maps with energy (NaN without any)."""
    y_true = np.asarray(y_true)
    if len(y_true) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(y_true)} labels")
    area = float(np.asarray(mask, dtype=bool).mean())
    threshold = density_threshold(area) if threshold is None else float(threshold)
    fractions = outside_energy(maps, mask)
    per_class = {str(name): _class_row(fractions[y_true == c], threshold)
                 for c, name in enumerate(class_names)}
    flagged = [name for name, row in per_class.items() if row["flag"]]
    if flagged:
        log.warning("shortcut check: Grad-CAM energy of class(es) %s lies mostly outside the body "
                    "region (threshold %.2f)", ", ".join(flagged), threshold)
    return {"per_class": per_class, "flagged": flagged, "threshold": threshold, "mask_area": area,
            "uniform_outside": 1.0 - area, "method": _method_text(area, threshold)}


def _method_text(area: float, threshold: float) -> str:
    # the density ratio the threshold stands for (SHORTCUT_DENSITY_RATIO by default)
    ratio = threshold / max(1.0 - threshold, 1e-12) * area / max(1.0 - area, 1e-12)
    return (f"Share of each class's Grad-CAM energy (for its true class) outside a centred ellipse "
            f"covering {area:.0%} of the image (the border band and corners, where text and markers "
            f"sit, are outside). A map that ignores location would put {1 - area:.0%} outside; a class "
            f"is flagged above {threshold:.0%}, where the outside is per pixel "
            f"{ratio:.3g}x as hot as the body. A class whose maps are empty (no positive evidence) "
            f"for more than {1 - MIN_EVIDENCE_SHARE:.0%} of its images is not judged.")


__all__ = ["TARGET_LAYERS", "target_layer", "networks", "gradcam_maps", "occlusion_maps", "overlay_png",
           "explanation_sample", "embeddings", "tsne_png", "body_mask", "outside_energy",
           "density_threshold", "shortcut_check"]
