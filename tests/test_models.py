"""Tests for cxrtune.models: every backbone trains, and weights load exactly or fail loudly."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from cxrtune.errors import ConfigError
from cxrtune.models import (
    BACKBONES,
    ModelConfig,
    build_model,
    head_parameters,
    imagenet_weights_file,
    input_size,
    logits_and_aux,
    set_backbone_frozen,
)
from cxrtune.model_config import torch_hub_dir

NUM_CLASSES = 3


def _step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step with cross-entropy (plus 0.4 x aux loss, as the engine does)."""
    model.train()
    # small lr: with 32 px inputs the last BatchNorms see 2 values each, so gradients are huge
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    logits, aux = logits_and_aux(model(x))
    target = torch.tensor([0, 2])
    loss = nn.functional.cross_entropy(logits, target)
    if aux is not None:
        loss = loss + 0.4 * nn.functional.cross_entropy(aux, target)
    opt.zero_grad()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()


def _first_conv_and_head(model: nn.Module, backbone: str) -> list[torch.Tensor]:
    spec = BACKBONES.get(backbone)
    return [model.get_submodule(spec.first_conv).weight, model.get_submodule(spec.head).weight]


CONTRACT = [(name, 1) for name in BACKBONES.names()] + [
    ("resnet18", 3), ("simple_cnn", 3), ("convnet5", 3), ("efficientnet_b0", 3)]


@pytest.mark.parametrize(("backbone", "channels"), CONTRACT,
                         ids=[f"{b}-{c}ch" for b, c in CONTRACT])
def test_every_backbone_trains_one_step(backbone: str, channels: int) -> None:
    torch.manual_seed(0)
    size = BACKBONES.get(backbone).min_size
    model = build_model(ModelConfig(backbone=backbone, in_channels=channels),
                        NUM_CLASSES, image_size=size)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    watched = _first_conv_and_head(model, backbone)
    before = [w.detach().clone() for w in watched]
    _step(model, x)
    for old, new in zip(before, watched):
        assert not torch.equal(old, new), "parameters did not change after a training step"
    with torch.no_grad():
        assert model.eval()(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("backbone", ["simple_cnn", "convnet5"])
@pytest.mark.parametrize("size", [64, 224])
def test_small_cnns_are_sized_from_the_input(backbone: str, size: int) -> None:
    model = build_model(ModelConfig(backbone=backbone), NUM_CLASSES, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, size, size)).shape == (1, NUM_CLASSES)


def test_inception_aux_logits_at_299_and_plain_tensor_in_eval() -> None:
    model = build_model(ModelConfig(backbone="inception_v3"), NUM_CLASSES, image_size=299)
    x = torch.randn(2, 1, 299, 299)
    with torch.no_grad():
        logits, aux = logits_and_aux(model.train()(x))
        assert logits.shape == (2, NUM_CLASSES) and aux is not None and aux.shape == (2, NUM_CLASSES)
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and logits_and_aux(out)[1] is None
    assert len(head_parameters(model, "inception_v3")) == 4  # fc and AuxLogits.fc


def test_inception_below_299_trains_without_aux() -> None:
    model = build_model(ModelConfig(backbone="inception_v3"), NUM_CLASSES, image_size=75)
    with torch.no_grad():
        logits, aux = logits_and_aux(model.train()(torch.randn(2, 1, 75, 75)))
    assert logits.shape == (2, NUM_CLASSES) and aux is None


def test_input_size_and_too_small_images() -> None:
    assert input_size("resnet50") == 224 and input_size("inception_v3") == 299
    with pytest.raises(ConfigError, match="at least 75"):
        build_model(ModelConfig(backbone="inception_v3"), NUM_CLASSES, image_size=64)
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        input_size("nope")


def test_freeze_keeps_only_the_head_trainable() -> None:
    model = build_model(ModelConfig(backbone="resnet18"), NUM_CLASSES, image_size=32)
    head = {id(p) for p in head_parameters(model, "resnet18")}
    assert head == {id(model.fc.weight), id(model.fc.bias)}
    set_backbone_frozen(model, "resnet18", True)
    assert {id(p) for p in model.parameters() if p.requires_grad} == head
    set_backbone_frozen(model, "resnet18", False)
    assert all(p.requires_grad for p in model.parameters())


def test_dropout_head_keeps_linear_keys() -> None:
    model = build_model(ModelConfig(backbone="resnet18", dropout=0.3), NUM_CLASSES, image_size=32)
    assert model.fc.p == 0.3 and {"fc.weight", "fc.bias"} <= set(model.state_dict())


# ---------------------------------------------------------------- CheXNet checkpoints


def _to_chexnet_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision densenet121 keys -> arnoweng/CheXNet keys (DataParallel, old layer names)."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        old = re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", key)
        out[f"module.densenet121.{old}"] = value
    out["module.densenet121.classifier.0.weight"] = torch.randn(14, 1024)
    out["module.densenet121.classifier.0.bias"] = torch.randn(14)
    return out


@pytest.fixture(scope="module")
def densenet_reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = tvm.densenet121(weights=None)
    with torch.no_grad():  # non-default BN statistics, so the test sees them loaded
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def _feature_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("features.")}


