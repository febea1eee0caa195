"""Explanations on models really trained on planted signals: a corner marker must trip the
shortcut check and a lesion inside the body must not; Grad-CAM and occlusion must find a
planted lesion; every backbone's target layer must work and leave the model untouched."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from cxrtune.data.augment import eval_transform
from cxrtune.models import BACKBONES, ModelConfig, build_model, set_backbone_frozen
from cxrtune.report import explain
from cxrtune.report.explain import (
    body_mask,
    density_threshold,
    embeddings,
    explanation_sample,
    gradcam_maps,
    occlusion_maps,
    outside_energy,
    overlay_png,
    shortcut_check,
    target_layer,
    tsne_png,
)

log = logging.getLogger(__name__)

SIZE = 64
N_TRAIN, N_TEST = 384, 128
BACKBONE = "simple_cnn"  # the registry's small CNN; its last conv map is 8x8 at 64 px (convnet5: 4x4)
EPOCHS = 8
GLYPH = 8  # the marker glyph spans GLYPH x GLYPH px, 2-3 px in from a corner
LESION_SIGMA = 2.5  # px
LESION_HALF_BOX = 5  # px: the lesion's box is its centre +- 2 sigma
NAMES = ["clear", "positive"]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    """Two torch threads: the machine is shared; restored for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- synthetic chest films


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates in [-0.5, 0.5], shaped (1, S, S) to broadcast over images."""
    c = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    return y[None], x[None]


def _soft_ellipse(y, x, cy, cx, ry, rx, soft):
    """1 inside the ellipse, 0 outside, with a sigmoid edge ``soft`` wide (radius units)."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) / soft))


def _u(rng, low, high, n):
    return rng.uniform(low, high, (n, 1, 1))


