"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015): FCN-32s/16s/8s.

The backbone yields three feature maps: ``pool3`` (stride 8), ``pool4`` (stride 16)
and ``pool5`` (stride 32). ``fc6``/``fc7`` (as convolutions) and a 1x1 ``score_fr``
layer turn ``pool5`` into coarse class scores; FCN-16s and FCN-8s upsample them x2 with
a transposed convolution and **add** 1x1 score maps of ``pool4`` (and then ``pool3``)
-- the skip fusion of the paper -- before a final x16 / x8 upsampling (x32 for FCN-32s).

As in the original Caffe models, every upsampling layer is an ``nn.ConvTranspose2d``
initialised to bilinear interpolation (:func:`bilinear_kernel`); the x2 layers are
learned, the final one is kept fixed (``requires_grad=False``), and the pool score
layers start at zero so that a freshly built 16s/8s net starts from the coarser net's
scores: the same up to interpolation (bilinear x2 then x16 is not bilinear x32; with a
32s net's weights, the logits differed by about 0.02 on logits of about 0.1, the classes
not at all).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import ModelArgumentError, check_choice, check_input, check_int
from .unet import DoubleConv

__all__ = ["FCN", "bilinear_kernel"]

FCNVariant = Literal["32s", "16s", "8s"]
_VARIANTS: tuple[str, ...] = ("32s", "16s", "8s")
_STRIDES: dict[str, int] = {"32s": 32, "16s": 16, "8s": 8}
_FC_DROPOUT = 0.5  # fc6/fc7 dropout of the original VGG-16 / FCN


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> Tensor:
    """Weights that make a ``ConvTranspose2d`` perform bilinear upsampling.

    Port of ``upsample_filt`` from the original FCN code: a separable triangle filter
    placed on the channel diagonal (channel ``i`` is upsampled into channel ``i``; all
    cross-channel weights are zero). With ``stride=s``, ``kernel_size=2*s`` and
    ``padding=s//2`` the layer reproduces ``F.interpolate(scale_factor=s,
    mode="bilinear", align_corners=False)`` away from the borders.

    Args:
        in_channels: Input channels of the transposed convolution.
        out_channels: Output channels of the transposed convolution.
        kernel_size: Side of the square kernel.

    Returns:
        Float tensor of shape ``(in_channels, out_channels, kernel_size, kernel_size)``
        (the layout of ``nn.ConvTranspose2d.weight`` with ``groups=1``).

    Raises:
        ValueError: If an argument is not a positive int.
    """
    check_int("in_channels", in_channels, 1)
    check_int("out_channels", out_channels, 1)
    check_int("kernel_size", kernel_size, 1)
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    grid = torch.arange(kernel_size, dtype=torch.float64)
    tent = 1.0 - (grid - center).abs() / factor  # (kernel_size,)
    filt = (tent[:, None] * tent[None, :]).to(torch.float32)  # (kernel_size, kernel_size)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    for channel in range(min(in_channels, out_channels)):
        weight[channel, channel] = filt
    return weight


def _bilinear_upsample(channels: int, factor: int, trainable: bool = True) -> nn.ConvTranspose2d:
    """``ConvTranspose2d`` upsampling by ``factor`` (kernel ``2f``, stride ``f``, padding ``f/2``),
    initialised to bilinear interpolation: ``(N, C, H, W) -> (N, C, f*H, f*W)``.

    A learned layer is dense (classes may mix, as in the Caffe models). The fixed one is
    grouped, one kernel per class: the dense form's off-diagonal weights are zeros that never
    change, ``K² × (2f)²`` of them (369 M parameters for FCN-32s at 300 classes); the output is
    the same.
    """
    groups = 1 if trainable else channels
    layer = nn.ConvTranspose2d(
        channels, channels, kernel_size=2 * factor, stride=factor, padding=factor // 2,
        bias=False, groups=groups,
    )
    with torch.no_grad():
        if groups == 1:
            layer.weight.copy_(bilinear_kernel(channels, channels, 2 * factor))
        else:  # (K, 1, k, k): each class's kernel
            layer.weight.copy_(bilinear_kernel(1, 1, 2 * factor).expand(channels, 1, -1, -1))
    layer.weight.requires_grad_(trainable)
    return layer


