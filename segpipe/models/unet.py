"""U-Net (Ronneberger et al., 2015) as a plain ``torch.nn`` module.

The layout follows milesial's Pytorch-UNet: an input double convolution, ``depth``
down blocks (2x2 max-pool then double conv, channels doubling), ``depth`` up blocks
(2x2 transposed convolution halving the channels, concatenation with the encoder's
skip tensor, double conv) and a 1x1 convolution head. Convolutions use ``padding=1``,
so the output has the input's height and width as long as both are multiples of
``2**depth``.

The argument / input-size checks shared by every model live in :mod:`segpipe.models.base`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import ModelArgumentError, check_choice, check_input, check_int

__all__ = ["UNet", "DoubleConv", "Down", "Up"]

NormName = Literal["batch", "group", "none"]
_NORMS: tuple[str, ...] = ("batch", "group", "none")
_MAX_GROUPS = 32


# ------------------------------------------------------------------------- blocks
def _group_count(channels: int, max_groups: int = _MAX_GROUPS) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups``."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``channels`` feature maps (``Identity`` for "none")."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    return nn.Identity()


class DoubleConv(nn.Module):
    """(3x3 conv => norm => ReLU) x 2, ``padding=1`` so H and W are kept.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        norm: ``"batch"``, ``"group"`` or ``"none"``.
        mid_channels: Channels after the first conv (default ``out_channels``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "batch", mid_channels: int | None = None
    ) -> None:
        super().__init__()
        mid_channels = out_channels if mid_channels is None else mid_channels
        bias = norm == "none"  # a following norm layer makes a conv bias redundant
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=bias),
            _make_norm(norm, mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            _make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_channels, H, W)`` to ``(N, out_channels, H, W)``."""
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool then :class:`DoubleConv`: ``(N, C_in, H, W) -> (N, C_out, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C_in, H, W)`` to ``(N, C_out, H/2, W/2)``."""
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Transposed-conv upsampling, skip concatenation, then :class:`DoubleConv`.

    Args:
        in_channels: Channels of the coarse input; the transposed conv halves them,
            and the skip tensor is expected to carry ``in_channels // 2`` channels.
        out_channels: Output channels.
        norm: ``"batch"``, ``"group"`` or ``"none"``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels, norm)  # skip + upsampled channels

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Upsample and fuse with the encoder's skip tensor.

        Args:
            x: Coarse features, ``(N, in_channels, H/2, W/2)``.
            skip: Encoder features at the target resolution, ``(N, in_channels // 2, H, W)``.

        Returns:
            ``(N, out_channels, H, W)``.
        """
        upsampled = self.up(x)  # (N, in_channels // 2, H, W)
        fused = torch.cat([skip, upsampled], dim=1)  # (N, in_channels, H, W)
        return self.conv(fused)


# -------------------------------------------------------------------------- model
class UNet(nn.Module):
    """U-Net of Ronneberger et al. (2015) with same-size (padded) convolutions.

    Channels per level are ``base_channels * 2**level`` for ``level = 0..depth``; the
    deepest level (``base_channels * 2**depth`` channels at ``H/2**depth``) is the
    bottleneck, where ``Dropout2d(dropout)`` is applied.

    Args:
        in_channels: Channels of the input image (1 for grey, 3 for RGB, ...).
        num_classes: Number of output logit channels.
        base_channels: Channels of the first level (64 in the paper).
        depth: Number of 2x2 poolings; the network takes H and W that are multiples of
            ``2**depth`` (segpipe's task pads any other size and crops the logits back).
        norm: Normalisation after each 3x3 conv: ``"batch"``, ``"group"`` (group count
            = largest divisor of the channels that is <= 32) or ``"none"``.
        dropout: ``Dropout2d`` probability at the bottleneck, in ``[0, 1)``.

    Attributes:
        in_channels: As given.
        num_classes: As given.
        pad_multiple: ``2**depth``; H and W of the input must be multiples of it.
        min_size: Least H and W: ``2 * pad_multiple`` for group norm with one channel per
            group at the bottleneck (a 1 x 1 bottleneck would hold one value per group), else 0.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example:
        >>> model = UNet(in_channels=3, num_classes=2, base_channels=8, depth=3)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        norm: NormName = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("UNet in_channels", in_channels, 1)
        check_int("UNet num_classes", num_classes, 1)
        check_int("UNet base_channels", base_channels, 1)
        check_int("UNet depth", depth, 1, 8)
        check_choice("UNet norm", norm, _NORMS)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ModelArgumentError(f"UNet dropout must be a float in [0, 1), got {dropout!r}.")

        #: The encoder starts from random weights (no pretrained option; see init_from).
        self.encoder_pretrained = False
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.depth = depth
        self.norm = norm
        self.pad_multiple = 2**depth

        channels = [base_channels * 2**level for level in range(depth + 1)]
        # Group norm needs two values per group: with one channel per group, an input of
        # pad_multiple pixels leaves a 1 x 1 bottleneck with one (segpipe pads up to min_size).
        one_per_group = norm == "group" and _group_count(channels[-1]) == channels[-1]
        self.min_size = 2 * self.pad_multiple if one_per_group else 0
        self.inc = DoubleConv(in_channels, channels[0], norm)
        self.downs = nn.ModuleList(Down(channels[i], channels[i + 1], norm) for i in range(depth))
        self.bottleneck_dropout = nn.Dropout2d(float(dropout)) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(Up(channels[i + 1], channels[i], norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits, as :class:`~segpipe.models.base.SegmentationModel` describes.

        Raises:
            ValueError: From :func:`~segpipe.models.base.check_input`: H or W not a multiple of
                ``pad_multiple`` (the message names the padded size) or wrong channels.
        """
        check_input(x, f"UNet(depth={self.depth})", self.in_channels, self.pad_multiple,
                    self.min_size)

        features = self.inc(x)  # (N, base, H, W)
        skips: list[Tensor] = []  # encoder outputs, finest first: (N, base * 2**l, H/2**l, W/2**l)
        for down in self.downs:
            skips.append(features)
            features = down(features)
        bottleneck = self.bottleneck_dropout(features)  # (N, base * 2**depth, H/2**depth, W/2**depth)

        decoded = bottleneck
        for up, skip in zip(self.ups, reversed(skips)):
            decoded = up(decoded, skip)  # one level finer, channels halved
        return self.head(decoded)  # (N, num_classes, H, W)

    def encoder_modules(self) -> list[nn.Module]:
        """The contracting path, for freezing and discriminative learning rates.

        ``[inc, downs]``: the input double conv and the ``depth`` down blocks (bottleneck
        included); the up blocks and the head are the decoder. See
        :class:`~segpipe.models.base.SegmentationModel`.
        """
        return [self.inc, self.downs]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"base_channels={self.base_channels}, depth={self.depth}, norm={self.norm!r}"
        )
