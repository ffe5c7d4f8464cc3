"""Tests for segpipe.models.UNet: shapes, size checks, argument checks, grads, bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segpipe.models import UNet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("in_channels", [1, 3, 4])
@pytest.mark.parametrize("num_classes", [1, 2, 5])
def test_forward_shape_channels(in_channels: int, num_classes: int) -> None:
    model = UNet(in_channels=in_channels, num_classes=num_classes, base_channels=4, depth=2)
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, num_classes, 32, 32)
    assert out.dtype == torch.float32
    assert (model.in_channels, model.num_classes, model.pad_multiple) == (in_channels, num_classes, 4)


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_forward_shape_depth_norm(depth: int, norm: str) -> None:
    model = UNet(in_channels=3, num_classes=2, base_channels=4, depth=depth, norm=norm)
    assert model.pad_multiple == 2**depth
    out = model(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 2, 32, 48)
    assert torch.isfinite(out).all()


def test_structure_follows_ronneberger() -> None:
    model = UNet(in_channels=3, num_classes=2, base_channels=8, depth=3, norm="group", dropout=0.2)
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (64, 32, (2, 2), (2, 2)),
        (32, 16, (2, 2), (2, 2)),
        (16, 8, (2, 2), (2, 2)),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert isinstance(model.bottleneck_dropout, nn.Dropout2d)
    assert model.bottleneck_dropout.p == pytest.approx(0.2)
    # group counts divide the channels and never exceed 32
    for gn in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
        assert gn.num_channels % gn.num_groups == 0 and gn.num_groups <= 32
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 2


def test_group_norm_count_for_awkward_channels() -> None:
    model = UNet(in_channels=1, num_classes=1, base_channels=6, depth=2, norm="group")
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {6: 6, 12: 12, 24: 24}
    wide = UNet(in_channels=1, num_classes=1, base_channels=48, depth=1, norm="group")
    groups = {m.num_channels: m.num_groups for m in wide.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {48: 24, 96: 32}


@pytest.mark.parametrize(
    ("depth", "size", "padded"),
    [(4, (360, 481), "368x496"), (2, (30, 32), "32x32"), (3, (64, 65), "64x72")],
)
def test_odd_sizes_rejected_with_padded_size(depth: int, size: tuple[int, int], padded: str) -> None:
    model = UNet(in_channels=1, num_classes=2, base_channels=2, depth=depth)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, 1, *size))
    message = str(info.value)
    assert f"UNet(depth={depth}) needs H and W to be multiples of {2**depth}" in message
    assert f"got {size[0]}x{size[1]}" in message
    assert f"pad the input to {padded}" in message


def test_wrong_input_rank_and_channels_rejected() -> None:
    model = UNet(in_channels=3, num_classes=2, base_channels=2, depth=2)
    with pytest.raises(ValueError, match=r"4D input .*\(3, 16, 16\)"):
        model(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="in_channels=3, got an input with 1 channels"):
        model(torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"in_channels": 0}, r"in_channels must be an int >= 1, got 0"),
        ({"num_classes": -1}, r"num_classes must be an int >= 1, got -1"),
        ({"num_classes": 2.0}, r"num_classes must be an int >= 1, got 2\.0"),
        ({"base_channels": True}, r"base_channels must be an int >= 1, got True"),
        ({"depth": 0}, r"depth must be an int in \[1, 8\], got 0"),
        ({"depth": 9}, r"depth must be an int in \[1, 8\], got 9"),
        ({"norm": "instance"}, r"norm must be one of \['batch', 'group', 'none'\], got 'instance'"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1\.0"),
        ({"dropout": -0.1}, r"dropout must be a float in \[0, 1\), got -0\.1"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        UNet(**kwargs)


@torch.no_grad()
def test_each_decoder_level_fuses_the_features_of_its_encoder_level() -> None:
    """The skips carry the encoder's features: a skip replaced by zeros (or taken from another
    level, or the upsampled tensor twice) still sent a gradient to every weight tensor."""
    model = UNet(in_channels=3, num_classes=3, base_channels=4, depth=3).eval()
    encoded = [model.inc, *model.downs[:-1]]  # each level's output, finest first
    outputs: dict[int, torch.Tensor] = {}
    fused: dict[int, torch.Tensor] = {}
    for level, module in enumerate(encoded):
        module.register_forward_hook(lambda m, a, out, level=level: outputs.__setitem__(level, out))
    for i, up in enumerate(model.ups):  # coarsest first: level depth-1-i
        level = len(model.ups) - 1 - i
        up.conv.register_forward_pre_hook(lambda m, a, level=level: fused.__setitem__(level, a[0]))
    model(torch.randn(1, 3, 32, 32))
    assert sorted(fused) == sorted(outputs) == [0, 1, 2]
    for level, features in outputs.items():
        channels = features.shape[1]
        assert fused[level].shape[1] == 2 * channels
        assert torch.equal(fused[level][:, :channels], features), level  # the skip, then
        assert not torch.equal(fused[level][:, channels:], features)      # the upsampled


def test_gradients_reach_every_parameter() -> None:
    model = UNet(in_channels=3, num_classes=3, base_channels=4, depth=3, norm="batch", dropout=0.1)
    out = model(torch.randn(2, 3, 32, 32))
    target = torch.randint(0, 3, (2, 32, 32))
    nn.functional.cross_entropy(out, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_channels_last_and_bf16_autocast(norm: str) -> None:
    model = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2, norm=norm).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.to(memory_format=torch.channels_last))
    assert out_cl.shape == (2, 2, 32, 32)
    torch.testing.assert_close(out_cl, reference, rtol=1e-4, atol=1e-4)
    assert out_bf16.shape == (2, 2, 32, 32)
    assert out_bf16.dtype == torch.bfloat16
    assert torch.isfinite(out_bf16.float()).all()
    torch.testing.assert_close(out_bf16.float(), reference, rtol=0.1, atol=0.1)


def test_bf16_autocast_training_step() -> None:
    model = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_train_eval_dropout_and_determinism() -> None:
    model = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2, dropout=0.5).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_group_norm_with_one_channel_per_group_needs_a_2x2_bottleneck() -> None:
    """A 1 x 1 bottleneck left one value per group: "Expected more than 1 value per channel
    when training", in evaluation too, for an image of pad_multiple pixels or fewer."""
    narrow = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2, norm="group").eval()
    assert narrow.min_size == 8  # 16 channels at the bottleneck, 16 groups
    with pytest.raises(ValueError, match="at least 8"):
        narrow(torch.zeros(1, 3, 4, 4))
    assert narrow(torch.zeros(1, 3, 8, 8)).shape == (1, 2, 8, 8)
    assert UNet(in_channels=3, num_classes=2, base_channels=32, depth=2,
                norm="group").min_size == 0  # 128 channels, 32 groups of 4
    assert UNet(in_channels=3, num_classes=2, base_channels=4, depth=2).min_size == 0
