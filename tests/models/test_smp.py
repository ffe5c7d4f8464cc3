"""Tests for segpipe.models.SmpModel and load_encoder_weights (no downloads, tiny inputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from segpipe.models import SmpModel, load_encoder_weights

ENCODER = "resnet18"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def source_model() -> SmpModel:
    torch.manual_seed(1)
    model = SmpModel("unet", ENCODER, in_channels=3, num_classes=2)
    # make the BN statistics non-trivial so the round trip checks buffers too
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model


def _assert_encoders_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("arch", "encoder", "in_channels", "num_classes"),
    [
        ("unet", "resnet18", 3, 2),
        ("fpn", "mobilenet_v2", 1, 5),
        ("deeplabv3plus", "mobilenet_v2", 4, 1),
        ("linknet", "resnet18", 3, 3),
        ("pspnet", "mobilenet_v2", 3, 2),
    ],
)
def test_forward_shapes(arch: str, encoder: str, in_channels: int, num_classes: int) -> None:
    model = SmpModel(arch, encoder, in_channels=in_channels, num_classes=num_classes).eval()
    assert (model.in_channels, model.num_classes, model.pad_multiple) == (in_channels, num_classes, 32)
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, 64, 64))
    assert out.shape == (1, num_classes, 64, 64)
    assert torch.isfinite(out).all()


def test_encoder_depth_sets_pad_multiple() -> None:
    model = SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_depth=3, decoder_channels=(16, 8, 4))
    model.eval()
    assert model.pad_multiple == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 2, 40, 48)


@pytest.mark.parametrize(("arch", "depth"), [("pspnet", 5), ("pspnet", 4), ("fpn", 4), ("fpn", 3)])
def test_upsampling_follows_encoder_depth(arch: str, depth: int) -> None:
    """smp's default upsampling of pspnet/fpn only fits its own default depth; ours always does."""
    model = SmpModel(arch, "mobilenet_v2", num_classes=2, encoder_depth=depth).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_wrong_explicit_upsampling_is_reported() -> None:
    model = SmpModel("fpn", "mobilenet_v2", num_classes=2, upsampling=2).eval()
    pattern = r"returned \(32, 32\) logits for a \(64, 64\) input; set its upsampling="
    with pytest.raises(RuntimeError, match=pattern):
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"arch": "unetx"}, ValueError, r"arch must be one of .*'unet'.*got 'unetx'.*Did you mean 'unet'"),
        ({"encoder_name": "resnet19"}, ValueError, r"encoder_name must be one of .*got 'resnet19'"),
        ({"encoder_name": "tu-not_a_model"}, ValueError, r"'tu-not_a_model' names no timm model"),
        ({"encoder_depth": 6}, ValueError, r"encoder_depth must be an int in \[1, 5\], got 6"),
        ({"num_classes": 0}, ValueError, r"num_classes must be an int >= 1, got 0"),
        ({"in_channels": "3"}, ValueError, r"in_channels must be an int >= 1, got '3'"),
        ({"freeze_encoder": 1}, ValueError, r"freeze_encoder must be a bool, got 1"),
        ({"classes": 3}, ValueError, r"pass num_classes, not classes"),
        ({"activation": "sigmoid"}, ValueError, r"activation must be None .*got 'sigmoid'"),
        ({"encoder_weights": "imagenet"}, ValueError, r"='imagenet'.*never downloads.*local file"),
        ({"encoder_weights": "no/such/file.pth"}, FileNotFoundError, r"no/such/file\.pth"),
        ({"encoder_weights": "missing.safetensors"}, FileNotFoundError, r"missing\.safetensors"),
        ({"bogus_option": 1}, ValueError, r"takes no argument\(s\) \['bogus_option'\].*decoder_channels"),
        ({"encoder_depth": 3}, ValueError, r"could not build arch='unet'.*encoder_depth=3.*decoder_channels"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, exc: type[Exception], pattern: str) -> None:
    kwargs = {"encoder_name": "mobilenet_v2", **kwargs}
    with pytest.raises(exc, match=pattern):
        SmpModel(**kwargs)


def test_weights_round_trip_pth_nested_and_prefixed(source_model: SmpModel, tmp_path: Path) -> None:
    state = {f"module.encoder.{k}": v for k, v in source_model.encoder.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)  # ImageNet classifier: dropped
    state["module.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)

    model = SmpModel("unet", ENCODER, num_classes=2, encoder_weights=str(path))
    _assert_encoders_equal(model.encoder, source_model.encoder)


def test_weights_round_trip_safetensors(source_model: SmpModel, tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.encoder.state_dict().items()}, str(path))

    model = SmpModel("fpn", ENCODER, num_classes=3, encoder_weights=path)
    _assert_encoders_equal(model.encoder, source_model.encoder)


def test_weights_from_whole_model_checkpoint(source_model: SmpModel, tmp_path: Path) -> None:
    """A Lightning-style checkpoint of the whole model: decoder/head keys are ignored."""
    path = tmp_path / "last.pt"
    torch.save({"model": {f"model.{k}": v for k, v in source_model.model.state_dict().items()}}, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    load_encoder_weights(encoder, path)
    _assert_encoders_equal(encoder, source_model.encoder)


def test_shape_mismatch_names_key_and_shapes(source_model: SmpModel, tmp_path: Path) -> None:
    path = tmp_path / "rgb.pth"
    torch.save(source_model.encoder.state_dict(), path)
    with pytest.raises(ValueError) as info:
        SmpModel("unet", ENCODER, in_channels=4, num_classes=2, encoder_weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "conv1.weight: file (64, 3, 7, 7) vs model (64, 4, 7, 7)" in message
    assert "same in_channels" in message


def test_missing_key_named(source_model: SmpModel, tmp_path: Path) -> None:
    state = source_model.encoder.state_dict()
    del state["layer2.0.bn1.weight"]
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1\.weight: model \(128,\), absent from the file"):
        load_encoder_weights(encoder, path)


def test_unrelated_keys_warn(source_model: SmpModel, tmp_path: Path) -> None:
    state = dict(source_model.encoder.state_dict())
    state["extra_block.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    with pytest.warns(UserWarning, match="extra_block.weight"):
        load_encoder_weights(encoder, path)
    _assert_encoders_equal(encoder, source_model.encoder)


def test_load_encoder_weights_path_errors(tmp_path: Path) -> None:
    encoder = nn.Conv2d(1, 1, 1)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_encoder_weights(encoder, tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="never downloads"):
        load_encoder_weights(encoder, "imagenet")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"suffix '\.npz'.*\.safetensors"):
        load_encoder_weights(encoder, odd)


def test_freeze_encoder_trains_only_decoder_and_head() -> None:
    model = SmpModel(
        "unet", "mobilenet_v2", num_classes=2, freeze_encoder=True, decoder_channels=(16, 8, 8, 4, 4)
    )
    model.train()
    assert model.training and model.model.decoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(not m.training for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.model.decoder.parameters())
    assert all(p.requires_grad for p in model.model.segmentation_head.parameters())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 2, (2, 64, 64)))
    loss.backward()
    optimizer.step()
    after = model.state_dict()

    for key in before:
        if key.startswith("model.encoder."):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)  # incl. BN stats
    for name, param in model.named_parameters():
        if not name.startswith("model.encoder."):
            assert not torch.equal(param.detach(), before[name]), f"{name} did not change"

    model.eval()
    model.train(True)
    assert not model.encoder.training and model.model.segmentation_head.training