def _assert_features_equal(model: nn.Module, reference: dict[str, torch.Tensor],
                           in_channels: int) -> None:
    got = _feature_state(model)
    assert set(got) == {k for k in reference if k.startswith("features.")}
    for key, value in got.items():
        expected = reference[key]
        if key == "features.conv0.weight" and in_channels == 1:
            expected = expected.sum(dim=1, keepdim=True)
        assert torch.equal(value, expected), key


def test_chexnet_checkpoint_loads_every_feature(tmp_path: Path, densenet_reference) -> None:
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": _to_chexnet_naming(densenet_reference), "epoch": 1}, path)
    assert any(".norm.1." in k for k in torch.load(path)["state_dict"])
    for channels in (3, 1):
        cfg = ModelConfig(weights=f"chexnet:{path}", in_channels=channels)
        model = build_model(cfg, NUM_CLASSES, image_size=32)
        _assert_features_equal(model, densenet_reference, channels)
        assert model.classifier.out_features == NUM_CLASSES


def test_chexnet_variants_without_wrapper_or_batch_counters(tmp_path: Path,
                                                           densenet_reference) -> None:
    # the real file predates num_batches_tracked; a plain dict with only 'module.' also loads
    state = {k.replace("module.densenet121.", "module."): v
             for k, v in _to_chexnet_naming(densenet_reference).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(weights=f"chexnet:{path}", in_channels=3), NUM_CLASSES,
                        image_size=32)
    reference = {k: v for k, v in densenet_reference.items() if not k.endswith("tracked")}
    got = _feature_state(model)
    assert all(torch.equal(got[k], v) for k, v in reference.items() if k.startswith("features."))


def test_chexnet_checkpoint_with_a_missing_key_is_rejected(tmp_path: Path,
                                                          densenet_reference) -> None:
    state = _to_chexnet_naming(densenet_reference)
    del state["module.densenet121.features.denseblock2.denselayer3.conv.1.weight"]
    path = tmp_path / "broken.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConfigError, match="not a CheXNet DenseNet-121 checkpoint") as err:
        build_model(ModelConfig(weights=f"chexnet:{path}"), NUM_CLASSES, image_size=32)
    assert "features.denseblock2.denselayer3.conv1.weight" in str(err.value)


def test_chexnet_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as err:
        ModelConfig(weights=f"chexnet:{tmp_path}/absent.pth.tar").validate()
    assert "absent.pth.tar" in str(err.value)
    path = tmp_path / "x.pth"
    torch.save({}, path)
    with pytest.raises(ConfigError, match="only for backbone 'densenet121'"):
        ModelConfig(backbone="resnet18", weights=f"chexnet:{path}").validate()


# ---------------------------------------------------------------- torchvision cache


def _cache_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights_enum) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / os.path.basename(weights_enum.DEFAULT.url)


@pytest.fixture
def resnet18_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    state = tvm.resnet18(weights=None).state_dict()
    torch.save(state, _cache_file(monkeypatch, tmp_path, tvm.ResNet18_Weights))
    return state


def test_imagenet_weights_from_local_cache(resnet18_cache) -> None:
    model = build_model(ModelConfig(backbone="resnet18", weights="imagenet", in_channels=3),
                        NUM_CLASSES, image_size=32)
    got = model.state_dict()
    for key, value in resnet18_cache.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert model.fc.out_features == NUM_CLASSES


def test_imagenet_densenet_with_legacy_keys(monkeypatch, tmp_path, densenet_reference) -> None:
    # torchvision's real densenet121 file still uses the old 'norm.1' layer names
    legacy = {re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", k): v
              for k, v in densenet_reference.items()}
    torch.save(legacy, _cache_file(monkeypatch, tmp_path, tvm.DenseNet121_Weights))
    model = build_model(ModelConfig(weights="imagenet", in_channels=3), NUM_CLASSES, image_size=32)
    _assert_features_equal(model, densenet_reference, 3)


def test_missing_imagenet_file_names_file_and_directory(monkeypatch, tmp_path) -> None:
    expected = _cache_file(monkeypatch, tmp_path, tvm.ResNet50_Weights)
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(backbone="resnet50", weights="imagenet"), NUM_CLASSES, 32)
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message and str(expected.parent) in message
    assert tvm.ResNet50_Weights.DEFAULT.url in message


def test_weights_table_matches_torchvision() -> None:
    # model_config.py copies each backbone's weights file name so `cxrtune validate` can
    # check the cache without importing torch: this catches a torchvision upgrade moving it
    for name in BACKBONES:
        spec = BACKBONES.get(name)
        if spec.weights_enum is None:
            assert spec.weights_file is None, name
            continue
        path, url = imagenet_weights_file(name)
        assert url == getattr(tvm, spec.weights_enum).DEFAULT.url, name
        assert path.name == spec.weights_file


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "xdg"}, {"TORCH_HOME": "th", "XDG_CACHE_HOME": "xdg"}])
def test_torch_hub_dir_follows_torch(monkeypatch, tmp_path, env) -> None:
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / value))
    assert torch_hub_dir() == Path(torch.hub.get_dir())


