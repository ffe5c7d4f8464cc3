"""Segmentation models: plain ``torch.nn`` modules mapping ``(N, C, H, W)`` images to
``(N, num_classes, H, W)`` logits.

Every model exposes ``in_channels``, ``num_classes`` and ``pad_multiple`` (H and W of
the input must be multiples of it; pad first, then crop the logits back).

:class:`SmpModel` and :func:`load_encoder_weights` (segmentation_models_pytorch and timm, about
0.2 s to import beside Lightning, 1.5 s beside torch alone) are imported on first use, so code
that only needs :class:`UNet` or :class:`FCN` does not load them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import ModelArgumentError, SegmentationModel
from .fcn import FCN
from .input_norm import PerImageStandardize
from .unet import UNet

if TYPE_CHECKING:
    from .smp import SmpModel, load_encoder_weights

__all__ = [
    "UNet", "FCN", "SmpModel", "SegmentationModel", "PerImageStandardize", "load_encoder_weights",
    "ModelArgumentError",
]

_LAZY = {"SmpModel": ".smp", "load_encoder_weights": ".smp"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
