"""The model side of prediction, shared by ``segpipe predict`` and
:class:`~segpipe.predict.api.Segmenter`.

:class:`ProbabilityFn` (class probabilities, with TTA over the training symmetries),
:func:`batch_scores` (whole images or a Gaussian-blended sliding window) and
:func:`score_batch` (images of one size stacked, scored, and read back per image at each
image's own size with its labels) are the one inference path; this module does not import
Lightning, so a :class:`~segpipe.predict.api.Segmenter` built from an ONNX export never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segpipe.decision import decide
from segpipe.predict.tiling import predict_tiled

if TYPE_CHECKING:
    from segpipe.tasks import SegmentationTask

__all__ = ["ProbabilityFn", "ScoredBatch", "batch_scores", "score_batch", "to_size"]


class ProbabilityFn:
    """Class probabilities of a batch, with optional test-time augmentation.

    TTA averages over the symmetries the model was trained with (:mod:`segpipe.tta`), read
    from its data spec; when the checkpoint does not record them, horizontal flips only (the
    one symmetry nearly every training pipeline uses), with a warning. Multi-scale inference
    (``scales``) also averages over input sizes, each view resized from the image given
    (:func:`segpipe.tta.multiscale_probabilities`): give it images at their native size.

    Args:
        task: The segmentation task (pads to its network's multiple and crops back).
        tta: Average over the training symmetries.
        symmetries: Those symmetries (``hflip``, ``vflip``, ``rot90``); None: not known.
        scales: Factors of the evaluation size to average over
            (:func:`segpipe.tta.check_scales`); None: the size given alone.
    """

    def __init__(
        self, task: SegmentationTask, tta: bool = False, symmetries: Sequence[str] | None = None,
        scales: Sequence[float] | None = None,
    ) -> None:
        from segpipe.tta import check_scales, model_views

        self.task = task
        self.tta = tta
        self.views = model_views(symmetries) if tta else [(0, ())]
        self.scales = check_scales(scales)

    @property
    def averages(self) -> bool:
        """Whether predictions average several views (TTA or scales): probabilities, not
        logits."""
        return self.tta or self.scales is not None

    def __call__(self, x: Tensor, base_size: Sequence[int] | None = None) -> Tensor:
        """(N, C, H, W) normalised images -> float32 (N, K, H, W) probabilities.

        Args:
            x: The batch.
            base_size: The size ``scales`` are factors of (``data.eval_resize`` for native
                images); None: ``x``'s own size (tiles, images predicted at their size).
        """
        from segpipe.tta import multiscale_probabilities, tta_probabilities

        if self.scales is None:
            return tta_probabilities(self.task, x, self.views)
        return multiscale_probabilities(self.task, x, self.views, self.scales, base_size)


def batch_scores(
    x: Tensor,
    task: Any,
    prob_fn: ProbabilityFn,
    *,
    num_classes: int,
    tile: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    probs: bool = False,
    on_tiles: Any = None,
    base_size: Sequence[int] | None = None,
) -> Tensor:
    """Class scores of a stacked batch: the one inference path of ``segpipe predict`` and of
    :class:`~segpipe.predict.api.Segmenter`.

    Args:
        x: (N, C, H, W) normalised images on the device to compute on.
        task: The task (or ONNX stand-in): (N, C, H, W) -> (N, K, H, W) logits, any size.
        prob_fn: Probabilities with the chosen TTA.
        num_classes: K.
        tile: Sliding-window tile size; images larger than it are predicted tile by tile
            (Gaussian-blended), one image at a time.
        overlap: Tile overlap fraction.
        batch_size: Tiles per forward pass.
        probs: Return probabilities even where logits would do (for their values).
        on_tiles: Progress callback taking a number of finished tiles.
        base_size: For whole images with ``prob_fn.scales``: the size the scales are factors
            of (``data.eval_resize`` when ``x`` holds native images); tiles are scaled from
            their own size.

    Returns:
        (N, K, H, W) float scores: probabilities when tiled, with TTA or scales or with
        ``probs``, else logits (same arg-max, no softmax needed).
    """
    h, w = x.shape[-2:]
    if tile is not None and (h > tile or w > tile):
        return torch.stack([
            predict_tiled(img, prob_fn, num_classes, tile, overlap, batch_size, on_tiles=on_tiles)
            for img in x
        ])
    if probs or prob_fn.averages:
        return prob_fn(x, base_size)
    return task(x)


def to_size(scores: Tensor, size: Sequence[int]) -> Tensor:
    """(K, h, w) scores resized (bilinear) to ``size`` = (H, W), e.g. back from ``eval_resize``."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores[None].float(), size=tuple(int(v) for v in size), mode="bilinear",
                         align_corners=False)[0]