def chest_films(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float (n, S, S) body-like images, one distribution for every class: a bright soft
    thorax ellipse, two darker lung fields, smooth low-frequency texture and noise."""
    y, x = _grid()
    img = _u(rng, 0.04, 0.1, n) + _u(rng, 0.45, 0.6, n) * _soft_ellipse(
        y, x, _u(rng, -0.02, 0.02, n), _u(rng, -0.02, 0.02, n), _u(rng, 0.38, 0.44, n),
        _u(rng, 0.34, 0.40, n), 0.03)
    for side in (-1, 1):
        img -= _u(rng, 0.2, 0.3, n) * _soft_ellipse(
            y, x, _u(rng, -0.04, 0.0, n), side * _u(rng, 0.15, 0.19, n), _u(rng, 0.24, 0.3, n),
            _u(rng, 0.1, 0.13, n), 0.08)
    coarse = torch.from_numpy(rng.normal(0.0, 0.04, (n, 1, 8, 8)))
    img += F.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)[:, 0].numpy()
    return img + rng.normal(0.0, 0.015, img.shape)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def glyph_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) top, left, bottom, right (exclusive) of a text-like glyph in a random corner."""
    inset = rng.integers(2, 4, (n, 2))
    corner = rng.integers(0, 2, (n, 2)).astype(bool)  # bottom?, right?
    top = np.where(corner[:, 0], SIZE - inset[:, 0] - GLYPH, inset[:, 0])
    left = np.where(corner[:, 1], SIZE - inset[:, 1] - GLYPH, inset[:, 1])
    return np.stack([top, left, top + GLYPH, left + GLYPH], 1)


def draw_glyph(img: np.ndarray, box: np.ndarray) -> None:
    """A burned-in 'F'-like mark: a stem and two bars at full brightness."""
    t, l, _, _ = box
    img[t:t + GLYPH, l:l + 2] = 1.0
    img[t:t + 2, l:l + GLYPH] = 1.0
    img[t + 4:t + 6, l:l + GLYPH - 2] = 1.0


def lesion_centres(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) row, column (px) of a lesion inside a lung field, well inside the body."""
    side = rng.choice([-1.0, 1.0], n)
    cx = side * rng.uniform(0.12, 0.22, n)
    cy = rng.uniform(-0.18, 0.18, n)
    return np.round((np.stack([cy, cx], 1) + 0.5) * SIZE - 0.5).astype(np.int64)


def lesions(centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) Gaussian spots of LESION_SIGMA px at ``centres``, 0.45-0.55 bright."""
    rows = np.arange(SIZE)[None, :, None]
    cols = np.arange(SIZE)[None, None, :]
    d2 = (rows - centres[:, 0, None, None]) ** 2 + (cols - centres[:, 1, None, None]) ** 2
    return _u(rng, 0.45, 0.55, len(centres)) * np.exp(-d2 / (2 * LESION_SIGMA ** 2))


def marker_set(seed: int, n: int) -> SimpleNamespace:
    """Class 1 = the same bodies plus a corner glyph: the only class signal is outside the body."""
    rng = np.random.default_rng(seed)
    img = chest_films(rng, n)
    y = np.arange(n) % 2
    boxes = glyph_boxes(rng, n)
    for i in np.flatnonzero(y == 1):
        draw_glyph(img[i], boxes[i])
    return SimpleNamespace(images=to_uint8(img), y=y, boxes=boxes)


def lesion_set(seed: int, n: int) -> SimpleNamespace:
    """Class 1 = a small bright lesion in a lung field, no marker: the signal is inside the body."""
    rng = np.random.default_rng(seed)
    img = chest_films(rng, n)
    y = np.arange(n) % 2
    centres = lesion_centres(rng, n)
    positive = y == 1
    img[positive] += lesions(centres[positive], rng)
    return SimpleNamespace(images=to_uint8(img), y=y, centres=centres)


# ---------------------------------------------------------------- training


def train(data: SimpleNamespace, test: SimpleNamespace, seed: int) -> SimpleNamespace:
    """The registry's convnet5 trained on ``data`` as the engine would feed it (the
    eval transform's normalisation, no augmentation); stops once the test split is
    separated."""
    x_u8 = torch.from_numpy(data.images)[:, None]
    mean, std = float(x_u8.float().mean() / 255), float(x_u8.float().std() / 255)
    transform = eval_transform(mean, std)
    x, y = transform(x_u8), torch.from_numpy(data.y)
    x_test, y_test = transform(torch.from_numpy(test.images)[:, None]), torch.from_numpy(test.y)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone=BACKBONE, weights="none"), 2, SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    order = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(x), generator=order).split(32):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy = _accuracy(model, x_test, y_test)
        if accuracy >= 0.98:
            break
    model.eval()
    return SimpleNamespace(model=model, x=x_test, y=test.y, images=test.images, accuracy=accuracy,
                           test=test)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def marker_model() -> SimpleNamespace:
    return train(marker_set(1, N_TRAIN), marker_set(2, N_TEST), seed=0)


@pytest.fixture(scope="module")
def lesion_model() -> SimpleNamespace:
    return train(lesion_set(3, N_TRAIN), lesion_set(4, N_TEST), seed=0)


def true_class_maps(m: SimpleNamespace) -> np.ndarray:
    return gradcam_maps(m.model, BACKBONE, m.x, m.y.tolist())


def _summary(check: dict) -> dict:
    """class -> (outside fraction, maps with evidence, undetermined), for the log."""
    return {k: (round(v["outside"], 4), v["with_evidence"], v["undetermined"])
            for k, v in check["per_class"].items()}


# ---------------------------------------------------------------- the mask and the planted signals


