"""Segmentation models: plain ``torch.nn`` modules mapping ``(N, C, H, W)`` images to
``(N, num_classes, H, W)`` logits.

Every model exposes ``in_channels``, ``num_classes`` and ``pad_multiple`` (H and W of
the input must be multiples of it; pad first, then crop the logits back).
"""

from .base import SegmentationModel
from .fcn import FCN
from .smp import SmpModel, load_encoder_weights
from .unet import UNet

__all__ = ["UNet", "FCN", "SmpModel", "SegmentationModel", "load_encoder_weights"]
