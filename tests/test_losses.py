import math

import pytest
import torch
import torch.nn.functional as F

from cxrtune.errors import ConfigError, DataError
from cxrtune.losses import LOSSES, FocalLoss, LossConfig, build_loss, class_weights

COUNTS = [100, 50, 10]


def _batch(n=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_focal_gamma0_no_alpha_equals_cross_entropy(ls):
    logits, y = _batch()
    focal = build_loss(LossConfig(name="focal", gamma=0.0, label_smoothing=ls), COUNTS)
    assert torch.allclose(focal(logits, y), F.cross_entropy(logits, y, label_smoothing=ls), atol=1e-6)


def test_cross_entropy_matches_torch():
    logits, y = _batch()
    ce = build_loss(LossConfig(label_smoothing=0.1), COUNTS)
    assert torch.allclose(ce(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_focal_downweights_easy_examples():
    easy = torch.tensor([[6.0, 0.0, 0.0]])  # confident and correct
    hard = torch.tensor([[0.0, 0.5, 0.0]])  # wrong
    y = torch.tensor([0])
    focal = FocalLoss(gamma=2.0)
    ratio_easy = focal(easy, y) / F.cross_entropy(easy, y)
    ratio_hard = focal(hard, y) / F.cross_entropy(hard, y)
    p = torch.softmax(easy, -1)[0, 0]
    assert torch.isclose(ratio_easy, (1 - p) ** 2, rtol=1e-4)
    assert ratio_easy < 1e-4 and ratio_hard > 0.3


def test_focal_gradient_finite_when_confident():
    logits = torch.tensor([[60.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=0.5)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


def test_inverse_weights_hand_computed():
    # 1/n = [0.01, 0.02, 0.1], sum 0.13, scaled to sum 3.
    w = class_weights(COUNTS, "inverse")
    assert torch.allclose(w, torch.tensor([0.03, 0.06, 0.3]) / 0.13, atol=1e-6)
    assert math.isclose(w.sum().item(), 3.0, rel_tol=1e-6) and w.dtype == torch.float32


def test_effective_number_weights_hand_computed():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in (1, 2, 4)]  # [1, 1/1.9, 0.1/0.3439]
    expected = torch.tensor([r * 3 / sum(raw) for r in raw])
    assert torch.allclose(class_weights([1, 2, 4], "effective_number", beta), expected, atol=1e-6)
    # beta -> 0 gives uniform weights
    assert torch.allclose(class_weights([1, 2, 4], "effective_number", 0.0), torch.ones(3))


def test_class_weights_errors():
    with pytest.raises(ConfigError, match="valid class-weight schemes: effective_number, inverse"):
        class_weights(COUNTS, "sqrt")
    with pytest.raises(DataError, match=r"class index\(es\) \[1\] have no training images"):
        class_weights([3, 0], "inverse")


def test_weighted_ce_uses_weights_and_moves_with_module():
    logits, y = _batch()
    loss = build_loss(LossConfig(name="weighted_cross_entropy", label_smoothing=0.05), COUNTS)
    w = class_weights(COUNTS, "inverse")
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits, y, weight=w, label_smoothing=0.05))
    assert "weight" in dict(loss.named_buffers())
    assert loss.to(torch.float64).weight.dtype == torch.float64  # buffers follow .to()


def test_balanced_and_list_alpha():
    logits, y = _batch()
    focal = build_loss(LossConfig(name="focal", gamma=0.0, alpha="balanced"), COUNTS)
    assert torch.allclose(focal.alpha, class_weights(COUNTS, "inverse"))
    # gamma=0: per-sample CE scaled by alpha of the target class, plain batch mean
    expected = (F.cross_entropy(logits, y, reduction="none") * focal.alpha[y]).mean()
    assert torch.allclose(focal(logits, y), expected, atol=1e-6)
    listed = build_loss(LossConfig(name="focal", alpha="0.25,0.5,0.25"), COUNTS)
    assert listed.alpha.tolist() == [0.25, 0.5, 0.25]


def test_bf16_logits_give_float32_loss_close_to_fp32():
    logits, y = _batch()
    for name in LOSSES:
        loss = build_loss(LossConfig(name=name, label_smoothing=0.1), COUNTS)
        ref = loss(logits.to(torch.bfloat16).float(), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(logits.to(torch.bfloat16), y)
        assert out.dtype == torch.float32
        assert torch.allclose(out, ref, atol=1e-5), name


def test_validate_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid losses: cross_entropy, focal, weighted_cross_entropy"):
        LossConfig(name="dice").validate()


def test_validate_reports_all_problems():
    with pytest.raises(ConfigError) as e:
        LossConfig(name="focal", gamma=-1.0, label_smoothing=1.0, beta=1.0,
                   alpha="0.25,0.75").validate(num_classes=3)
    msg = str(e.value)
    assert "loss.gamma=-1.0" in msg and "loss.label_smoothing=1.0" in msg and "loss.beta=1.0" in msg
    assert "has 2 values but the task has 3 classes" in msg


def test_validate_alpha_not_numbers():
    with pytest.raises(ConfigError, match="'none', 'balanced' or comma-separated"):
        LossConfig(name="focal", alpha="heavy").validate()
    with pytest.raises(ConfigError, match="finite number >= 0"):
        LossConfig(name="focal", alpha="-1,2").validate()
    LossConfig(name="focal", alpha="0.25,0.75").validate()  # length unchecked without num_classes


def test_alpha_as_a_list_equals_alpha_as_a_string():
    listed = build_loss(LossConfig(name="focal", alpha=(0.25, 0.5, 0.25)), COUNTS)
    assert listed.alpha.tolist() == [0.25, 0.5, 0.25]
    with pytest.raises(ConfigError, match=r"loss.alpha=\[0.5, 0.5\]: has 2 values but the task has 3"):
        LossConfig(name="focal", alpha=(0.5, 0.5)).validate(num_classes=3)
