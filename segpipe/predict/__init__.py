"""Prediction from a checkpoint alone: ``segpipe predict`` and its building blocks.

* :mod:`segpipe.predict.checkpoint`: :func:`load_predictor` rebuilds the trained network (an
  :class:`~segpipe.tasks.inference.InferenceNet`, without Lightning) and its
  preprocessing/palette (:class:`PredictConfig`) from a checkpoint.
* :mod:`segpipe.predict.tiling`: Gaussian-blended sliding-window inference in blocks.
* :mod:`segpipe.predict.writers`: the output formats and the atomic writer.
* :mod:`segpipe.predict.scoring`: the model side (probabilities, TTA, tiling), without Lightning.
* :mod:`segpipe.predict.engine`: dataset, module, writing callback and the in-process loop.
* :mod:`segpipe.predict.distributed`: the same under a Lightning ``Trainer``, for several
  devices or processes (the only module here that imports Lightning).
* :mod:`segpipe.predict.command`: the command line and :func:`predict`.
* :mod:`segpipe.predict.api`: :class:`Segmenter`, the same prediction from Python.

Submodules are imported lazily so ``import segpipe.predict`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CheckpointError",
    "PredictConfig",
    "PredictSummary",
    "PredictionWriter",
    "Segmenter",
    "load_predictor",
    "predict",
    "predict_tiled",
    "save_predict_checkpoint",
    "sliding_window_blocks",
]

_WHERE = {
    "CheckpointError": "segpipe.predict.checkpoint",
    "PredictConfig": "segpipe.predict.checkpoint",
    "load_predictor": "segpipe.predict.checkpoint",
    "save_predict_checkpoint": "segpipe.predict.checkpoint",
    "PredictSummary": "segpipe.predict.engine",
    "PredictionWriter": "segpipe.predict.writers",
    "Segmenter": "segpipe.predict.api",
    "predict": "segpipe.predict.command",
    "predict_tiled": "segpipe.predict.tiling",
    "sliding_window_blocks": "segpipe.predict.tiling",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'segpipe.predict' has no attribute {name!r}")
