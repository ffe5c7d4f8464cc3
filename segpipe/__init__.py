"""segpipe: semantic segmentation from a folder of images and masks to a trained model,
honest metrics and exported masks.

``from segpipe import Segmenter`` is the Python API for trained models
(:class:`segpipe.predict.api.Segmenter`); it is imported on first use, so ``import segpipe``
stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from segpipe.predict.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
