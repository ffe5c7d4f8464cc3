"""Batching: :class:`PadCollate` pads differently sized items and writes each batch once.

Batch format: ``{"image": float32 (N, C, H, W), "mask": int64 (N, H, W), "path": list[str]}``
(plus ``"weight": float32 (N, H, W)`` per-pixel loss weights when the data set adds them, and
``"size": int64 (N, 2)``, each mask's native size, when evaluation resizes the images only,
and ``"image_size": int64 (N, 2)``, each image's own size, when a batch pads images of
different sizes),
images laid out channels-last in memory (the format the task runs the network in). With the
data set's ``uint8_images`` the image batch is uint8 until the data module normalises it on the
device, and masks whose labels fit in 8 bits uint8 until it makes them int64 there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import default_collate

from segpipe.data.batchring import BatchRing, RingBatch, SlotArena

__all__ = ["PadCollate"]


def _batch_buffer(like: torch.Tensor, shape: tuple[int, ...], channels_last: bool,
                  arena: SlotArena | None = None) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker, in shared memory: in the slot
    ``arena`` when it has room (see :mod:`segpipe.data.batchring`), else a segment of its own.

    As ``default_collate`` does: a batch built in shared memory crosses to the main process
    without the extra copy that moving an ordinary tensor there costs. ``channels_last`` lays a
    4-D batch out as (N, H, W, C) in memory, the format the task runs the network in.
    """
    if arena is not None:
        tensor = arena.empty(like.dtype, shape, channels_last)
        if tensor is not None:
            return tensor
    numel = int(np.prod(shape))
    if get_worker_info() is not None:
        flat = like.new(like._typed_storage()._new_shared(numel, device=like.device))
    else:
        flat = like.new_empty(numel)
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def _pad_maps(maps: Sequence[torch.Tensor], size: tuple[int, int],
              fill: float | None, arena: SlotArena | None = None) -> torch.Tensor:
    """(H, W) maps (masks, pixel weights) as one (N, H, W) batch, the rest filled with ``fill``
    (None: the maps fill the batch, nothing to pad)."""
    dtypes = {m.dtype for m in maps}
    if len(dtypes) > 1:  # uint8 masks beside int64 ones (labels beyond 255 in some files)
        dtype = functools.reduce(torch.promote_types, dtypes)
        maps = [m.to(dtype) for m in maps]
    out = _batch_buffer(maps[0], (len(maps), *size), False, arena)
    if fill is not None:
        out.fill_(fill)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


class PadCollate:
    """Collate dicts of tensors, padding images (0) and masks (``ignore_index``) to the max size.

    ``path`` becomes a list of str. Each batch is written once, straight into its final buffer:
    shared memory when collating in a DataLoader worker, and for images the channels-last
    layout by default (the format the task runs the network in, so it needs no copy of its own).

    Args:
        ignore_index: Mask value for padding; when None, differently sized items with masks
            raise an error.
        hint: What to tell the user in that case.
        channels_last: Lay image batches out channels-last in memory (shape stays N, C, H, W).
        normalize_uint8: Normalises a uint8 (C, H, W) image (the data set's ``uint8_images``)
            when a batch mixes such images with float32 ones (8-bit files among converted or
            16-bit ones); without it such a batch is an error.
        ring: Slots of shared memory for the batches built in forked loader workers
            (:class:`~segpipe.data.batchring.BatchRing`): such a batch is then sent as a
            :class:`~segpipe.data.batchring.RingBatch`, which the loader turns back into this
            dict. None (default): every tensor crosses on its own.
    """

    def __init__(
        self,
        ignore_index: int | None,
        hint: str = "set data.ignore_index or data.eval_batch_size=1",
        channels_last: bool = True,
        normalize_uint8: Callable[[torch.Tensor], torch.Tensor] | None = None,
        ring: BatchRing | None = None,
    ) -> None:
        self.ignore_index = ignore_index
        self.hint = hint
        self.channels_last = channels_last
        self.normalize_uint8 = normalize_uint8
        self.ring = ring

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any] | RingBatch:
        slot = (self.ring.claim() if self.ring is not None and get_worker_info() is not None
                else None)
        if slot is None:
            return self._collate(batch, None)
        arena = SlotArena(self.ring, slot)
        try:
            return arena.batch(self._collate(batch, arena))
        except BaseException:
            arena.abandon()
            raise

    def _collate(self, batch: Sequence[Mapping[str, Any]],
                 arena: SlotArena | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = [b["image"] for b in batch]
        paths = [str(b.get("path", "")) for b in batch]
        if len({im.dtype for im in images}) > 1:
            if self.normalize_uint8 is None:
                raise ValueError(f"images in one batch have different dtypes ({', '.join(paths)})")
            images = [self.normalize_uint8(im) if im.dtype == torch.uint8 else im for im in images]
        channels = {int(im.shape[0]) for im in images}
        if len(channels) > 1:
            raise ValueError(
                f"images in one batch have different channel counts {sorted(channels)} "
                f"({', '.join(paths)}); set data.in_channels so all images are converted"
            )
        sizes = {tuple(im.shape[-2:]) for im in images}
        has_mask = "mask" in batch[0]
        # Masks have their images' size, except beside an evaluation resize ("size"): then
        # equal images may carry native masks of another size, and only masks of different
        # sizes among themselves need padding.
        mask_sizes = {tuple(b["mask"].shape[-2:]) for b in batch} if has_mask else sizes
        if (has_mask and self.ignore_index is None
                and (len(sizes) > 1 or len(mask_sizes) > 1)):
            raise ValueError(
                f"cannot batch images of different sizes "
                f"{sorted(sizes | mask_sizes)} ({', '.join(paths)})"
                f" without an ignore index to pad the masks; {self.hint}"
            )
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        img_out = _batch_buffer(images[0], (len(batch), images[0].shape[0], h, w),
                                self.channels_last, arena)
        if len(sizes) > 1:
            img_out.zero_()
            # The task runs each such image on its own (as predict does), not on the padding.
            out["image_size"] = torch.tensor([list(im.shape[-2:]) for im in images],
                                             dtype=torch.int64)
        for i, im in enumerate(images):
            img_out[i, :, : im.shape[1], : im.shape[2]] = im
        out["image"] = img_out
        if has_mask:
            mh, mw = max(s[0] for s in mask_sizes), max(s[1] for s in mask_sizes)
            out["mask"] = _pad_maps([b["mask"] for b in batch], (mh, mw),
                                    int(self.ignore_index) if len(mask_sizes) > 1 else None,
                                    arena)
        if "weight" in batch[0]:  # per-pixel loss weights (training: image-sized); padding 0
            out["weight"] = _pad_maps([b["weight"] for b in batch], (h, w),
                                      0 if len(sizes) > 1 else None, arena)
        out["path"] = paths
        for key in batch[0]:
            if key not in out:
                out[key] = default_collate([b[key] for b in batch])
        return out
