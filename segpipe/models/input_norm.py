"""Per-image standardisation of a network's input (``model.input_norm: per_image``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import check_choice

__all__ = ["INPUT_NORMS", "PerImageStandardize", "input_norm_module"]

#: Values of ``model.input_norm``.
INPUT_NORMS = ("none", "per_image")


class PerImageStandardize(nn.Module):
    """Standardise each image's channels to zero mean and unit variance over its pixels.

    For inputs whose intensity scale differs from image to image (MRI from different
    scanners, rasters from different sensors or dates): a data set's mean and std cannot undo
    an image that is twice as dark as the others, this does. It is applied after the data
    set's normalisation, which it makes irrelevant (a per-channel affine map is undone by the
    standardisation). Statistics are those of the input as the network sees it: each training
    crop, each whole image in evaluation, each tile when prediction is tiled, background
    included: for scans with a black surround whose extent varies (brain MRI slices) the
    statistics follow the extent (on LGG it did worse than ``data.channel_gain``, see the
    README). Computed in float32; a constant channel becomes 0.

    Args:
        eps: Added to the variance.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W), each (image, channel) plane standardised."""
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
        return ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def input_norm_module(name: str) -> nn.Module:
    """The module of ``model.input_norm`` ``name``: the task's and the ONNX stand-in's.

    Raises:
        ValueError: For a name not in :data:`INPUT_NORMS`.
    """
    check_choice("model.input_norm", name, INPUT_NORMS)
    return PerImageStandardize() if name == "per_image" else nn.Identity()
