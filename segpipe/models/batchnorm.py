"""Test-time re-estimation of BatchNorm statistics (AdaBN), blended with the training ones.

A network trained on some cameras, scanners or lighting and applied to others sees inputs
whose feature statistics differ from those its BatchNorm layers stored in training. AdaBN
(Li et al., 2016, "Revisiting Batch Normalization for Practical Domain Adaptation") estimates
them again on the unlabelled images to predict; blending the two (Schneider et al., 2020,
"Improving robustness against common corruptions by covariate shift adaptation") keeps most
of the gain on shifted images and loses nothing on images like the training ones. Only the
statistics change, no weight does, and no label is used.

Plain ``torch``: :class:`~segpipe.tasks.SegmentationTask` (``model.bn_adapt``, in ``segpipe
test``) and ``segpipe predict --bn_adapt`` call :func:`adapt_batchnorm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormAdaptError", "BatchNormAdaptation", "adapt_batchnorm", "batchnorm_layers",
           "check_bn_adapt"]


class BatchNormAdaptError(ValueError):
    """A ``bn_adapt`` weight outside [0, 1], or a network it cannot adapt (one line on the
    command line)."""


def check_bn_adapt(weight: float, option: str = "model.bn_adapt") -> float:
    """``weight`` as a float in [0, 1], else a :class:`BatchNormAdaptError` naming ``option``."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise BatchNormAdaptError(
            f"{option} is the weight of the new images' BatchNorm statistics, a number from 0 "
            f"(training statistics only: off) to 1 (theirs only, AdaBN); got {weight!r}. "
            "0.5 was level on images like the training ones and gained on shifted ones.")
    return value


def batchnorm_layers(net: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``net`` that keep running statistics."""
    return [m for m in net.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


class BatchNormAdaptation:
    """The outcome of :func:`adapt_batchnorm`: what was adapted, and the training statistics
    to put back with :meth:`restore`.

    Attributes:
        weight: Weight of the new images' statistics.
        num_layers: BatchNorm layers adapted.
        num_images: Images (or tiles) the statistics were estimated on.
    """

    def __init__(self, layers: list[_BatchNorm], saved: list[tuple[Tensor, ...]], weight: float,
                 num_images: int) -> None:
        self._layers = layers
        self._saved = saved
        self.weight = weight
        self.num_layers = len(layers)
        self.num_images = num_images

    def restore(self) -> None:
        """Put the training statistics back (idempotent)."""
        with torch.no_grad():
            for layer, (mean, var, count) in zip(self._layers, self._saved):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)
        self._layers, self._saved = [], []

    def describe(self, source: str = "input images") -> str:
        """One line for logs and reports."""
        w = self.weight
        return (f"{w:g} x the {source}' statistics + {1 - w:g} x training's, estimated on "
                f"{self.num_images} image(s) or tile(s) in {self.num_layers} BatchNorm layer(s)")


def adapt_batchnorm(
    net: nn.Module,
    batches: Iterable[Tensor],
    weight: float,
    forward: Callable[[Tensor], Any] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> BatchNormAdaptation:
    """Re-estimate the BatchNorm statistics of ``net`` on ``batches`` and blend them in.

    Every BatchNorm layer's running mean and variance become ``weight`` x those of the new
    images (the average over the batches of each batch's statistics, as training estimates
    them) + ``(1 - weight)`` x the training ones. Everything else runs in eval mode (dropout
    off), without gradients; the weights do not change.

    Args:
        net: The network whose BatchNorm layers are adapted.
        batches: (N, C, H, W) inputs of ``forward``, on its device.
        weight: In (0, 1]; 1 is AdaBN (the new statistics alone).
        forward: What runs a batch (default ``net``), e.g. a task that normalises and pads.
        reduce: A sum over distributed processes that each saw a share of the images
            (e.g. ``strategy.reduce(t, reduce_op="sum")``): the new statistics are then the
            mean over every process's batches, and the image count the total. Every process
            must call this function, also one without images.

    Returns:
        The adaptation; its :meth:`~BatchNormAdaptation.restore` undoes it.

    Raises:
        BatchNormAdaptError: ``weight`` outside (0, 1], a network without BatchNorm
            statistics, or no batch at all.
    """
    weight = check_bn_adapt(weight, "bn_adapt")
    if weight == 0.0:
        raise BatchNormAdaptError(
            "adapt_batchnorm needs a weight above 0 (0 keeps the training statistics)")
    layers = batchnorm_layers(net)
    if not layers:
        raise BatchNormAdaptError(
            "bn_adapt re-estimates BatchNorm statistics, but the network has no BatchNorm layer "
            "that keeps them (instance or group normalisation need none); drop the option.")
    forward = net if forward is None else forward
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    training = BatchNormAdaptation(layers, saved, weight, 0)  # restores them all on failure
    modes = [(m, m.training) for m in net.modules()]
    momenta = [m.momentum for m in layers]
    count = 0
    try:
        net.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x in batches:
                forward(x)
                count += int(x.shape[0])
    except BaseException as exc:
        training.restore()
        if isinstance(exc, ValueError) and "more than 1 value per channel" in str(exc):
            raise BatchNormAdaptError(
                f"bn_adapt: a BatchNorm layer got one value per channel ({exc}): a batch of "
                "one image reached a layer after global pooling (DeepLabV3's ASPP, PSPNet) or "
                "an image too small for the network's depth. Estimate on batches of 2 or more "
                "images of one size (predict: --batch_size 2 or more, with no size held by a "
                "single image; test: data.eval_resize gives every image one size), or drop "
                "bn_adapt") from exc
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    if reduce is not None:
        count = int(reduce(torch.tensor(float(count), device=layers[0].running_mean.device)).item())
    if count == 0:
        training.restore()
        raise BatchNormAdaptError("bn_adapt found no image to estimate BatchNorm statistics on")
    reached: list[tuple[_BatchNorm, tuple[Tensor, ...]]] = []
    unreached: list[tuple[_BatchNorm, tuple[Tensor, ...]]] = []
    with torch.no_grad():
        for m, stats in zip(layers, saved):
            mean, var, _ = stats
            new_mean, new_var = m.running_mean, m.running_var
            seen = m.num_batches_tracked.to(mean.dtype)  # batches that reached this layer
            if reduce is not None:  # weighted by each process's number of batches
                new_mean, new_var = reduce(new_mean * seen), reduce(new_var * seen)
                seen = reduce(seen.clone())
                new_mean, new_var = new_mean / seen.clamp(min=1), new_var / seen.clamp(min=1)
            if float(seen) == 0:  # a layer the forward pass never reached keeps its statistics
                unreached.append((m, stats))
                continue
            m.running_mean.copy_(torch.lerp(mean, new_mean.to(mean.dtype), weight))
            m.running_var.copy_(torch.lerp(var, new_var.to(var.dtype), weight))
            reached.append((m, stats))

    def adaptation(pairs: list[tuple[_BatchNorm, tuple[Tensor, ...]]]) -> BatchNormAdaptation:
        return BatchNormAdaptation([m for m, _ in pairs], [st for _, st in pairs], weight, count)

    adaptation(unreached).restore()
    return adaptation(reached)