def test_small_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        ModelConfig(backbone="simple_cnn", weights="imagenet").validate()


def test_one_channel_model_equals_three_channel_model_on_replicated_gray(resnet18_cache) -> None:
    rgb = build_model(ModelConfig(backbone="resnet18", weights="imagenet", in_channels=3),
                      NUM_CLASSES, image_size=32).eval()
    gray = build_model(ModelConfig(backbone="resnet18", weights="imagenet", in_channels=1),
                       NUM_CLASSES, image_size=32).eval()
    gray.fc.load_state_dict(rgb.fc.state_dict())  # heads are fresh: make them equal
    assert gray.conv1.in_channels == 1
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- state-dict paths


def test_state_dict_path_with_other_head_loads_the_rest(tmp_path, caplog) -> None:
    torch.manual_seed(3)
    source = build_model(ModelConfig(backbone="resnet18"), 5, image_size=32)
    # wrapped and DataParallel-prefixed, as training scripts often save them
    path = tmp_path / "run.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    with caplog.at_level(logging.WARNING, logger="cxrtune.models"):
        model = build_model(ModelConfig(backbone="resnet18", weights=str(path)), NUM_CLASSES, 32)
    assert "head skipped" in caplog.text
    got, want = model.state_dict(), source.state_dict()
    for key, value in want.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert model.fc.out_features == NUM_CLASSES

    same = build_model(ModelConfig(backbone="resnet18", weights=str(path)), 5, 32)
    assert torch.equal(same.fc.weight, source.fc.weight)  # matching head is loaded too


def test_state_dict_path_converts_rgb_first_conv(tmp_path, resnet18_cache) -> None:
    path = tmp_path / "tv.pth"
    torch.save(resnet18_cache, path)  # 3 channels, 1000 classes
    model = build_model(ModelConfig(backbone="resnet18", weights=str(path)), NUM_CLASSES, 32)
    assert torch.equal(model.conv1.weight, resnet18_cache["conv1.weight"].sum(1, keepdim=True))


def test_state_dict_path_with_missing_key_is_rejected(tmp_path) -> None:
    state = build_model(ModelConfig(backbone="resnet18"), NUM_CLASSES, 32).state_dict()
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="does not fit backbone 'resnet18'") as err:
        build_model(ModelConfig(backbone="resnet18", weights=str(path)), NUM_CLASSES, 32)
    assert "layer2.0.conv1.weight" in str(err.value) and "extra.weight" in str(err.value)


def test_file_that_is_not_weights(tmp_path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ConfigError, match="is not PyTorch weights: not a file written by torch.save"):
        build_model(ModelConfig(backbone="resnet18", weights=str(path)), NUM_CLASSES, 32)


# ---------------------------------------------------------------- bad configs


def test_bad_config_lists_every_problem() -> None:
    cfg = ModelConfig(backbone="resnet9000", weights="imagenat", in_channels=2, dropout=1.0,
                      freeze_epochs=-1)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    assert "resnet9000" in message and "densenet121, efficientnet_b0" in message
    assert "inception_v3" in message and "simple_cnn" in message
    assert "in_channels=2" in message
    assert "'imagenat': neither 'none', 'imagenet', 'chexnet:PATH' nor an existing" in message
    assert "dropout=1.0" in message and "freeze_epochs=-1" in message


def test_build_model_validates() -> None:
    with pytest.raises(ConfigError, match="in_channels=2"):
        build_model(ModelConfig(backbone="resnet18", in_channels=2), NUM_CLASSES, 32)


def test_chexnet_file_that_is_not_a_checkpoint_says_what_is_expected(tmp_path) -> None:
    path = tmp_path / "model.pth.tar"
    path.write_text("hello")
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(backbone="densenet121", weights=f"chexnet:{path}"), NUM_CLASSES, 32)
    msg = str(err.value)
    assert "is not PyTorch weights: not a file written by torch.save" in msg
    assert "expected the CheXNet DenseNet-121 checkpoint" in msg and "model.pth.tar" in msg
    assert "101" not in msg


def test_head_logits_are_float32_under_bf16_autocast() -> None:
    from cxrtune.models import DropoutLinear

    head = DropoutLinear(8, 3)
    x = torch.randn(4, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.nn.functional.linear(x.float(), head.weight, head.bias))
    model = build_model(ModelConfig(backbone="simple_cnn"), NUM_CLASSES, 32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.dtype == torch.float32  # so softmax, AUC and ECE see fp32 logits


def test_frozen_batchnorm_keeps_its_running_statistics() -> None:
    from cxrtune.models import keep_frozen_batchnorm_in_eval, set_backbone_frozen

    model = build_model(ModelConfig(backbone="convnet5"), NUM_CLASSES, 32)
    bn = model.features[3]
    set_backbone_frozen(model, "convnet5", True)
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    before = bn.running_mean.clone()
    model(torch.randn(4, 1, 32, 32))
    assert not bn.training and torch.equal(bn.running_mean, before)
    set_backbone_frozen(model, "convnet5", False)
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    assert bn.training