def test_body_mask_is_a_central_ellipse_that_excludes_border_and_corners():
    mask = body_mask(SIZE)
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert mask[SIZE // 2, SIZE // 2] and 0.6 < mask.mean() < 0.7
    assert not mask[:, :2].any() and not mask[:, -2:].any() and not mask[:1].any() and not mask[-1:].any()
    for corner in (mask[:10, :10], mask[:10, -10:], mask[-10:, :10], mask[-10:, -10:]):
        assert not corner.any()
    assert (mask == mask[::-1]).all() and (mask == mask[:, ::-1]).all()  # symmetric


def test_planted_signals_sit_where_the_tests_assume():
    mask = body_mask(SIZE)
    marked = marker_set(1, 64)
    glyph = np.zeros((SIZE, SIZE), bool)
    for t, l, b, r in marked.boxes:
        glyph[t:b, l:r] = True
    assert not (glyph & mask).any()  # every glyph position is outside the body region
    lesions = lesion_set(3, 64)
    for r, c in lesions.centres:
        box = mask[r - LESION_HALF_BOX:r + LESION_HALF_BOX + 1, c - LESION_HALF_BOX:c + LESION_HALF_BOX + 1]
        assert box.all()
    # one body distribution for both classes: inside the body the class means agree
    inside = marked.images[:, mask].astype(float).mean(axis=1)
    assert abs(inside[marked.y == 0].mean() - inside[marked.y == 1].mean()) < 2.0  # grey levels


def test_density_threshold_is_relative_to_a_uniform_map():
    area = float(body_mask(SIZE).mean())
    assert density_threshold(area, ratio=1.0) == pytest.approx(1 - area)
    assert 1 - area < density_threshold(area) < 1
    uniform = np.ones((3, SIZE, SIZE))
    assert outside_energy(uniform, body_mask(SIZE)) == pytest.approx(np.full(3, 1 - area))
    check = shortcut_check(uniform, [0, 0, 1], NAMES, body_mask(SIZE))
    assert not check["flagged"] and check["uniform_outside"] == pytest.approx(1 - area)
    assert math.isnan(outside_energy(np.zeros((1, SIZE, SIZE)), body_mask(SIZE))[0])


def test_a_class_with_mostly_empty_maps_is_not_judged():
    corner = np.zeros((4, SIZE, SIZE))
    corner[:, :6, :6] = 1.0  # all energy outside the body
    maps = np.concatenate([corner, np.zeros((5, SIZE, SIZE)), corner])
    y = np.array([1] * 4 + [0] * 5 + [0] * 4)  # class 0: 4 of 9 maps with evidence
    check = shortcut_check(maps, y, NAMES, body_mask(SIZE))
    clear, positive = check["per_class"]["clear"], check["per_class"]["positive"]
    assert positive == {"outside": 1.0, "flag": True, "n": 4, "with_evidence": 4, "undetermined": False}
    assert clear["outside"] == 1.0 and clear["undetermined"] and not clear["flag"]
    assert check["flagged"] == ["positive"] and "not judged" in check["method"]
    none = shortcut_check(maps[:4], [1] * 4, NAMES, body_mask(SIZE))["per_class"]["clear"]
    assert none["n"] == 0 and math.isnan(none["outside"]) and not none["flag"]


# ---------------------------------------------------------------- the shortcut check on trained models


def test_shortcut_check_fires_for_a_corner_marker(marker_model):
    assert marker_model.accuracy >= 0.95
    maps = true_class_maps(marker_model)
    check = shortcut_check(maps, marker_model.y, NAMES, body_mask(SIZE))
    log.info("marker model: accuracy %.3f, threshold %.3f, per class %s", marker_model.accuracy,
             check["threshold"], _summary(check))
    assert check["per_class"]["positive"]["flag"], check
    assert check["per_class"]["positive"]["outside"] > check["threshold"] + 0.1
    assert "positive" in check["flagged"] and check["per_class"]["positive"]["n"] == N_TEST // 2


def test_shortcut_check_stays_quiet_when_the_signal_is_inside_the_body(lesion_model):
    assert lesion_model.accuracy >= 0.9
    maps = true_class_maps(lesion_model)
    check = shortcut_check(maps, lesion_model.y, NAMES, body_mask(SIZE))
    log.info("lesion model: accuracy %.3f, per class %s", lesion_model.accuracy, _summary(check))
    assert not check["flagged"], check
    assert check["per_class"]["positive"]["outside"] < check["uniform_outside"]
    assert check["per_class"]["positive"]["with_evidence"] == N_TEST // 2


# ---------------------------------------------------------------- Grad-CAM and occlusion find the lesion


def _box(centre: np.ndarray) -> tuple[slice, slice]:
    r, c = centre
    return (slice(r - LESION_HALF_BOX, r + LESION_HALF_BOX + 1),
            slice(c - LESION_HALF_BOX, c + LESION_HALF_BOX + 1))


def test_gradcam_energy_is_higher_inside_the_lesion_box(lesion_model):
    positive = np.flatnonzero(lesion_model.y == 1)
    maps = gradcam_maps(lesion_model.model, BACKBONE, lesion_model.x[positive], [1] * len(positive))
    inside, outside = [], []
    for m, centre in zip(maps, lesion_model.test.centres[positive]):
        box = np.zeros_like(m, dtype=bool)
        box[_box(centre)] = True
        inside.append(m[box].mean())
        outside.append(m[~box].mean())
    inside, outside = np.array(inside), np.array(outside)
    log.info("lesion box: mean energy inside %.3f, outside %.3f, inside > outside on %.0f%% of "
             "positives", inside.mean(), outside.mean(), 100 * np.mean(inside > outside))
    assert np.mean(inside > outside) >= 0.8
    assert inside.mean() > 2 * outside.mean()


def test_occlusion_peaks_at_the_lesion_and_is_batched(lesion_model):
    positive = np.flatnonzero(lesion_model.y == 1)[:8]
    model, x = lesion_model.model, lesion_model.x[positive]
    calls = []
    handle = model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    try:
        # the patch must hide the whole lesion (+-2 sigma = 11 px): a smaller one leaves a
        # bright rim the model still reads, and the probability hardly drops anywhere
        maps = occlusion_maps(model, x, [1] * len(positive), patch=16, stride=4)
    finally:
        handle.remove()
    assert maps.shape == (len(positive), SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.max(axis=(1, 2)) > 0).all()
    positions = len(range(0, SIZE - 16 + 1, 4)) ** 2
    # one forward for the baseline, then (image, patch) pairs in big batches
    assert len(calls) == 1 + math.ceil(len(positive) * positions / explain.OCCLUSION_BATCH)
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    distance = np.linalg.norm(peaks - lesion_model.test.centres[positive], axis=1)
    log.info("occlusion peak distance to the lesion (px): %s", np.round(distance, 1).tolist())
    assert np.mean(distance <= 6) >= 7 / 8


def test_occlusion_covers_every_pixel_even_when_the_stride_does_not_divide():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10 * 10, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, -1] = 10.0  # class 1 reads only the last pixel
    x = torch.zeros(1, 1, 10, 10)
    x[0, 0, -1, -1] = 1.0
    maps = occlusion_maps(model, x, [1], patch=3, stride=4)
    assert maps[0, -1, -1] > 0.4  # the flush last patch reached the bottom-right corner


