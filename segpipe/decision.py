"""From class scores to labels: the arg-max, or for two-class models a threshold.

A two-class model (background and one foreground class, as the LGG tumour masks) labels a pixel
foreground where the foreground's probability exceeds 0.5, which is the arg-max. Models trained
on scarce foreground are often better served by a lower threshold: on LGG, across five folds of
held-out patients, p(tumour) > 0.35 raised the mean tumour Dice over patients by 0.4 point
(chosen on four folds and scored on the fifth; README, "Five folds by patient"). The threshold
is the task's ``model.positive_threshold``: validation, ``segpipe test``, ``segpipe predict``
(which reads it from the checkpoint), :class:`~segpipe.predict.api.Segmenter` and ONNX exports
all label with it, so the masks written are those scored.

This module imports torch alone, so prediction from an ONNX export does not load Lightning.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_positive_threshold", "decide", "decision_description"]


def check_positive_threshold(
    value: Any, num_classes: int | None = None, name: str = "model.positive_threshold"
) -> float | None:
    """``value`` as a foreground probability threshold, or None (the arg-max).

    Args:
        value: None, or a number strictly between 0 and 1.
        num_classes: The model's classes: a threshold needs exactly 2; None: not checked.
        name: The option's name, for messages.

    Raises:
        ValueError: Not a number in (0, 1), or a model that does not have two classes.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 < value < 1):
        raise ValueError(
            f"{name} is the probability of class 1 above which a pixel is labelled 1, a number "
            f"strictly between 0 and 1 (0.5 is the arg-max), got {value!r}")
    if num_classes is not None and num_classes != 2:
        raise ValueError(
            f"{name} applies to two-class models (background and one foreground class); this "
            f"model has {num_classes} classes, whose labels are the arg-max: leave {name} unset")
    return float(value)


def decide(scores: Tensor, positive_threshold: float | None = None, dim: int = 1) -> Tensor:
    """Labels of class scores.

    Args:
        scores: Scores with classes along ``dim``, e.g. (N, K, H, W). Without a threshold,
            logits or probabilities alike. With one, probabilities (K = 2), or any positive
            multiple of them per pixel, such as the weighted sums a sliding window blends
            (class 1 where ``p1 > t * (p0 + p1)``).
        positive_threshold: The probability of class 1 above which a pixel is class 1
            (:func:`check_positive_threshold`); None: the arg-max.
        dim: The class dimension.

    Returns:
        int64 labels, ``scores``' shape without ``dim``. At 0.5 they equal the arg-max
        (ties go to class 0 in both).
    """
    if positive_threshold is None:
        return scores.argmax(dim=dim)
    if scores.shape[dim] != 2:
        raise ValueError(f"a positive threshold needs scores of 2 classes, got {scores.shape[dim]} "
                         f"along dim {dim} (shape {tuple(scores.shape)})")
    p0, p1 = scores.float().unbind(dim)
    return (p1 > positive_threshold * (p0 + p1)).to(torch.int64)


def decision_description(positive_threshold: float | None,
                         class_names: list[str] | None = None) -> str:
    """How labels were decided, for ``test_metrics.json``, reports and predictions' records."""
    if positive_threshold is None:
        return "arg-max of the class scores"  # (segpipe test records only thresholds)
    name = class_names[1] if class_names and len(class_names) > 1 else "class 1"
    return (f"{name} (class 1) where its probability > {positive_threshold:g}, else class 0 "
            "(model.positive_threshold)")