def _grouped_fixed_upscore(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                           *args: object) -> None:
    """Load hook: a checkpoint written before the fixed layer was grouped holds its dense
    ``(K, K, k, k)`` weight; its diagonal is the grouped ``(K, 1, k, k)`` one."""
    key = prefix + "upscore.weight"
    weight = state_dict.get(key)
    if weight is not None and weight.dim() == 4 and weight.shape[1] > 1 and weight.shape[0] == weight.shape[1]:
        k = weight.shape[0]
        state_dict[key] = weight[torch.arange(k), torch.arange(k)].unsqueeze(1).contiguous()


class _VGGBackbone(nn.Module):
    """Small VGG-style backbone: 5 stages of (3x3 conv-BN-ReLU) x 2 + 2x2 max-pool.

    Stage channels are ``base, 2*base, 4*base, 8*base, 8*base`` (VGG-16: base 64).
    """

    def __init__(self, in_channels: int, base_channels: int) -> None:
        super().__init__()
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)]
        self.stage1 = DoubleConv(in_channels, widths[0])
        self.stage2 = DoubleConv(widths[0], widths[1])
        self.stage3 = DoubleConv(widths[1], widths[2])
        self.stage4 = DoubleConv(widths[2], widths[3])
        self.stage5 = DoubleConv(widths[3], widths[4])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.out_channels: tuple[int, int, int] = (widths[2], widths[3], widths[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``(N, C, H, W)`` to ``(pool3, pool4, pool5)`` at strides 8, 16, 32."""
        pool1 = self.pool(self.stage1(x))  # (N, b, H/2, W/2)
        pool2 = self.pool(self.stage2(pool1))  # (N, 2b, H/4, W/4)
        pool3 = self.pool(self.stage3(pool2))  # (N, 4b, H/8, W/8)
        pool4 = self.pool(self.stage4(pool3))  # (N, 8b, H/16, W/16)
        pool5 = self.pool(self.stage5(pool4))  # (N, 8b, H/32, W/32)
        return pool3, pool4, pool5


class _SmpBackbone(nn.Module):
    """A segmentation-models-pytorch encoder (no pretrained weights) as FCN backbone."""

    def __init__(self, name: str, in_channels: int, depth: int = 5) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.encoder = smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=None)
        channels = list(self.encoder.out_channels)
        self.out_channels: tuple[int, int, int] = (channels[-3], channels[-2], channels[-1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``(N, C, H, W)`` to the encoder's stride-8, 16 and 32 feature maps."""
        features = self.encoder(x)  # [x, stride 2, 4, 8, 16, 32]
        return features[-3], features[-2], features[-1]


class FCN(nn.Module):
    """FCN-32s / FCN-16s / FCN-8s semantic segmentation network.

    Args:
        in_channels: Channels of the input image.
        num_classes: Number of output logit channels.
        variant: ``"32s"`` (score -> x32), ``"16s"`` (score -> x2, + pool4 score ->
            x16) or ``"8s"`` (... -> x2, + pool3 score -> x8).
        backbone: ``"vgg"`` for the built-in small VGG-style stack, or the name of a
            segmentation-models-pytorch encoder (e.g. ``"resnet18"``, ``"mobilenet_v2"``,
            ``"tu-<timm model>"``) built without pretrained weights.
        base_channels: Width of the first VGG stage (stages: b, 2b, 4b, 8b, 8b); fc6/fc7
            have ``16 * base_channels`` channels for either backbone.
        encoder_depth: Encoder depth; FCN needs the stride-32 features, so only 5 is
            accepted (the argument exists so configs can share it with ``SmpModel``).

    Attributes:
        in_channels: As given.
        num_classes: As given.
        pad_multiple: 32; H and W must be multiples of it.
        output_stride: 32, 16 or 8, the stride of the last score map before the final
            upsampling.

    Raises:
        ValueError: If an argument is out of range, ``variant`` is unknown or
            ``backbone`` is neither ``"vgg"`` nor an smp encoder name.

    Example:
        >>> model = FCN(in_channels=3, num_classes=5, variant="8s", base_channels=8)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 5, 64, 64])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        variant: FCNVariant = "8s",
        backbone: str = "vgg",
        base_channels: int = 32,
        encoder_depth: int = 5,
    ) -> None:
        super().__init__()
        check_int("FCN in_channels", in_channels, 1)
        check_int("FCN num_classes", num_classes, 1)
        check_choice("FCN variant", variant, _VARIANTS)
        check_int("FCN base_channels", base_channels, 1)
        if isinstance(encoder_depth, bool) or encoder_depth != 5:
            raise ModelArgumentError(
                f"encoder_depth must be 5 for FCN (its 32s/16s/8s heads use the stride-32, 16 "
                f"and 8 features), got {encoder_depth!r}."
            )
        if not isinstance(backbone, str) or not backbone:
            raise ModelArgumentError(f"backbone must be 'vgg' or an smp encoder name, got {backbone!r}.")
        if backbone != "vgg":
            from .smp import check_encoder_name

            check_encoder_name(backbone, arg="backbone")

        #: The encoder starts from random weights (no pretrained option; see init_from).
        self.encoder_pretrained = False
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.variant = variant
        self.backbone_name = backbone
        self.pad_multiple = 32
        self.output_stride = _STRIDES[variant]

        self.backbone: nn.Module = (
            _VGGBackbone(in_channels, base_channels)
            if backbone == "vgg"
            else _SmpBackbone(backbone, in_channels, depth=encoder_depth)
        )
        pool3_channels, pool4_channels, pool5_channels = self.backbone.out_channels
        fc_channels = 16 * base_channels

        self.fc6 = nn.Sequential(
            nn.Conv2d(pool5_channels, fc_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout(_FC_DROPOUT),
        )
        self.fc7 = nn.Sequential(
            nn.Conv2d(fc_channels, fc_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Dropout(_FC_DROPOUT),
        )
        self.score_fr = nn.Conv2d(fc_channels, num_classes, kernel_size=1)
        if variant in ("16s", "8s"):
            self.upscore2 = _bilinear_upsample(num_classes, 2)
            self.score_pool4 = self._zero_conv(pool4_channels, num_classes)
        if variant == "8s":
            self.upscore_pool4 = _bilinear_upsample(num_classes, 2)
            self.score_pool3 = self._zero_conv(pool3_channels, num_classes)
        self.upscore = _bilinear_upsample(num_classes, self.output_stride, trainable=False)
        self._register_load_state_dict_pre_hook(_grouped_fixed_upscore, with_module=True)

    @staticmethod
    def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
        """1x1 score layer initialised to zero (as the FCN paper's skip score layers)."""
        layer = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """Compute per-pixel logits.

        Args:
            x: Float images, ``(N, in_channels, H, W)`` with H and W multiples of 32.

        Returns:
            Logits, ``(N, num_classes, H, W)``.

        Raises:
            ValueError: If H or W is not a multiple of 32 (the message names the padded
                size to use) or the channel count is wrong.
        """
        check_input(x, f"FCN(variant={self.variant!r})", self.in_channels, self.pad_multiple)

        pool3, pool4, pool5 = self.backbone(x)  # strides 8, 16, 32
        score = self.score_fr(self.fc7(self.fc6(pool5)))  # (N, K, H/32, W/32)
        if self.variant == "32s":
            return self.upscore(score)  # (N, K, H, W)

        score = self.upscore2(score) + self.score_pool4(pool4)  # (N, K, H/16, W/16)
        if self.variant == "16s":
            return self.upscore(score)

        score = self.upscore_pool4(score) + self.score_pool3(pool3)  # (N, K, H/8, W/8)
        return self.upscore(score)

    def encoder_modules(self) -> list[nn.Module]:
        """The backbone (VGG-style stack or smp encoder), for freezing and discriminative
        learning rates: ``[backbone]``; ``fc6``/``fc7``, the score layers and the upsampling
        are the head. See :class:`~segpipe.models.base.SegmentationModel`.
        """
        return [self.backbone]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"variant={self.variant!r}, backbone={self.backbone_name!r}"
        )