# ---------------------------------------------------------------- every backbone


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_gradcam_runs_on_every_backbone_and_leaves_it_untouched(backbone):
    size = 107 if backbone == "inception_v3" else SIZE  # Mixed_7c is 1x1 below 107 px
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, weights="none"), 3, size).eval()
    layer = target_layer(model, backbone)
    seen = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        before = model(x)
    handle.remove()
    assert len(seen[0]) == 4 and min(seen[0][2:]) >= 2, seen  # a spatial map to localise with
    params = {k: v.clone() for k, v in model.state_dict().items()}
    maps = gradcam_maps(model, backbone, x, [0, 2])
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert _hooks(model) == 0 and not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert x.grad is None and not x.requires_grad


def test_unknown_backbone_lists_the_valid_ones():
    from cxrtune.errors import ConfigError

    with pytest.raises(ConfigError, match="resnet18"):
        target_layer(nn.Linear(1, 1), "alexnet")
    assert set(explain.TARGET_LAYERS.names()) == set(BACKBONES.names())


def test_gradcam_restores_modes_grads_and_works_on_a_frozen_backbone(lesion_model):
    model = lesion_model.model
    x = lesion_model.x[lesion_model.y == 1][:4]
    reference = gradcam_maps(model, BACKBONE, x, [1] * 4)
    set_backbone_frozen(model, BACKBONE, True)
    model.train()
    model.features[1].eval()  # a BatchNorm whose own mode differs from the model's
    head = model.fc
    head.weight.grad = torch.ones_like(head.weight)
    try:
        maps = gradcam_maps(model, BACKBONE, x, [1] * 4)
        assert np.allclose(maps, reference, atol=1e-5)  # eval mode inside, frozen or not
        assert model.training and not model.features[1].training and model.features[5].training
        assert torch.equal(head.weight.grad, torch.ones_like(head.weight))
        assert [p.requires_grad for p in model.parameters()].count(True) == 2  # fc weight, bias
        assert _hooks(model) == 0
    finally:
        set_backbone_frozen(model, BACKBONE, False)
        head.weight.grad = None
        model.eval()


