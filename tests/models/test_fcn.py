"""Tests for segpipe.models.FCN and the bilinear transposed-conv initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segpipe.models import FCN
from segpipe.models.fcn import bilinear_kernel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _smooth_map(channels: int, size: int) -> torch.Tensor:
    """A smooth (N=1, C, size, size) map: low-frequency sines."""
    coords = torch.linspace(0, 3.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    maps = [torch.sin(xx * (c + 1)) + torch.cos(yy * 0.5 * (c + 1)) for c in range(channels)]
    return torch.stack(maps)[None]


def test_bilinear_kernel_values() -> None:
    weight = bilinear_kernel(3, 3, 4)
    assert weight.shape == (3, 3, 4, 4)
    tent = torch.tensor([0.25, 0.75, 0.75, 0.25])
    for c in range(3):
        torch.testing.assert_close(weight[c, c], torch.outer(tent, tent))
    off_diagonal = weight.clone()
    for c in range(3):
        off_diagonal[c, c] = 0
    assert off_diagonal.abs().sum() == 0
    # odd kernel: peak 1 at the centre; non-square channel counts fill the diagonal only
    odd = bilinear_kernel(2, 3, 3)
    assert odd.shape == (2, 3, 3, 3)
    odd_tent = torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(odd[0, 0], torch.outer(odd_tent, odd_tent))
    assert odd[:, 2].abs().sum() == 0


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_bilinear_transposed_conv_matches_interpolate(factor: int) -> None:
    layer = nn.ConvTranspose2d(3, 3, kernel_size=2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(3, 3, 2 * factor))
        x = _smooth_map(3, 8)
        ours = layer(x)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == expected.shape == (1, 3, 8 * factor, 8 * factor)
    interior = (..., slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(ours[interior], expected[interior], rtol=1e-5, atol=1e-5)


def test_model_upsamplers_are_bilinear_and_final_is_fixed() -> None:
    model = FCN(in_channels=3, num_classes=4, variant="8s", base_channels=2)
    for name, factor in [("upscore2", 2), ("upscore_pool4", 2), ("upscore", 8)]:
        layer = getattr(model, name)
        assert isinstance(layer, nn.ConvTranspose2d)
        assert layer.kernel_size == (2 * factor, 2 * factor)
        assert layer.stride == (factor, factor) and layer.padding == (factor // 2, factor // 2)
        if name == "upscore":  # fixed: one kernel per class (grouped), not a K x K matrix
            assert layer.groups == 4
            torch.testing.assert_close(layer.weight.detach(),
                                       bilinear_kernel(1, 1, 2 * factor).expand(4, 1, -1, -1))
        else:
            torch.testing.assert_close(layer.weight.detach(), bilinear_kernel(4, 4, 2 * factor))
    assert model.upscore2.weight.requires_grad and model.upscore_pool4.weight.requires_grad
    assert not model.upscore.weight.requires_grad
    # skip score layers start at zero: a fresh 8s net equals upsampled coarse scores
    assert model.score_pool4.weight.abs().sum() == 0 and model.score_pool3.weight.abs().sum() == 0


def test_fixed_upsampling_grows_with_the_classes_not_their_square() -> None:
    """It was a dense K x K transposed convolution: 369 M parameters for FCN-32s at 300
    classes. Grouped, the output is the same, and a checkpoint of the dense form loads."""
    torch.manual_seed(0)
    model = FCN(in_channels=3, num_classes=5, variant="32s", base_channels=2).eval()
    assert model.upscore.weight.numel() == 5 * 64 * 64
    dense = nn.ConvTranspose2d(5, 5, 64, stride=32, padding=16, bias=False)
    with torch.no_grad():
        dense.weight.copy_(bilinear_kernel(5, 5, 64))
    old = {**model.state_dict(), "upscore.weight": dense.weight.detach().clone()}
    reloaded = FCN(in_channels=3, num_classes=5, variant="32s", base_channels=2).eval()
    reloaded.load_state_dict(old)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(reloaded(x), out)
        model.upscore = dense
        torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("variant", "stride"), [("32s", 32), ("16s", 16), ("8s", 8)])
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 1), (3, 2), (4, 5)])
def test_forward_shapes(variant: str, stride: int, in_channels: int, num_classes: int) -> None:
    model = FCN(in_channels=in_channels, num_classes=num_classes, variant=variant, base_channels=2)
    assert (model.in_channels, model.num_classes, model.pad_multiple) == (in_channels, num_classes, 32)
    assert model.output_stride == stride
    out = model(torch.randn(2, in_channels, 64, 96))
    assert out.shape == (2, num_classes, 64, 96)
    assert torch.isfinite(out).all()


def test_variants_have_their_skip_layers() -> None:
    m32, m16, m8 = (FCN(variant=v, base_channels=2) for v in ("32s", "16s", "8s"))
    assert not hasattr(m32, "score_pool4") and not hasattr(m32, "score_pool3")
    assert hasattr(m16, "score_pool4") and not hasattr(m16, "score_pool3")
    assert hasattr(m8, "score_pool4") and hasattr(m8, "score_pool3")
    assert m32.upscore.stride == (32, 32) and m16.upscore.stride == (16, 16) and m8.upscore.stride == (8, 8)


def test_skip_fusion_is_addition() -> None:
    """Once pool3/pool4 scores are non-zero, 8s output = upsampled sum of the three score maps."""
    model = FCN(in_channels=3, num_classes=2, variant="8s", base_channels=2).eval()
    with torch.no_grad():
        model.score_pool4.weight.normal_()
        model.score_pool3.weight.normal_()
        x = torch.randn(1, 3, 64, 64)
        pool3, pool4, pool5 = model.backbone(x)
        score = model.score_fr(model.fc7(model.fc6(pool5)))
        fused16 = model.upscore2(score) + model.score_pool4(pool4)
        fused8 = model.upscore_pool4(fused16) + model.score_pool3(pool3)
        torch.testing.assert_close(model(x), model.upscore(fused8))


def test_smp_backbone() -> None:
    model = FCN(in_channels=4, num_classes=3, variant="8s", backbone="mobilenet_v2", base_channels=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert model.score_pool3.in_channels == 32 and model.score_pool4.in_channels == 96


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"variant": "4s"}, r"variant must be one of \['32s', '16s', '8s'\], got '4s'"),
        ({"variant": 8}, r"variant must be one of .*, got 8"),
        ({"in_channels": 0}, r"in_channels must be an int >= 1, got 0"),
        ({"num_classes": 0}, r"num_classes must be an int >= 1, got 0"),
        ({"base_channels": 0}, r"base_channels must be an int >= 1, got 0"),
        ({"encoder_depth": 4}, r"encoder_depth must be 5 for FCN.*got 4"),
        ({"backbone": "resnet19"}, r"backbone must be one of segmentation-models-pytorch's .*'resnet19'"),
        ({"backbone": ""}, r"backbone must be 'vgg' or an smp encoder name, got ''"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        FCN(**kwargs)


def test_trainable_parameters_get_gradients() -> None:
    model = FCN(in_channels=3, num_classes=3, variant="8s", base_channels=2)
    out = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(out, torch.randint(0, 3, (2, 64, 64))).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.upscore.weight.grad is None