class ScoredBatch:
    """A batch's class scores, read back per image at each image's own size.

    Made by :func:`score_batch`. Images resized for the network (``data.eval_resize``) get
    their probabilities resized back and are labelled at their own size, one at a time; images
    the network saw at their own size are labelled in one batched call on first use.

    Attributes:
        x: (N, C, H, W) the stacked, normalised images on the device (channels-last memory).
        scores: (N, K, H, W) scores at the network's size (see :func:`batch_scores`).
        sizes: Each image's own (H, W).
        resized: Whether any size differs from the network's (then ``scores`` are
            probabilities).
    """

    def __init__(self, x: Tensor, scores: Tensor, sizes: Sequence[tuple[int, int]],
                 resized: bool, threshold: float | None) -> None:
        self.x, self.scores, self.sizes = x, scores, list(sizes)
        self.resized, self.threshold = resized, threshold
        self._labels: Tensor | None = None

    def image(self, j: int, labels: bool = True) -> tuple[Tensor, Tensor | None]:
        """Image ``j``'s (K, H, W) scores at its own size and (H, W) labels (None unless asked)."""
        if self.resized:
            p = to_size(self.scores[j], self.sizes[j])
            return p, decide(p, self.threshold, dim=0) if labels else None
        if labels and self._labels is None:
            self._labels = decide(self.scores, self.threshold)  # batched: faster than per image
        return self.scores[j], self._labels[j] if labels else None


def score_batch(
    images: Sequence[Tensor],
    sizes: Sequence[Sequence[int] | Tensor],
    device: torch.device,
    task: Any,
    prob_fn: ProbabilityFn,
    *,
    num_classes: int,
    threshold: float | None = None,
    probs: bool = False,
    **kwargs: Any,
) -> ScoredBatch:
    """Stack images of one size, score them with :func:`batch_scores` and read them back.

    Args:
        images: (C, H, W) normalised images of one size, as the network takes them.
        sizes: Each image's own (H, W) (its size before ``data.eval_resize``), as ints or as a
            dataset record's ``size`` tensor.
        device: Where to compute.
        task: The task (or ONNX stand-in), as for :func:`batch_scores`.
        prob_fn: Probabilities with the chosen TTA.
        num_classes: K.
        threshold: :func:`segpipe.decision.decide`'s positive threshold; None: the arg-max.
        probs: Scores as probabilities even where logits would label the same (for their
            values); they are probabilities anyway where images were resized or thresholded.
        **kwargs: ``tile``, ``overlap``, ``batch_size``, ``on_tiles``, ``base_size`` of
            :func:`batch_scores`.

    Returns:
        The batch, its scores, and each image's scores and labels on request.
    """
    # (N, H, W, C) memory = channels-last NCHW: no layout conversion before the network
    x = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    x = x.to(device)
    sizes = [(int(size[0]), int(size[1])) for size in sizes]
    resized = any(size != tuple(x.shape[-2:]) for size in sizes)
    scores = batch_scores(x, task, prob_fn, num_classes=num_classes,
                          probs=probs or resized or threshold is not None, **kwargs)
    return ScoredBatch(x, scores, sizes, resized, threshold)
