"""Tiny networks for prediction tests (importable by ``class_path`` from checkpoints)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PointwiseNet(nn.Module):
    """A 1×1 convolution: its receptive field is one pixel, so tiling cannot change its output.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        seed: Seed of the random weights.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pad_multiple = 32
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 2)
            self.conv.bias.copy_(torch.randn(num_classes, generator=gen))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ThresholdNet(nn.Module):
    """Class = which third of [0, 1] the first band's value falls in (deterministic, testable).

    Expects inputs normalised with mean 0 / std 1, i.e. the [0, 1]-scaled value itself.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pad_multiple = 32
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        v = x[:, :1]
        centres = (torch.arange(self.num_classes, dtype=x.dtype, device=x.device) + 0.5)
        centres = centres / self.num_classes
        return -50.0 * (v - centres[None, :, None, None]) ** 2 + self.dummy


class UntypedNet(nn.Module):
    """A 1×1 convolution whose constructor has no annotations (LightningCLI trains such nets:
    it parses untyped arguments as they are), and keeps a non-tensor extra state."""

    def __init__(self, in_channels=3, num_classes=3, note="x"):  # noqa: ANN001, ANN204
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.note = note
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def get_extra_state(self) -> dict:
        return {"note": self.note}

    def set_extra_state(self, state: dict) -> None:
        self.note = state["note"]

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
