"""Audit tests for segpipe.models.UNet: which convolutions carry a bias."""

from __future__ import annotations

from torch import nn

from segpipe.models import UNet


def test_convolutions_have_a_bias_only_without_a_normalisation_layer() -> None:
    """With norm="none" nothing after a 3x3 convolution can shift its output, so each keeps
    its bias; before BatchNorm or GroupNorm the bias is redundant and left out."""
    def convs(norm: str) -> list[nn.Conv2d]:
        model = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2, norm=norm)
        return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]

    assert all(c.bias is not None for c in convs("none"))
    assert all(c.bias is None for c in convs("batch"))
    assert all(c.bias is None for c in convs("group"))
