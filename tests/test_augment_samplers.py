import numpy as np
import pytest
import torch

from cxrtune.data.augment import PRESETS, AugmentConfig, eval_transform, train_transform
from cxrtune.data.samplers import SAMPLERS
from cxrtune.errors import ConfigError


def image():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 48, 48), dtype=np.uint8))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_gives_normalised_float_images_of_the_same_size(preset):
    torch.manual_seed(0)
    out = train_transform(AugmentConfig(preset=preset), 48, 0.5, 0.25)(image())
    assert out.shape == (1, 48, 48) and out.dtype == torch.float32


def test_evaluation_never_augments():
    x = image()
    a, b = eval_transform(0.5, 0.25)(x), eval_transform(0.5, 0.25)(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, (x.float() / 255 - 0.5) / 0.25)


def test_none_preset_is_identity_and_heavy_changes_images():
    x = image()
    torch.testing.assert_close(train_transform(AugmentConfig(preset="none"), 48, 0, 1)(x), x.float() / 255)
    torch.manual_seed(1)
    assert not torch.equal(train_transform(AugmentConfig(preset="heavy"), 48, 0, 1)(x), x.float() / 255)


def test_per_op_fields_override_the_preset():
    a = AugmentConfig(preset="light", rotation=5.0).resolved()
    assert a.rotation == 5.0 and a.perspective == PRESETS["light"]["perspective"]


def test_invalid_augmentation_is_reported():
    with pytest.raises(ConfigError, match="unknown preset; valid presets: none, light, medium, heavy"):
        AugmentConfig(preset="extreme").validate()
    with pytest.raises(ConfigError, match="augment.hflip=1.5"):
        AugmentConfig(hflip=1.5).validate()


def test_oversample_balances_and_undersample_trims():
    targets = np.array([0] * 90 + [1] * 10)
    g = torch.Generator().manual_seed(0)
    over = list(SAMPLERS.get("oversample")(targets, g))
    assert len(over) == 100 and 0.35 < np.mean(targets[over]) < 0.65
    under = list(SAMPLERS.get("undersample")(targets, g))
    assert len(under) == 20 and targets[under].sum() == 10 and len(set(under)) == 20
    assert SAMPLERS.get("shuffle")(targets, g) is None
