"""Lightning tasks: losses, metrics and optimisation around plain networks.

:class:`SegmentationTask` and :func:`pad_to_multiple` are imported on first use (their module
loads Lightning and segmentation_models_pytorch), so ``import segpipe.tasks.schedules`` and
similar stay as cheap as their own imports. :mod:`segpipe.tasks.inference` holds the task's
forward pass and :class:`~segpipe.tasks.inference.InferenceNet`, what prediction rebuilds from
a checkpoint without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segpipe.tasks.segmentation import SegmentationTask, pad_to_multiple

__all__ = ["SegmentationTask", "pad_to_multiple"]

_LAZY = {"SegmentationTask": "segpipe.tasks.segmentation",
         "pad_to_multiple": "segpipe.tasks.segmentation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
