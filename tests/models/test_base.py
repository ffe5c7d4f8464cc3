"""Tests for segpipe.models.base: the shared interface and argument / input checks."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import segpipe.models as models
from segpipe.models import FCN, SegmentationModel, SmpModel, UNet
from segpipe.models.base import check_choice, check_input, check_int, round_up

MODEL_CLASSES = (UNet, FCN, SmpModel)


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_constructors_name_in_channels_and_num_classes(cls: type) -> None:
    # The CLI links data.in_channels / data.num_classes into these two init args.
    params = inspect.signature(cls.__init__).parameters
    assert "in_channels" in params and "num_classes" in params


@pytest.mark.parametrize(
    "model",
    [
        UNet(in_channels=4, num_classes=3, base_channels=4, depth=2),
        FCN(in_channels=4, num_classes=3, variant="32s", base_channels=2),
        SmpModel("unet", "resnet18", in_channels=4, num_classes=3, encoder_depth=3,
                 decoder_channels=(16, 8, 4)),
    ],
    ids=["unet", "fcn", "smp"],
)
def test_every_model_has_the_interface(model: torch.nn.Module) -> None:
    assert isinstance(model, SegmentationModel)
    assert (model.in_channels, model.num_classes) == (4, 3)
    side = model.pad_multiple * 2
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 4, side, side)).shape == (1, 3, side, side)
    assert not isinstance(torch.nn.Conv2d(1, 1, 1), SegmentationModel)


def test_models_import_nothing_else_of_segpipe() -> None:
    folder = Path(models.__file__).parent
    for file in folder.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("segpipe"), f"{file.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("segpipe") for a in node.names), file.name


def test_check_int_messages() -> None:
    assert check_int("depth", 3, 1, 8) == 3
    with pytest.raises(ValueError, match=r"^depth must be an int in \[1, 8\], got 9\.$"):
        check_int("depth", 9, 1, 8)
    with pytest.raises(ValueError, match=r"^num_classes must be an int >= 1, got True \(bool\)\.$"):
        check_int("num_classes", True, 1)
    with pytest.raises(ValueError, match=r"got 2\.0 \(float\)"):
        check_int("in_channels", 2.0, 1)


def test_check_choice_message() -> None:
    assert check_choice("norm", "batch", ("batch", "none")) == "batch"
    with pytest.raises(ValueError, match=r"^norm must be one of \['batch', 'none'\], got 'x'\.$"):
        check_choice("norm", "x", ("batch", "none"))


def test_check_input_messages() -> None:
    check_input(torch.zeros(1, 2, 16, 32), "M", 2, 16)
    with pytest.raises(ValueError, match=r"M expects a 4D input"):
        check_input(torch.zeros(2, 16, 16), "M", 2, 16)
    with pytest.raises(ValueError, match=r"M was built with in_channels=3, got an input with 2"):
        check_input(torch.zeros(1, 2, 16, 16), "M", 3, 16)
    with pytest.raises(ValueError, match=r"pad the input to 32x16 .* logits back to 17x16"):
        check_input(torch.zeros(1, 2, 17, 16), "M", 2, 16)
    with pytest.raises(ValueError, match=r"M takes a floating-point input, got torch.uint8"):
        check_input(torch.zeros(1, 2, 16, 16, dtype=torch.uint8), "M", 2, 16)
    check_input(torch.zeros(1, 2, 16, 16, dtype=torch.bfloat16), "M", 2, 16)
    assert round_up(17, 16) == 32 and round_up(32, 16) == 32


@pytest.mark.parametrize(
    "make, tol",
    [
        (lambda: UNet(in_channels=3, num_classes=2, base_channels=4, depth=2), 1e-4),
        (lambda: FCN(in_channels=3, num_classes=2, variant="32s", base_channels=2), 1e-4),
        (lambda: FCN(in_channels=3, num_classes=2, variant="8s", base_channels=2), 1e-4),
        (lambda: SmpModel("unet", "mobilenet_v2", num_classes=2,
                          decoder_channels=(16, 8, 8, 4, 4)), 1e-3),
    ],
    ids=["unet", "fcn32s", "fcn8s", "smp-unet"],
)
def test_channels_last_and_bf16_autocast(make, tol: float) -> None:
    model = make().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        out_cl = model(x_cl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x_cl)
    torch.testing.assert_close(out_cl, reference, rtol=tol, atol=tol)
    assert out_bf16.shape == (2, 2, 64, 64)
    assert torch.isfinite(out_bf16.float()).all()


@pytest.mark.parametrize(
    "make, channels, size, needs, padded",
    [
        (lambda: FCN(in_channels=1, num_classes=2, variant="16s", base_channels=1), 1, (100, 64),
         "FCN(variant='16s') needs H and W to be multiples of 32", "128x64"),
        (lambda: FCN(in_channels=1, num_classes=2, variant="16s", base_channels=1), 1, (64, 33),
         "FCN(variant='16s') needs H and W to be multiples of 32", "64x64"),
        (lambda: FCN(in_channels=1, num_classes=2, variant="16s", base_channels=1), 1, (31, 97),
         "FCN(variant='16s') needs H and W to be multiples of 32", "32x128"),
        (lambda: SmpModel("fpn", "mobilenet_v2", num_classes=2), 3, (100, 64),
         "SmpModel(arch='fpn', encoder_depth=5) needs H and W to be multiples of 32", "128x64"),
        (lambda: SmpModel("fpn", "mobilenet_v2", num_classes=2), 3, (64, 65),
         "SmpModel(arch='fpn', encoder_depth=5) needs H and W to be multiples of 32", "64x96"),
    ],
    ids=["fcn-100x64", "fcn-64x33", "fcn-31x97", "smp-100x64", "smp-64x65"],
)
def test_odd_sizes_rejected_with_the_padded_size(make, channels, size, needs, padded) -> None:
    model = make().eval()
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, channels, *size))
    message = str(info.value)
    assert needs in message
    assert f"got {size[0]}x{size[1]}" in message
    assert f"pad the input to {padded}" in message
