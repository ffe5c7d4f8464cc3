"""Lightning data module for the supported layouts.

The constructor takes plain types only, so LightningCLI / jsonargparse can build it from YAML,
and saves them with ``save_hyperparameters()`` (prediction reads them back from checkpoints).
Nothing touches the disk before :meth:`SegmentationDataModule.setup`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from segpipe.data.checks import DataCheckError, check_samples
from segpipe.data.datasets import (
    ItemKey,
    PredictDataset,
    Sample,
    Scan,
    SegmentationDataset,
    scan_camvid,
    scan_folder,
    scan_isbi,
    scan_lgg,
)
from segpipe.data.transforms import (
    build_eval_transform,
    build_train_transform,
    default_mean_std,
    seed_transform,
)

__all__ = [
    "LAYOUTS",
    "EpochSampler",
    "PadCollate",
    "ResumableDataLoader",
    "SegmentationDataModule",
    "UnrepeatedSampler",
    "default_class_colors",
    "default_cache_mb",
    "default_num_workers",
    "seed_worker",
]

log = logging.getLogger(__name__)

Layout = Literal["folder", "camvid", "lgg", "isbi"]
LAYOUTS: tuple[str, ...] = ("folder", "camvid", "lgg", "isbi")
_ISBI_DEFAULT_VAL = (20, 24)


def default_num_workers() -> int:
    """DataLoader workers for this machine: only CPUs that training leaves free, at most 4.

    With a GPU, ``cpu_count - 1`` (the main process feeds the GPU). Without one, training runs
    ``torch.get_num_threads()`` compute threads, by default one per core, so a worker process
    can only run by pre-empting one of them, and each pre-emption stalls the other threads at
    the next synchronisation: measured on a 2-core CPU (``scripts/bench_train.py``), one worker
    slowed U-Net training steps by about twice its own CPU time, while loading the same
    batches in the main process between steps cost only their CPU time. So on a CPU the
    default is ``cpu_count - torch.get_num_threads()`` (0 where training uses every core).

    Returns:
        Number of worker processes.
    """
    cpus = os.cpu_count() or 1
    free = cpus - 1 if torch.cuda.is_available() else cpus - torch.get_num_threads()
    return min(4, max(0, free))


def default_cache_mb(num_workers: int) -> float:
    """Decoded-sample cache per dataset and loading process: RAM / 8 over the workers, <= 1 GiB.

    Args:
        num_workers: DataLoader workers (each holds its own cache; 0 = the main process).

    Returns:
        MiB.
    """
    try:
        ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (AttributeError, ValueError, OSError):  # not POSIX
        ram_mb = 8192.0
    return float(min(1024.0, ram_mb / 8 / max(1, num_workers)))


def default_class_colors(num_classes: int) -> list[list[int]]:
    """A fixed, distinct palette (the Pascal VOC bit-interleaved colour map).

    Class 0 is black, class 1 dark red, class 2 green, ...; distinct for up to 256 classes.

    Args:
        num_classes: Number of colours.

    Returns:
        ``num_classes`` RGB triplets.
    """
    colors = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors


def seed_worker(worker_id: int, niceness: int = 0) -> None:
    """DataLoader ``worker_init_fn``: own augmentation random state, lower priority.

    Without reseeding every forked worker would start from the same albumentations generator
    state and produce the same augmentations. The seed is torch's per-worker seed, which follows
    ``lightning.seed_everything``. A positive ``niceness`` lowers the worker's scheduling
    priority, so that on a CPU-only machine loading fills the gaps between the training
    threads' work instead of pre-empting them. (OpenCV's thread count is deliberately not
    touched here: ``cv2.setNumThreads`` in a forked child can deadlock on a lock that a pool
    thread of the parent held at fork time.)

    Args:
        worker_id: Worker index (unused; the seed already includes it).
        niceness: Added to the worker process's nice value (POSIX only; 0 leaves it).
    """
    if niceness > 0 and hasattr(os, "nice"):
        os.nice(niceness)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


class EpochSampler(DistributedSampler):
    """Training order that is a function of ``(seed, epoch)`` only, sharded over ranks.

    Each epoch's permutation comes from a generator seeded with ``(seed, epoch)``, never from
    process-global random state, so a run resumed from a checkpoint sees the same order as
    the uninterrupted run. It yields :class:`~segpipe.data.datasets.ItemKey` ``(index, epoch)``
    so the dataset can seed each item's augmentation from ``(seed, epoch, index)``, also in
    persistent DataLoader workers.

    Like :class:`~torch.utils.data.DistributedSampler` (which it subclasses, so Lightning does
    not replace it under DDP), each of ``num_replicas`` ranks takes every ``num_replicas``-th
    index, and the permutation is padded by repeating indices so all ranks step equally often.
    Lightning calls :meth:`set_epoch` before each epoch.

    Args:
        dataset: The data set (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
        shuffle: Shuffle (else sequential order).
        seed: Seed of the permutations.
        drop_last: Drop the tail so that the data splits evenly, instead of padding.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last,
        )
        self._resume: tuple[int, int] | None = None
        #: Epoch and number of leading items skipped by the latest :meth:`__iter__`.
        self.iter_epoch = 0
        self.skipped = 0

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order (before any resume skip).

        Args:
            epoch: Epoch.

        Returns:
            ``len(self)`` indices.
        """
        n = len(self.dataset)
        if self.shuffle:
            seed = int(np.random.SeedSequence([int(self.seed), int(epoch)]).generate_state(1)[0])
            indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        elif self.total_size > n:
            padding = self.total_size - n
            indices += (indices * math.ceil(padding / max(1, n)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def resume(self, epoch: int, items: int) -> None:
        """Skip the first ``items`` indices of ``epoch`` the next time it is iterated.

        Called when training resumes from a mid-epoch checkpoint; ignored when the next
        iteration is of another epoch.

        Args:
            epoch: Epoch the checkpoint was saved in.
            items: Indices already consumed in that epoch.
        """
        self._resume = (int(epoch), max(0, int(items)))

    def __iter__(self) -> Iterator[ItemKey]:  # type: ignore[override]
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        self.iter_epoch, self.skipped = int(self.epoch), skip
        epoch = int(self.epoch)
        return iter([ItemKey(i, epoch) for i in self.permutation(epoch)[skip:]])


class UnrepeatedSampler(DistributedSampler):
    """Evaluation order: rank ``r`` of ``R`` takes indices ``r, r + R, r + 2R, ...``.

    Unlike :class:`~torch.utils.data.DistributedSampler` it never pads uneven splits with
    repeated samples, so every val/test image is counted exactly once across ranks (ranks may
    get one batch more or less; torchmetrics and ``self.log(sync_dist=True)`` reduce at epoch
    end, which handles that).

    Args:
        dataset: The data set (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:  # type: ignore[override]
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ResumableDataLoader(DataLoader):
    """DataLoader that knows its position in the epoch, so training can resume mid-epoch.

    Lightning saves the ``state_dict`` of a loader that has one in every checkpoint and, when
    it resumes from a checkpoint saved in the middle of an epoch, passes it back to
    :meth:`load_state_dict`; the :class:`EpochSampler` then skips the batches already trained
    on. The underlying iterator (and so the sampler's permutation) is created at the first
    batch, after Lightning has set the sampler's epoch: Lightning creates the iterator of a
    resumed run before it calls ``set_epoch``.

    Takes the arguments of :class:`~torch.utils.data.DataLoader`; ``sampler`` must be an
    :class:`EpochSampler` for :meth:`load_state_dict` to take effect.
    """

    _yielded = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = 0
        return _LazyIterator(self)

    def _base_iter(self) -> Iterator[Any]:
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """Position in the epoch: ``{"epoch", "batches"}`` (batches already yielded)."""
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return {"epoch": 0, "batches": 0}
        batch_size = max(1, int(self.batch_size or 1))
        return {"epoch": sampler.iter_epoch, "batches": sampler.skipped // batch_size + self._yielded}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        """Skip the batches that ``state_dict`` says were trained on when that epoch resumes.

        Args:
            state_dict: From :meth:`state_dict`.
        """
        if isinstance(self.sampler, EpochSampler):
            batch_size = max(1, int(self.batch_size or 1))
            self.sampler.resume(int(state_dict.get("epoch", 0)),
                                int(state_dict.get("batches", 0)) * batch_size)


class _LazyIterator:
    """Creates the DataLoader iterator at the first ``next`` and counts the batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._base_iter()
        batch = next(self.iterator)
        self.loader._yielded += 1
        return batch


def _batch_buffer(like: torch.Tensor, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker, in shared memory.

    As ``default_collate`` does: a batch built in shared memory crosses to the main process
    without the extra copy that moving an ordinary tensor there costs. ``channels_last`` lays a
    4-D batch out as (N, H, W, C) in memory, the format the task runs the network in.
    """
    numel = int(np.prod(shape))
    if get_worker_info() is not None:
        flat = like.new(like._typed_storage()._new_shared(numel, device=like.device))
    else:
        flat = like.new_empty(numel)
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


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
    """

    def __init__(
        self,
        ignore_index: int | None,
        hint: str = "set data.ignore_index or data.eval_batch_size=1",
        channels_last: bool = True,
    ) -> None:
        self.ignore_index = ignore_index
        self.hint = hint
        self.channels_last = channels_last

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = [b["image"] for b in batch]
        paths = [str(b.get("path", "")) for b in batch]
        channels = {int(im.shape[0]) for im in images}
        if len(channels) > 1:
            raise ValueError(
                f"images in one batch have different channel counts {sorted(channels)} "
                f"({', '.join(paths)}); set data.in_channels so all images are converted"
            )
        sizes = {tuple(im.shape[-2:]) for im in images}
        has_mask = "mask" in batch[0]
        if len(sizes) > 1 and has_mask and self.ignore_index is None:
            raise ValueError(
                f"cannot batch images of different sizes {sorted(sizes)} ({', '.join(paths)})"
                f" without an ignore index to pad the masks; {self.hint}"
            )
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        padded = len(sizes) > 1
        img_out = _batch_buffer(images[0], (len(batch), images[0].shape[0], h, w),
                                self.channels_last)
        if padded:
            img_out.zero_()
        for i, im in enumerate(images):
            img_out[i, :, : im.shape[1], : im.shape[2]] = im
        out["image"] = img_out
        if has_mask:
            masks = [b["mask"] for b in batch]
            mask_out = _batch_buffer(masks[0], (len(batch), h, w), False)
            if padded:
                mask_out.fill_(int(self.ignore_index))
            for i, m in enumerate(masks):
                mask_out[i, : m.shape[0], : m.shape[1]] = m
            out["mask"] = mask_out
        out["path"] = paths
        for key in batch[0]:
            if key not in out:
                out[key] = default_collate([b[key] for b in batch])
        return out


def _subset(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` evenly spaced samples (deterministic)."""
    if limit is None or len(samples) <= limit:
        return samples
    idx = np.linspace(0, len(samples) - 1, num=max(1, limit)).round().astype(int)
    return [samples[i] for i in sorted(set(idx.tolist()))][:limit]


class SegmentationDataModule(L.LightningDataModule):
    """Data module for semantic segmentation.

    Batches: ``{"image": float32 (N, C, H, W), "mask": int64 (N, H, W), "path": list[str]}``,
    images channels-last in memory (see :class:`PadCollate`). Training crops come from :func:`~segpipe.data.transforms.build_train_transform`; val/test
    images keep their native size (or ``eval_resize``) and are padded per batch to the largest
    item (image with 0, mask with ``ignore_index``).

    Args:
        root: Data root.
        layout: ``folder``, ``camvid``, ``lgg`` or ``isbi`` (see :mod:`segpipe.data.datasets`).
        num_classes: Number of classes.
        class_names: One name per class (default ``class_0, class_1, ...``).
        class_colors: One RGB colour per class (default :func:`default_class_colors`).
        ignore_index: Label of ignored pixels (e.g. CamVid void = 11), also used for padding.
        in_channels: Channels fed to the model (1 <-> 3 conversions are automatic).
        bands: 1-based band selection for multi-band images.
        mean: Per-channel mean of [0, 1]-scaled images (default ImageNet for 3 channels).
        std: Per-channel std.
        mask_values: Raw mask value -> class, e.g. ``{0: 0, 255: 1}``.
        mask_colors: Colour table for RGB colour-coded masks (i-th colour = class i).
        batch_size: Training batch size.
        eval_batch_size: Val/test/predict batch size (default ``batch_size``).
        num_workers: DataLoader workers (default :func:`default_num_workers`: CPUs that
            training leaves free, at most 4; 0 on a CPU whose cores all train).
        pin_memory: Pin host memory (default: when CUDA is available).
        persistent_workers: Keep workers between epochs (only when workers > 0).
        worker_niceness: Lower the workers' CPU priority by this much (default: 10 when no GPU
            is available, so loading does not pre-empt the CPU training threads; else 0).
        cache_mb: Memory (MiB) each train/val/test dataset may use per loading process to keep
            decoded images and checked masks, so epochs after the first skip decoding; 0
            disables. Default: an eighth of the machine's RAM shared by the workers, at most 1024.
        augment: Augmentation preset (``none``, ``light``, ``default``, ``strong``).
        crop_size: Square training crop size; None trains on whole images.
        scale: Random scale range for ``default``/``strong``.
        hflip: Random horizontal flips.
        vflip: Random vertical flips.
        rotate90: Random 90° rotations.
        color: Colour jitter.
        eval_resize: Optional ``[height, width]`` resize for val/test/predict.
        val_fraction: Fraction of train held out for val when the data has no val split
            (per patient for ``lgg``).
        val_slices: ``[start, stop)`` slices for val with ``isbi`` (default ``[20, 24]`` when
            there are at least 24 slices, else the last ``val_fraction`` of the slices).
        seed: Seed for held-out splits and augmentation.
        check_data: Run the pre-flight check in :meth:`setup`.
        limit_samples: Use at most this many (evenly spaced) samples per split.
    """

    def __init__(
        self,
        root: str,
        layout: Layout = "folder",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        class_colors: list[list[int]] | None = None,
        ignore_index: int | None = None,
        in_channels: int = 3,
        bands: list[int] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        mask_values: dict[int, int] | None = None,
        mask_colors: list[list[int]] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        worker_niceness: int | None = None,
        cache_mb: float | None = None,
        augment: Literal["none", "light", "default", "strong"] = "default",
        crop_size: int | None = None,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        vflip: bool = False,
        rotate90: bool = False,
        color: bool = True,
        eval_resize: list[int] | None = None,
        val_fraction: float = 0.1,
        val_slices: list[int] | None = None,
        seed: int = 0,
        check_data: bool = True,
        limit_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if num_classes < 1:
            raise ValueError(f"data.num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"data.in_channels must be >= 1, got {in_channels}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if limit_samples is not None and limit_samples < 1:
            raise ValueError(f"data.limit_samples must be >= 1 or null, got {limit_samples}")
        if eval_resize is not None and len(eval_resize) != 2:
            raise ValueError(f"data.eval_resize must be [height, width], got {eval_resize}")
        if val_slices is not None and len(val_slices) != 2:
            raise ValueError(f"data.val_slices must be [start, stop], got {val_slices}")

        self.root = root
        self.layout = layout
        self.num_classes = int(num_classes)
        self.class_names = (
            list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"data.class_names has {len(self.class_names)} names for "
                f"num_classes={num_classes}; give one name per class"
            )
        self.class_colors = (
            [list(map(int, c)) for c in class_colors]
            if class_colors
            else default_class_colors(self.num_classes)
        )
        if len(self.class_colors) != self.num_classes or any(
            len(c) != 3 for c in self.class_colors
        ):
            raise ValueError(
                f"data.class_colors must be {num_classes} RGB triplets, got {class_colors}"
            )
        self.ignore_index = ignore_index
        self.in_channels = int(in_channels)
        self.bands = list(bands) if bands is not None else None
        d_mean, d_std = default_mean_std(self.in_channels)
        self.mean = [float(v) for v in mean] if mean is not None else d_mean
        self.std = [float(v) for v in std] if std is not None else d_std
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"data.mean/data.std need {self.in_channels} values (one per input channel), "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        self.mask_values = {int(k): int(v) for k, v in mask_values.items()} if mask_values else None
        self.mask_colors = [list(map(int, c)) for c in mask_colors] if mask_colors else None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        if worker_niceness is None:
            worker_niceness = 0 if torch.cuda.is_available() else 10
        if not 0 <= worker_niceness <= 19:
            raise ValueError(f"data.worker_niceness must be in 0..19, got {worker_niceness}")
        self.worker_niceness = int(worker_niceness)
        if cache_mb is not None and cache_mb < 0:
            raise ValueError(f"data.cache_mb must be >= 0 (0 disables the cache), got {cache_mb}")
        self.cache_mb = default_cache_mb(self.num_workers) if cache_mb is None else float(cache_mb)

        self._scan: Scan | None = None
        self._splits: dict[str, list[Sample]] = {}
        self._checked: set[str] = set()
        self.datasets: dict[str, Any] = {}
        self.test_split: str = "test"

    # ---------------------------------------------------------------- scanning and splits
    def _run_scanner(self) -> Scan:
        hp = self.hparams
        root = Path(self.root).expanduser()
        if self.layout == "folder":
            return scan_folder(root)
        if self.layout == "camvid":
            return scan_camvid(root)
        if self.layout == "lgg":
            return scan_lgg(root, val_fraction=hp.val_fraction, seed=hp.seed)
        # isbi
        if hp.val_slices is not None:
            return scan_isbi(root, val_slices=(int(hp.val_slices[0]), int(hp.val_slices[1])))
        scan = scan_isbi(root, val_slices=None)
        if "val" not in scan:
            n = len(scan["train"])
            if n >= _ISBI_DEFAULT_VAL[1]:
                return scan_isbi(root, val_slices=_ISBI_DEFAULT_VAL)
            n_val = max(1, round(hp.val_fraction * n)) if hp.val_fraction > 0 and n > 1 else 0
            if n_val:
                return scan_isbi(root, val_slices=(n - n_val, n))
        return scan

    def scan(self) -> Scan:
        """Scan the layout once (cached) and derive the splits.

        Returns:
            The raw :class:`~segpipe.data.datasets.Scan` of the data root.

        Raises:
            FileNotFoundError: When the root or the layout's folders are missing.
        """
        if self._scan is not None:
            return self._scan
        scan = self._run_scanner()
        splits: dict[str, list[Sample]] = {k: list(v) for k, v in scan.items()}
        if "val" not in splits and "train" in splits and splits["train"]:
            train = splits["train"]
            hp = self.hparams
            if hp.val_fraction > 0 and len(train) > 1:
                rng = np.random.default_rng(hp.seed)
                n_val = min(len(train) - 1, max(1, round(hp.val_fraction * len(train))))
                val_idx = set(rng.permutation(len(train))[:n_val].tolist())
                splits["val"] = [s for i, s in enumerate(train) if i in val_idx]
                splits["train"] = [s for i, s in enumerate(train) if i not in val_idx]
                log.info(
                    "no val split in %s: holding out %d of %d train samples (seed %d)",
                    self.root, n_val, len(train), hp.seed,
                )
                if "train" in scan.folders:
                    scan.folders.setdefault("val", scan.folders["train"])
        limit = self.hparams.limit_samples
        self._splits = {k: _subset(v, limit) for k, v in splits.items()}
        self._scan = scan
        return scan

    @property
    def splits(self) -> dict[str, list[Sample]]:
        """Samples per split after held-out splitting and ``limit_samples`` (after setup)."""
        self.scan()
        return self._splits

    def _splits_for(self, stage: str | None) -> list[str]:
        self.scan()
        self.test_split = "test" if "test" in self._splits else "val"
        if stage == "fit":
            return ["train", "val"]
        if stage == "validate":
            return ["val"]
        if stage in ("test", "predict"):
            return [self.test_split]
        return [s for s in ("train", "val", "test") if s in self._splits] or ["train"]

    def _require_split(self, split: str) -> list[Sample]:
        scan = self.scan()
        if split not in self._splits:
            hint = {
                "val": "add a val split or set data.val_fraction > 0",
                "train": "add the training data",
            }.get(split, "add the split")
            raise ValueError(
                f"{self.root}: the {self.layout!r} layout has no {split!r} split; {hint}"
            )
        samples = self._splits[split]
        if not samples:
            folder = scan.folders.get(split, Path(self.root))
            raise ValueError(
                f"{folder}: the {split!r} split has no samples; put images there "
                f"(extensions: .png .jpg .jpeg .webp .bmp .tif .tiff .gif)"
            )
        return samples

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Scan, split, check (when ``check_data``) and build the datasets a stage needs.

        Lightning stages map to splits: ``fit`` -> train + val, ``validate`` -> val,
        ``test`` -> test (val, with a logged warning, when there is no test split),
        ``predict`` -> like test, images only.

        Args:
            stage: Lightning stage or None for all splits.

        Raises:
            FileNotFoundError: Missing data root or layout folders.
            ValueError: Empty or missing splits.
            DataCheckError: Problems found by the pre-flight check, all listed in one error.
        """
        names = self._splits_for(stage)
        if stage in ("test", "predict") and self.test_split != "test":
            log.warning("%s has no test split; using the val split for %s", self.root, stage)
        used = {name: self._require_split(name) for name in names}
        if stage == "predict":
            return  # images only: predict_dataloader builds a PredictDataset, masks not needed
        if self.hparams.check_data:
            todo = {k: v for k, v in used.items() if k not in self._checked}
            if todo:
                scan = self.scan()
                problems = check_samples(
                    todo,
                    num_classes=self.num_classes,
                    ignore_index=self.ignore_index,
                    mask_values=self.mask_values,
                    mask_colors=self.mask_colors,
                    orphans={k: v for k, v in scan.orphans.items() if k in todo},
                    duplicates={k: v for k, v in scan.duplicates.items() if k in todo},
                    # Decode every image once: truncations behind an intact header are caught
                    # here, before training, rather than when the loader reaches the file.
                    decode_images=True,
                )
                if problems:
                    raise DataCheckError(problems)
                self._checked.update(todo)
        for name, samples in used.items():
            if name not in self.datasets:
                self.datasets[name] = self._make_dataset(name, samples)

    def _make_dataset(self, split: str, samples: list[Sample]) -> SegmentationDataset:
        hp = self.hparams
        if split == "train":
            transform = build_train_transform(
                preset=hp.augment,
                crop_size=hp.crop_size,
                scale=tuple(hp.scale),
                hflip=hp.hflip,
                vflip=hp.vflip,
                rotate90=hp.rotate90,
                color=hp.color,
                mask_fill=self.ignore_index if self.ignore_index is not None else 0,
            )
            seed_transform(transform, int(hp.seed))
        else:
            transform = build_eval_transform(
                tuple(hp.eval_resize) if hp.eval_resize is not None else None
            )
        return SegmentationDataset(
            samples,
            transform=transform,
            mean=self.mean,
            std=self.std,
            bands=self.bands,
            mask_values=self.mask_values,
            mask_colors=self.mask_colors,
            ignore_index=self.ignore_index,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            seed=int(hp.seed) if split == "train" else None,
            cache_mb=self.cache_mb,
        )

    def build_predict_dataset(self, images: Sequence[str | Path]) -> PredictDataset:
        """A :class:`~segpipe.data.datasets.PredictDataset` with this module's preprocessing.

        Args:
            images: Image files.

        Returns:
            Dataset of ``{"image", "path", "size"}`` items.
        """
        hp = self.hparams
        return PredictDataset(
            images,
            transform=build_eval_transform(
                tuple(hp.eval_resize) if hp.eval_resize is not None else None
            ),
            mean=self.mean,
            std=self.std,
            bands=self.bands,
            in_channels=self.in_channels,
        )

    def _dataset(self, split: str) -> Any:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        return self.datasets[split]

    def _replicas(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer; ``(1, 0)`` without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return max(1, int(trainer.world_size)), int(trainer.global_rank)

    def _loader(self, dataset: Any, *, train: bool, sampled: bool = True) -> DataLoader:
        """A DataLoader over ``dataset``.

        Training: an :class:`EpochSampler` (order from ``(seed, epoch)``, sharded over ranks) in
        a :class:`ResumableDataLoader`. Val/test: an :class:`UnrepeatedSampler` (each image on
        exactly one rank). ``sampled=False`` (prediction) keeps a plain sequential loader, which
        Lightning shards itself. Every loader has its own ``generator``, so creating iterators
        never draws from the global torch RNG (which would make resumed runs diverge).
        """
        hint = (
            "set data.crop_size so training crops share one size"
            if train
            else "set data.ignore_index or data.eval_batch_size=1"
        )
        bs = self.batch_size if train else self.eval_batch_size
        common: dict[str, Any] = {
            "batch_size": bs,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "collate_fn": PadCollate(self.ignore_index, hint=hint),
            "worker_init_fn": (
                functools.partial(seed_worker, niceness=self.worker_niceness)
                if self.num_workers > 0 else None
            ),
        }
        if not sampled:
            return DataLoader(dataset, shuffle=False, **common)
        world, rank = self._replicas()
        generator = torch.Generator().manual_seed(int(self.hparams.seed))
        if train:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                   seed=int(self.hparams.seed))
            return ResumableDataLoader(
                dataset, sampler=sampler, drop_last=len(sampler) > bs, generator=generator,
                **common,
            )
        sampler = UnrepeatedSampler(dataset, num_replicas=world, rank=rank)
        return DataLoader(dataset, sampler=sampler, drop_last=False, generator=generator, **common)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (``drop_last`` when there is more than one batch).

        The order and the augmentation are functions of ``(data.seed, epoch, index)``, so a
        resumed run (also from a mid-epoch checkpoint) trains on exactly the batches the
        uninterrupted run would have.
        """
        return self._loader(self._dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches at native size (padded per batch)."""
        return self._loader(self._dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (val when the data has no test split)."""
        self._splits_for("test")
        return self._loader(self._dataset(self.test_split), train=False)

    def predict_dataloader(self) -> DataLoader:
        """Images of the test split (or val) without masks: ``image``, ``path``, ``size``."""
        self._splits_for("predict")
        samples = self._require_split(self.test_split)
        return self._loader(
            self.build_predict_dataset([s.image for s in samples]), train=False, sampled=False
        )