# ---------------------------------------------------------------- sample, embeddings, figures


def test_explanation_sample_is_seeded_and_right():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 3, 300))
    sample = explanation_sample(y_true, y_pred, per_class=4, seed=5)
    assert list(sample) == ["0:correct", "0:misclassified", "1:correct", "1:misclassified",
                            "2:correct", "2:misclassified"]
    for key, index in sample.items():
        c, kind = key.split(":")
        assert len(index) == 4 and index.dtype == np.int64 and (np.diff(index) > 0).all()
        assert (y_true[index] == int(c)).all()
        assert ((y_pred[index] == y_true[index]) == (kind == "correct")).all()
    again = explanation_sample(y_true, y_pred, per_class=4, seed=5)
    assert all(np.array_equal(sample[k], again[k]) for k in sample)
    other = explanation_sample(y_true, y_pred, per_class=4, seed=6)
    assert any(not np.array_equal(sample[k], other[k]) for k in sample)
    # fewer than per_class available: all of them, none invented
    few = explanation_sample([0, 0, 1], [0, 1, 1], per_class=4)
    assert [v.tolist() for v in few.values()] == [[0], [1], [2], []]


def test_explanation_sample_of_a_trained_model(marker_model):
    with torch.no_grad():
        y_pred = marker_model.model(marker_model.x).argmax(1).numpy()
    sample = explanation_sample(marker_model.y, y_pred, per_class=4, seed=0)
    for key, index in sample.items():
        c, kind = key.split(":")
        assert (marker_model.y[index] == int(c)).all()
        assert ((y_pred[index] == marker_model.y[index]) == (kind == "correct")).all()
    assert len(sample["0:correct"]) == 4 and len(sample["1:correct"]) == 4


def test_embeddings_have_the_heads_input_width(lesion_model):
    model, x = lesion_model.model, lesion_model.x[:40]
    from_tensors = embeddings(model, BACKBONE, (x[i:i + 16] for i in range(0, len(x), 16)))
    loader = DataLoader(TensorDataset(x, torch.from_numpy(lesion_model.y[:40])), batch_size=16)
    from_loader = embeddings(model, BACKBONE, loader)
    assert from_tensors.shape == (40, model.fc.in_features) == (40, 256)
    assert np.allclose(from_tensors, from_loader) and _hooks(model) == 0
    with torch.no_grad():  # the class layer applied to them gives the model's logits
        logits = model.fc(torch.from_numpy(from_tensors))
        assert torch.allclose(logits, model(x), atol=1e-5)


def read_png(path):
    from matplotlib.image import imread

    assert path.exists() and path.stat().st_size > 0, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 200, img.shape
    assert img[..., :3].var() > 0, f"{path} is blank"
    return img


def test_overlay_and_tsne_write_valid_pngs(lesion_model, tmp_path):
    positive = np.flatnonzero(lesion_model.y == 1)[:6]
    maps = gradcam_maps(lesion_model.model, BACKBONE, lesion_model.x[positive], [1] * 6)
    titles = [f"true positive / pred positive 0.{90 + i}" for i in range(6)]
    out = overlay_png(lesion_model.images[positive], maps, titles, tmp_path / "sub" / "gradcam.png", cols=3)
    assert out == tmp_path / "sub" / "gradcam.png"
    img = read_png(out)
    assert img.shape[1] > img.shape[0]  # 3 columns, 2 rows
    with pytest.raises(ValueError):
        overlay_png(lesion_model.images[positive], maps[:2], titles, tmp_path / "bad.png")

    emb = embeddings(lesion_model.model, BACKBONE, [lesion_model.x])
    splits = np.array(["train", "val", "test"])[np.arange(len(emb)) % 3]  # not the class pattern
    out = tsne_png(emb, lesion_model.y, splits, NAMES, tmp_path / "tsne.png", seed=0, max_points=100)
    img = read_png(out)
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels side by side
    small = tsne_png(emb[:5], lesion_model.y[:5], splits[:5], NAMES, tmp_path / "small.png")
    read_png(small)  # 5 points: perplexity clipped below the number of points
