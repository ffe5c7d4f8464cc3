"""Losses that segmentation_models_pytorch has, rewritten where its version costs a training run.

:class:`LovaszSoftmaxLoss` is the Lovász-softmax of Berman et al. (2018) over the classes present
in a batch, the loss smp's ``LovaszLoss(mode="multiclass")`` computes, to float rounding. smp's
version loops over the classes in Python: one 1-D sort each (one core each on a CPU), one
host synchronisation each to skip absent classes (``fg.sum() == 0``) and one more to drop the
ignored pixels (boolean indexing). This one sorts all classes in one batched ``torch.sort`` (one
row per class, so a CPU's cores share them), keeps the ignored pixels in place with zero error
(they sort last and add nothing) and averages over present classes with a mask, so a step costs
no host synchronisation. Measured by ``scripts/bench_losses.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LovaszSoftmaxLoss", "lovasz_softmax"]

#: At most this many (class, pixel) elements are sorted at once; more classes are taken in
#: several sorts, so memory stays bounded for large batches (each element holds about 40 bytes
#: of working tensors: the errors, their sorted copy, the permutation and the cumulative sums).
MAX_SORT_ELEMENTS = 1 << 23


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int | None = None,
                   max_sort_elements: int = MAX_SORT_ELEMENTS) -> Tensor:
    """Lovász-softmax loss over the classes present in the batch.

    Args:
        logits: Class scores, float (N, C, H, W) (any float dtype; computed in float32).
        target: Labels, int64 (N, H, W), in ``[0, C)`` or ``ignore_index``.
        ignore_index: Label whose pixels add nothing, or None.
        max_sort_elements: Largest number of (class, pixel) elements in one sort.

    Returns:
        The mean over the classes present among the non-ignored pixels of each class's Lovász
        extension of its Jaccard loss, a float32 scalar; 0 (with zero gradient) when every pixel
        is ignored.
    """
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"lovasz_softmax takes logits (N, C, ...) and a target (N, ...) of the "
                         f"same size; got {tuple(logits.shape)} and {tuple(target.shape)}")
    classes = logits.shape[1]
    probas = logits.float().softmax(dim=1).movedim(1, 0).reshape(classes, -1)  # (C, P)
    labels = target.reshape(-1)
    pixels = labels.numel()
    valid = None if ignore_index is None else (labels != ignore_index).unsqueeze(0)  # (1, P)
    per_sort = max(1, max_sort_elements // max(1, pixels))
    total = probas.new_zeros(())
    present_count = probas.new_zeros(())
    for first in range(0, classes, per_sort):
        ids = torch.arange(first, min(first + per_sort, classes), device=labels.device)
        fg = labels.unsqueeze(0) == ids.unsqueeze(1)  # (k, P)
        if valid is not None:
            fg &= valid
        fg = fg.to(probas.dtype)
        errors = (fg - probas[first:first + len(ids)]).abs()
        if valid is not None:
            errors = errors * valid  # ignored pixels: zero error, sorted last, adding nothing
        errors_sorted, order = torch.sort(errors, dim=1, descending=True)
        fg_sorted = fg.gather(1, order)
        fg_total = fg.sum(dim=1, keepdim=True)  # (k, 1)
        intersection = fg_total - fg_sorted.cumsum(dim=1)
        union = fg_total + (1.0 - fg_sorted).cumsum(dim=1)  # >= 1 from the first element on
        jaccard = 1.0 - intersection / union
        grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
        present = (fg_total.squeeze(1) > 0).to(probas.dtype)
        total = total + ((errors_sorted * grad).sum(dim=1) * present).sum()
        present_count = present_count + present.sum()
    return total / present_count.clamp(min=1.0)


class LovaszSoftmaxLoss(nn.Module):
    """:func:`lovasz_softmax` as a module: ``loss(logits (N, C, H, W), target (N, H, W))``.

    Args:
        ignore_index: Label whose pixels add nothing, or None.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of ``logits`` (N, C, H, W) against ``target`` (N, H, W); a scalar."""
        return lovasz_softmax(logits, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
