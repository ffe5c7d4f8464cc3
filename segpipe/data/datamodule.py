"""Lightning data module for the supported layouts.

The constructor takes plain types only, so LightningCLI / jsonargparse can build it from YAML,
and saves them with ``save_hyperparameters()``. The classes and the input are gathered in one
:class:`~segpipe.data.spec.DataSpec` (:attr:`SegmentationDataModule.spec`), which the CLI links
into the model and the checkpoint stores. Nothing touches the disk before
:meth:`SegmentationDataModule.setup`.

Concerns that live elsewhere in :mod:`segpipe.data`: samplers, the resumable loader and worker
defaults in :mod:`~segpipe.data.loading`; batching in :mod:`~segpipe.data.collate`; the spec,
palette and default normalisation in :mod:`~segpipe.data.spec`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
import numpy as np
import torch
from torch.utils.data import DataLoader

from segpipe.data.checks import WARNING_KINDS, DataCheckError, check_samples, group_problems
from segpipe.data.batchring import BatchRing
from segpipe.data.collate import PadCollate
from segpipe.data.datasets import (
    DataSplitError,
    Sample,
    Scan,
    SegmentationDataset,
    scan_camvid,
    scan_findings,
    scan_folder,
    scan_isbi,
    scan_lgg,
)
from segpipe.data.loading import (
    EpochSampler,
    ResumableDataLoader,
    SlotDataLoader,
    UnrepeatedSampler,
    default_cache_mb,
    default_num_workers,
    ram_bytes,
    seed_worker,
    workers_fork,
)
from segpipe.data.spec import (
    DataSpec,
    check_ignore_index,
    default_class_colors,
    training_symmetries,
)
from segpipe.data.stats import band_statistics, image_kinds, needs_measured_stats
from segpipe.data.transforms import (
    boundary_weight_map,
    build_eval_transform,
    build_train_transform,
    normalize_uint8_batch,
    seed_transform,
)
from segpipe.errors import ConfigError
from segpipe.stopping import ends_after_this_epoch

__all__ = ["LAYOUTS", "SegmentationDataModule"]

log = logging.getLogger(__name__)
#: A warning about the data, which every process of a multi-process run reads alike: once.
_warn_once = rank_zero_only(log.warning)

Layout = Literal["folder", "camvid", "lgg", "isbi"]
LAYOUTS: tuple[str, ...] = ("folder", "camvid", "lgg", "isbi")
_ISBI_DEFAULT_VAL = (20, 24)
#: Batches each loader worker builds ahead (the DataLoader's default, which the loaders keep).
_PREFETCH_FACTOR = 2
#: Cases of a layout when data.case_pattern is not given: CamVid's video sequence (the frame
#: name's prefix, e.g. 0016E5 of 0016E5_07959.png). LGG's patient is its folder.
_DEFAULT_CASE_PATTERN: dict[str, str] = {"camvid": r"(?P<case>[^/_]+)_[^/]*$"}


#: The data settings that decide a split by case (see :attr:`SegmentationDataModule.case_split`).
_CASE_SPLIT_KEYS = ("val_cases", "val_case_fraction", "fold", "seed")

#: Options that decide which files a split holds, named when a checkpoint's training files
#: turn up in the split a later run scores.
_FILE_SPLIT_KEYS = ("val_fraction", "val_cases", "val_case_fraction", "fold", "seed")


def _check_scaled_stats(mean: Sequence[float], std: Sequence[float], dtype: str) -> None:
    """Refuse a given mean/std that integer images, scaled by their type's maximum, cannot
    have (|mean| > 1 or std > 1): statistics in raw units (reflectance x 10000, from a GIS)
    normalised every pixel to about the same value, and the model learnt nothing, in silence."""
    if np.dtype(dtype).kind not in "iu":
        return
    if all(abs(m) <= 1 for m in mean) and all(s <= 1 for s in std):
        return
    top = np.iinfo(np.dtype(dtype)).max
    span = "[0, 1]" if np.dtype(dtype).kind == "u" else "[-1, 1]"
    raise ConfigError(
        f"data.mean {list(mean)} / data.std {list(std)} look like raw pixel values, but segpipe "
        f"divides {dtype} images by {top} before normalising, so their mean lies within "
        f"{span} and their std below 1: give the statistics of the scaled images (`segpipe "
        "check-data` prints them, in its [0, 1] columns), or leave data.mean and data.std out "
        "to have them measured")


def _file_keys(samples: Sequence[Sample], root: Path) -> torch.Tensor:
    """One 64-bit key per sample's image: a hash of its path relative to ``root`` and its size
    in bytes, so the training files of a checkpoint are recognised (8 bytes each in the
    checkpoint) when the data root has moved, but not in another data set that names its
    files alike."""
    import hashlib

    keys = []
    for sample in samples:
        try:
            rel, size = sample.image.relative_to(root).as_posix(), sample.image.stat().st_size
        except (ValueError, OSError):
            rel, size = sample.image.as_posix(), -1
        digest = hashlib.blake2b(f"{rel}\0{size}".encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64)


def _num_folds(fraction: float | None) -> int | None:
    """K when ``fraction`` is 1/K (to 2 %) for some K >= 2, else None."""
    if fraction is None or not 0.0 < fraction < 1.0:
        return None
    k = round(1.0 / fraction)
    return k if k >= 2 and abs(k * fraction - 1.0) <= 0.02 else None


def _subset(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` evenly spaced samples (deterministic)."""
    if limit is None or len(samples) <= limit:
        return samples
    idx = np.linspace(0, len(samples) - 1, num=max(1, limit)).round().astype(int)
    return [samples[i] for i in sorted(set(idx.tolist()))][:limit]


def _yaml_flow(value: Any) -> str:
    """``value`` as a one-line YAML flow value (``null``, ``{0: 0, 255: 1}``, ``[[0, 0, 0]]``)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str([list(c) for c in value])


class SegmentationDataModule(L.LightningDataModule):
    """Data module for semantic segmentation.

    Batches: ``{"image": float32 (N, C, H, W), "mask": int64 (N, H, W), "path": list[str]}``,
    images channels-last in memory (see :class:`~segpipe.data.collate.PadCollate`). Training
    crops come from :func:`~segpipe.data.transforms.build_train_transform`; val/test images keep
    their native size (or ``eval_resize``) and are padded per batch to the largest
    item (image with 0, mask with ``ignore_index``). With ``eval_resize`` val/test masks keep
    their native size and batches carry ``"size"`` (N, 2): the task scores predictions
    upsampled to each mask, as ``segpipe predict`` writes them.

    Args:
        root: Data root.
        layout: ``folder``, ``camvid``, ``lgg`` or ``isbi`` (see :mod:`segpipe.data.datasets`).
        num_classes: Number of classes.
        class_names: One name per class (default ``class_0, class_1, ...``).
        class_colors: One RGB colour per class (default: ``mask_colors`` when the masks are
            colour-coded, else :func:`~segpipe.data.spec.default_class_colors`).
        ignore_index: Label of ignored pixels (e.g. CamVid void = 11), also used for padding.
        in_channels: Channels fed to the model (1 <-> 3 conversions are automatic).
        bands: 1-based band selection for multi-band images.
        mean: Per-channel mean of [0, 1]-scaled images. Default: ImageNet's for 8-bit RGB
            images; for anything else (multi-band, 16-bit, grayscale) measured per band on a
            sample of the training images when training starts, and saved in the checkpoint.
        std: Per-channel std (same default).
        mask_values: Raw mask value -> class, e.g. ``{0: 0, 255: 1}``.
        mask_colors: Colour table for RGB colour-coded masks (i-th colour = class i).
        batch_size: Training batch size.
        samples_per_epoch: Training samples per epoch (default: the training set's size). For
            small training sets (ISBI's 20 slices are 5 steps of 4) an epoch of a few steps is
            dominated by its fixed work (loader start, epoch-end logging, validation and
            ``last.ckpt`` at their epoch cadence); a fixed number of samples per epoch, as
            nnU-Net's 250-iteration epochs, spreads it over more steps. Samples are drawn in
            whole passes over the data, each in its own order, repeats augmented differently.
        eval_batch_size: Val/test/predict batch size (default ``batch_size``).
        num_workers: DataLoader workers (default :func:`default_num_workers`: CPUs that
            training leaves free, at most 8 with a GPU and 4 without; 0 on a CPU whose cores
            all train).
        pin_memory: Pin host memory (default: when CUDA is available).
        uint8_batches: Send 8-bit images to the device as uint8 (a quarter of float32's bytes
            to copy and pin) and normalise them there, in :meth:`on_after_batch_transfer`; the
            task always receives float32 normalised batches. Default: when training runs on a
            CUDA GPU. Other images (16-bit, converted channels) are normalised while loading as
            always. Padding of differently sized eval images is then black rather than the
            mean colour (padded pixels are ignored by the metrics either way). Masks whose
            labels and ignore index fit in 8 bits cross as uint8 too (an eighth of int64's
            bytes) and are made int64 on the device.
        persistent_workers: Keep workers between epochs (only when workers > 0).
        worker_niceness: Lower the workers' CPU priority by this much (default: 10 when no GPU
            is available, so loading does not pre-empt the CPU training threads; else 0).
        cache_mb: Memory (MiB) each train/val/test dataset may use to keep decoded images and
            checked masks, so epochs after the first skip decoding; 0 disables. With
            ``shared_cache`` this is the one cache of the dataset's workers, else each loading
            process's own. Default: an eighth of the machine's RAM, at most 1024 per loading
            process.
        shared_cache: Loader workers share one cache per dataset (anonymous shared memory
            mapped before they are forked), so an image decoded by one worker is read by all,
            instead of each worker decoding the images it draws until it has seen them all
            (CamVid with 8 workers: 11 % of the second epoch's images came from their own
            caches, 42 % of the fifth's). Applies where workers are forked (Linux's default start method); with
            spawned workers, or ``false``, each worker keeps its own.
        shared_batches: Batches built by forked loader workers cross to the main process in
            slots of shared memory mapped before the workers start
            (:class:`~segpipe.data.batchring.BatchRing`), not as one shared-memory file per
            tensor, whose descriptor the receiving thread fetches from the worker in a
            socket handshake: that fetch waited on the GIL, which the training loop holds
            (with a thread spinning in Python beside it, receiving a training batch took a
            median 101 ms against 21 ms from a slot). Training slots are sized for the
            crop (none without ``crop_size``), val/test slots for the largest of up to 64 of
            the split's images; a larger batch crosses the ordinary way. ``false`` sends every
            tensor on its own.
        augment: Augmentation preset (``none``, ``light``, ``default``, ``strong``).
        crop_size: Square training crop size; None trains on whole images.
        late_crop_size: Square training crop size for the end of the training (from
            ``late_crop_start`` of it on), larger than ``crop_size`` so the network ends on the
            context it sees at evaluation; None (default) keeps ``crop_size`` throughout. The
            switch happens at an epoch boundary (:class:`~segpipe.tasks.schedules.LateCrop`, which
            ``segpipe fit`` adds); a time-budgeted run re-plans its remaining epochs from the
            longer epochs' measured time.
        late_crop_start: Fraction of the planned training (of the time budget's epochs, else
            of ``max_epochs``) after which ``late_crop_size`` applies.
        crop_focus_classes: Classes (indices, or names from ``class_names``) that a fraction
            ``crop_focus_p`` of the training crops is placed on: one of them present in the
            image is drawn, then one of its pixels, and the crop holds it (nnU-Net's foreground
            oversampling; :class:`~segpipe.data.transforms.RandomScaleCrop`). For classes too
            rare or small for uniform crops to show often (CamVid's pedestrians and cyclists, a
            small tumour in a large scan). Needs ``crop_size``. None (default) disables it.
        crop_focus_p: The fraction of the crops placed so (nnU-Net: a third).
        scale: Random scale range for ``default``/``strong``.
        hflip: Random horizontal flips.
        vflip: Random vertical flips.
        rotate90: Random 90° rotations.
        elastic: Elastic deformation of each training crop, the standard deviation in pixels of
            random displacements on a 3x3 grid (the U-Net paper's augmentation for its 30 EM
            slices used 10); 0 (default) disables it.
        channel_gain: ``[low, high]``: multiply each channel of each training sample by its own
            factor drawn uniformly from this range (for scans whose channels' brightness differs
            from scanner to scanner, e.g. ``[0.5, 2.0]``); None (default) disables it.
        boundary_weight_class: Weigh the training loss's cross-entropy with the U-Net paper's
            border weights (:func:`~segpipe.data.transforms.boundary_weight_map`): the connected
            regions of this class are the objects (ISBI's cells, class 1), and the pixels of
            thin gaps between two objects weigh up to ``1 + boundary_weight_w0``. Computed on
            each augmented training crop; validation and test are unweighted. None (default)
            disables it.
        boundary_weight_w0: The border term's weight (the paper's 10).
        boundary_weight_sigma: Its width in pixels of the training crop (the paper's 5).
        color: Colour jitter.
        eval_resize: Optional ``[height, width]`` the network sees val/test/predict images at
            (e.g. half the frames' size: 4x less work per image, for a model trained at that
            scale); predictions are upsampled back, and metrics score them against the masks
            at their native size.
        val_fraction: Fraction of train held out for val when the data has no val split
            (per patient for ``lgg``).
        val_slices: ``[start, stop)`` slices for val with ``isbi`` (default ``[20, 24]`` when
            there are at least 24 slices, else the last ``val_fraction`` of the slices).
        seed: Seed for held-out splits and augmentation.
        check_data: Run the pre-flight check in :meth:`setup`.
        limit_samples: Use at most this many (evenly spaced) samples per split.
        case_pattern: Regular expression that finds an image's case (patient, scan, scene) in
            its path relative to ``root``: the group named ``case``, else the first group, else
            the whole match; ``segpipe test`` then also reports metrics per case and their mean
            over cases. Default for ``lgg``: the patient folder; for ``camvid``: the video
            sequence; none for other layouts.
        val_cases: Validate on exactly these cases: train and val are pooled and every image
            of a listed case goes to val, the rest to train, so no case is in both (CamVid's
            val shares sequence 0016E5 with train; ``[0001TP]`` holds a whole sequence out).
        val_case_fraction: Validate on a seeded fraction of the cases instead (train and val
            pooled, split by case), e.g. 0.25 of the LGG patients rather than the 11 of
            ``splits.csv``.
        fold: k-fold cross-validation by case: with ``val_case_fraction`` = 1/K (0.2 for 5
            folds), the cases, in the seeded order that fraction draws them in, are cut into K
            folds (the first is exactly the default val cases, the others share the rest
            evenly), and ``fold: k`` (0 .. K-1) validates on the k-th and trains on the others.
            K runs then score every case once; ``segpipe crossval`` pools their ``segpipe
            test`` results.
        train_on_val: Train on the val split too, once it is chosen as configured, and do not
            validate: the final model of a recipe chosen on val (as nnU-Net's fold ``all``),
            trained on every labelled image. With a time budget the whole budget trains;
            checkpoints are ``last.ckpt`` only, and ``--ckpt_path best`` means it. The
            checkpoint records that it trained on val, so ``validate``/``test`` on that val
            split refuse it; score it on a test split.
        mask_suffix: ``folder`` layout: what mask file names add to their image's stem, e.g.
            ``"_mask"`` pairs ``images/x.jpg`` with ``masks/x_mask.png`` (default: none, the
            same stem).
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
        samples_per_epoch: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        uint8_batches: bool | None = None,
        persistent_workers: bool = True,
        worker_niceness: int | None = None,
        cache_mb: float | None = None,
        shared_cache: bool = True,
        shared_batches: bool = True,
        augment: Literal["none", "light", "default", "strong"] = "default",
        crop_size: int | None = None,
        late_crop_size: int | None = None,
        late_crop_start: float = 0.75,
        crop_focus_classes: list[int | str] | None = None,
        crop_focus_p: float = 0.33,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        vflip: bool = False,
        rotate90: bool = False,
        elastic: float = 0.0,
        channel_gain: tuple[float, float] | None = None,
        boundary_weight_class: int | None = None,
        boundary_weight_w0: float = 10.0,
        boundary_weight_sigma: float = 5.0,
        color: bool = True,
        eval_resize: list[int] | None = None,
        val_fraction: float = 0.1,
        val_slices: list[int] | None = None,
        seed: int = 0,
        check_data: bool = True,
        limit_samples: int | None = None,
        case_pattern: str | None = None,
        val_cases: list[str] | None = None,
        val_case_fraction: float | None = None,
        fold: int | None = None,
        train_on_val: bool = False,
        mask_suffix: str = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mask_suffix and layout != "folder":
            raise ConfigError(f"data.mask_suffix applies to the 'folder' layout; the {layout!r} "
                              "layout names its masks itself")
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if isinstance(num_classes, int) and num_classes < 2:  # before the checks that assume it
            raise ConfigError(
                f"data.num_classes must be >= 2 (background counts as a class), got "
                f"{num_classes}; a binary task is data.num_classes 2 (with 0/255 masks: "
                "data.mask_values '{0: 0, 255: 1}')")
        for option, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{option} must be >= 1, got {value}")
        for option, value in (("crop_size", crop_size), ("late_crop_size", late_crop_size)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{option} must be a positive number of pixels (the side "
                                  f"of a square crop; null: whole images), got {value}")
        if (mean is None) != (std is None):  # the other would be a default, unlike the data's
            given, missing = ("mean", "std") if std is None else ("std", "mean")
            raise ConfigError(
                f"data.{given} is given without data.{missing}: the two are statistics of the "
                f"same images; give data.{missing} too (`segpipe check-data` prints both), or "
                "neither, and fit measures them (ImageNet's for 8-bit RGB images)")
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise ConfigError(f"data.samples_per_epoch must be >= data.batch_size ({batch_size}) "
                              f"or null (one pass over the training set), got {samples_per_epoch}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if not elastic >= 0:  # also NaN
            raise ConfigError(f"data.elastic is a displacement in pixels, >= 0 (U-Net paper: 10); "
                              f"got {elastic}")
        if channel_gain is not None and not 0 < channel_gain[0] <= channel_gain[1]:
            raise ConfigError(f"data.channel_gain must be [low, high] with 0 < low <= high "
                              f"(e.g. [0.5, 2.0]) or null, got {list(channel_gain)}")
        check_ignore_index(num_classes, ignore_index, mask_values, mask_colors)
        if boundary_weight_class is not None and not 0 <= boundary_weight_class < num_classes:
            raise ConfigError(f"data.boundary_weight_class is the class whose regions are the "
                              f"objects, in 0..{num_classes - 1}; got {boundary_weight_class}")
        if not (boundary_weight_w0 >= 0 and boundary_weight_sigma > 0):  # also NaN
            raise ConfigError(f"data.boundary_weight_w0 must be >= 0 and data.boundary_weight_sigma "
                              f"> 0 (the U-Net paper: 10 and 5 px); got {boundary_weight_w0} and "
                              f"{boundary_weight_sigma}")
        if late_crop_size is not None and (crop_size is None or late_crop_size < crop_size):
            raise ConfigError(f"data.late_crop_size ({late_crop_size}) is a larger training crop "
                              f"for the end of the training: it needs data.crop_size set and no "
                              f"smaller than it (got crop_size={crop_size})")
        if not 0.0 < late_crop_start < 1.0:
            raise ConfigError(f"data.late_crop_start is a fraction of the training in (0, 1), "
                              f"got {late_crop_start}")
        #: ``crop_focus_classes`` as class indices (names resolved); () when off.
        self.crop_focus_classes = self._focus_classes(
            crop_focus_classes, crop_focus_p, crop_size, num_classes, class_names)
        if limit_samples is not None and limit_samples < 1:
            raise ConfigError(f"data.limit_samples must be >= 1 or null, got {limit_samples}")
        if val_cases is not None and val_case_fraction is not None:
            raise ConfigError("give data.val_cases or data.val_case_fraction, not both")
        if val_case_fraction is not None and not 0.0 < val_case_fraction < 1.0:
            raise ConfigError(f"data.val_case_fraction must be in (0, 1), got {val_case_fraction}")
        if fold is not None:
            num_folds = _num_folds(val_case_fraction)
            if num_folds is None:
                raise ConfigError(f"data.fold needs data.val_case_fraction = 1/K for K folds "
                                  f"(0.2 for 5 folds, 0.25 for 4); got {val_case_fraction}")
            if not 0 <= fold < num_folds:
                raise ConfigError(f"data.fold must be in 0..{num_folds - 1} for the {num_folds} "
                                  f"folds of data.val_case_fraction={val_case_fraction}; got {fold}")
        if case_pattern is not None:
            try:
                re.compile(case_pattern)
            except re.error as exc:
                raise ConfigError(f"data.case_pattern {case_pattern!r} is not a regular "
                                  f"expression: {exc}") from None
        if val_slices is not None and len(val_slices) != 2:
            raise ConfigError(f"data.val_slices must be [start, stop], got {val_slices}")

        if bands is not None and any(int(b) < 1 for b in bands):
            raise ConfigError(
                f"data.bands are numbered from 1, as GDAL numbers a file's bands; got "
                f"{list(bands)} (for the first three bands give [1, 2, 3])")
        if class_names:
            dupes = sorted({str(n) for n in class_names
                            if [str(m) for m in class_names].count(str(n)) > 1})
            if dupes:
                raise ConfigError(
                    f"data.class_names names {dupes} more than once: per-class metrics, logged "
                    "keys and reports are keyed by name, so one class would hide another; give "
                    "each class its own name")
        self.root = root
        self.layout = layout
        if class_colors is None and mask_colors:
            # the masks' own colours: predicted palette masks, overlays and the report's
            # pictures then look like the user's masks (they came in the default palette)
            fallback = default_class_colors(num_classes)
            class_colors = [list(map(int, mask_colors[i])) if i < len(mask_colors) else fallback[i]
                            for i in range(num_classes)]
        #: Classes and input, stated once; ``mean``/``std`` may be filled in by :meth:`setup`.
        self.spec = DataSpec.create(
            num_classes,
            class_names=class_names,
            class_colors=class_colors,
            ignore_index=ignore_index,
            in_channels=in_channels,
            bands=bands,
            mean=mean,
            std=std,
            eval_resize=eval_resize,
            symmetries=training_symmetries(augment, hflip, vflip, rotate90),
        )
        self.mask_values = {int(k): int(v) for k, v in mask_values.items()} if mask_values else None
        self.mask_colors = [list(map(int, c)) for c in mask_colors] if mask_colors else None
        beyond = [i for i in range(num_classes, len(self.mask_colors or ())) if i != ignore_index]
        if beyond:
            raise ConfigError(
                f"data.mask_colors lists {len(self.mask_colors or ())} colours for "
                f"num_classes={num_classes}: the i-th colour is class i, so colour(s) "
                f"{[self.mask_colors[i] for i in beyond]} would be class(es) {beyond}, which the "
                "model does not have; list one colour per class (colours left out become "
                "data.ignore_index when it is set), or raise data.num_classes")
        mapped = sorted({v for v in (self.mask_values or {}).values()
                         if not 0 <= v < num_classes and v != ignore_index})
        if mapped:
            raise ConfigError(
                f"data.mask_values maps to {mapped}, which are neither classes 0..{num_classes - 1} "
                f"nor data.ignore_index={ignore_index}; map each raw value to a class or to the "
                "ignore index")
        self.batch_size = int(batch_size)
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.uint8_batches = uint8_batches
        if worker_niceness is None:
            worker_niceness = 0 if torch.cuda.is_available() else 10
        if not 0 <= worker_niceness <= 19:
            raise ConfigError(f"data.worker_niceness must be in 0..19, got {worker_niceness}")
        self.worker_niceness = int(worker_niceness)
        if cache_mb is not None and cache_mb < 0:
            raise ConfigError(f"data.cache_mb must be >= 0 (0 disables the cache), got {cache_mb}")
        #: Whether each dataset's loader workers share one cache (see ``shared_cache``).
        self.shared_cache = bool(shared_cache) and self.num_workers > 0 and workers_fork()
        self.cache_mb = (default_cache_mb(self.num_workers, shared=self.shared_cache)
                         if cache_mb is None else float(cache_mb))
        self.shared_batches = bool(shared_batches)

        #: The training crop now in use: ``crop_size``, then ``late_crop_size`` (see
        #: :meth:`update_train_crop`).
        self.train_crop_size = crop_size
        self._scan: Scan | None = None
        self._splits: dict[str, list[Sample]] = {}
        self._train_keys: torch.Tensor | None = None  # see _file_keys
        self._checked: set[str] = set()
        self.datasets: dict[str, Any] = {}
        # Brightness jitter relative to each image's mean (not the dtype's maximum): for images
        # that are not 8-bit RGB, whose values fill only part of [0, 1]; see _measure_stats.
        self._color_relative = False
        self.test_split: str = "test"
        self._native_test_images = False  # see keep_test_images_native

    def keep_test_images_native(self) -> None:
        """Hand the test split's images over at their native size, not resized to
        ``eval_resize`` (masks are native anyway): multi-scale inference
        (``model.test_tta_scales``) resizes each of its views from them, and enlarged views
        of already resized images would be blurred copies. The task calls it in ``setup``."""
        self._native_test_images = True
        if self.test_split in self.datasets:
            self.datasets[self.test_split].transform = None

    # ---------------------------------------------------------------- the data spec
    @property
    def num_classes(self) -> int:
        """Number of classes (from :attr:`spec`)."""
        return self.spec.num_classes

    @property
    def class_names(self) -> list[str]:
        """One name per class (from :attr:`spec`)."""
        return list(self.spec.class_names)

    @property
    def class_colors(self) -> list[list[int]]:
        """One RGB triplet per class (from :attr:`spec`)."""
        return [list(c) for c in self.spec.class_colors]

    @property
    def ignore_index(self) -> int | None:
        """Ignored label (from :attr:`spec`)."""
        return self.spec.ignore_index

    @property
    def in_channels(self) -> int:
        """Input channels (from :attr:`spec`)."""
        return self.spec.in_channels

    @property
    def bands(self) -> list[int] | None:
        """1-based band selection (from :attr:`spec`)."""
        return self.spec.bands

    @property
    def mean(self) -> list[float]:
        """Normalisation mean in use: given, measured or the default (see :attr:`spec`)."""
        return self.spec.normalization()[0]

    @property
    def std(self) -> list[float]:
        """Normalisation std in use."""
        return self.spec.normalization()[1]

    def _set_stats(self, mean: Sequence[float], std: Sequence[float], source: str) -> None:
        """Adopt normalisation statistics, also in datasets already built."""
        self.spec = self.spec.with_stats(mean, std, source)
        for dataset in self.datasets.values():
            dataset.mean, dataset.std = list(self.spec.mean or []), list(self.spec.std or [])

    def _measure_stats(self, samples: list[Sample]) -> None:
        """Fill in mean/std when the config gives none: ImageNet's for 8-bit RGB images,
        otherwise measured per band on a seeded sample of the training images. Also note the
        images' dtype in the spec (prediction warns of inputs of another one, whose values
        would be scaled otherwise): that of the first 3 images when they agree, else None."""
        images = [s.image for s in samples]
        kinds = list(image_kinds(images, bands=self.bands, in_channels=self.in_channels))
        dtypes = {dtype for dtype, _ in kinds}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if dtype != self.spec.input_dtype:
            self.spec = dataclasses.replace(self.spec, input_dtype=dtype)
        # Decided by the images, not by where mean/std come from: statistics pasted from
        # `check-data` must train as the measured ones do (they once made the jitter absolute:
        # shifts of up to 25 standard deviations on reflectance rasters).
        self._color_relative = needs_measured_stats(
            images, bands=self.bands, in_channels=self.in_channels, kinds=kinds)
        if self.spec.has_stats:
            if self.spec.stats_source == "config" and dtype is not None:
                _check_scaled_stats(self.spec.mean or [], self.spec.std or [], dtype)
            return
        if not self._color_relative:
            mean, std = self.spec.normalization()
            self._set_stats(mean, std, "default")
            return
        stats = band_statistics(images, bands=self.bands, in_channels=self.in_channels,
                                seed=int(self.hparams.seed))
        rank_zero_info(
            "data.mean/data.std not given and the images are not 8-bit RGB: measured per band "
            f"on {stats.num_images} training images: mean {[round(v, 4) for v in stats.mean]}, "
            f"std {[round(v, 4) for v in stats.std]} (saved in the checkpoint; put them in the "
            "config to skip this step)")
        self._set_stats(stats.mean, stats.std, "measured")

    def state_dict(self) -> dict[str, Any]:
        """The spec (with measured statistics), so resumed, validated and tested runs
        normalise exactly as training did, and the training crop in use, so a run resumed
        after the switch to ``late_crop_size`` goes on with it; with a split by case, the
        training cases, so that a later run cannot validate on them unawares."""
        return {"spec": self.spec.to_dict(), "train_crop_size": self.train_crop_size,
                "train_cases": self._train_cases(),
                "train_files": self._train_file_keys(),
                "split_settings": {k: self.hparams.get(k) for k in _FILE_SPLIT_KEYS},
                "trained_on_val": not self.validates,
                "mask_encoding": self._mask_encoding()}

    def _mask_encoding(self) -> dict[str, Any]:
        """How mask files are read into labels (``mask_values``, ``mask_colors``)."""
        values = self.mask_values
        return {"mask_values": None if values is None else {str(k): v for k, v in values.items()},
                "mask_colors": self.mask_colors}

    @property
    def validates(self) -> bool:
        """Whether ``fit`` validates: False with ``data.train_on_val`` (val is trained on)."""
        return not self.hparams.get("train_on_val", False)

    @property
    def case_split(self) -> dict[str, Any] | None:
        """How train and val are split by case (``val_cases``, ``val_case_fraction``,
        ``fold``, ``seed``), or None when they keep the data set's own split."""
        hp = self.hparams
        if hp.get("val_cases") is None and hp.get("val_case_fraction") is None:
            return None
        return {k: hp.get(k) for k in _CASE_SPLIT_KEYS}

    def _train_file_keys(self) -> torch.Tensor | None:
        """:func:`_file_keys` of the training split (computed once), or None before setup."""
        if self._train_keys is None and self._splits.get("train"):
            self._train_keys = _file_keys(self._splits["train"], Path(self.root).expanduser())
        return self._train_keys

    def _check_files_not_trained_on(self, trained: torch.Tensor, settings: Mapping[str, Any]) -> None:
        """Refuse to score images the checkpoint trained on: a val split drawn with another
        ``val_fraction`` or ``seed`` than in training, or files moved between the splits."""
        stage = self._stage()
        if not self._splits or stage not in ("validate", "test", "fit"):
            return
        for split in self._splits_for(stage):
            samples = self._splits.get(split, []) if split != "train" else []
            if not samples:
                continue
            seen = torch.isin(_file_keys(samples, Path(self.root).expanduser()),
                              trained.to(torch.int64))
            if not bool(seen.any()):
                continue
            names = [str(s.image) for s, hit in zip(samples, seen.tolist()) if hit]
            why = self._split_change(settings, "files")
            raise DataSplitError(
                f"the checkpoint trained on {len(names)} of the {len(samples)} images this "
                f"{split} split scores ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}), "
                f"so its scores would not be held out. {why}"
            )

    def _split_change(self, settings: Mapping[str, Any], moved: str) -> str:
        """What to give: the split settings the checkpoint was trained with that differ from
        this run's, or, when none differ (or none were recorded), that ``moved`` moved."""
        changed = [k for k, v in settings.items() if v != self.hparams.get(k)]
        if changed:
            return ("It was trained with " + ", ".join(f"data.{k}={settings[k]}" for k in changed)
                    + "; now " + ", ".join(f"data.{k}={self.hparams.get(k)}" for k in changed)
                    + ": give the settings it was trained with, or score data it did not train on")
        if settings:
            return (f"The split settings are those of its training, so {moved} moved between "
                    "the splits: score data it did not train on")
        now = ", ".join(f"data.{k}={self.hparams.get(k)}" for k in _CASE_SPLIT_KEYS)
        return f"Give the split it was trained with: now {now}"

    def _train_cases(self) -> list[str] | None:
        """The training split's cases when train and val were split by case, else None."""
        if not self._splits or self.case_split is None:
            return None
        return sorted({s.case for s in self._splits.get("train", []) if s.case})

    def _stage(self) -> str | None:
        """The trainer's function (``fit``, ``validate``, ``test``, ...), or None."""
        return None if self.trainer is None else getattr(self.trainer.state.fn, "value", None)

    def _scores_val(self) -> bool:
        """Whether the trainer's stage scores the val split (a data set's own test split may
        share cases with train by design: val only)."""
        if not self._splits or self.trainer is None:
            return False
        stage = self._stage()
        return stage in ("fit", "validate", "test") and "val" in self._splits_for(stage)

    def _check_not_trained_on(
        self, trained: Sequence[str], settings: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse to validate or test on cases the checkpoint trained on (a fold mix-up),
        naming the split settings it was trained with (``settings``, when recorded)."""
        if not self._scores_val():
            return
        scored = sorted({s.case for s in self._splits.get("val", []) if s.case})
        seen = sorted(set(scored) & set(trained))
        if seen:
            raise DataSplitError(
                f"the checkpoint trained on {len(seen)} of the {len(scored)} cases this val "
                f"split scores ({', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''}), so its "
                f"scores would not be held out. {self._split_change(settings or {}, 'cases')}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the statistics of a checkpoint's spec when the config gives none, and in a
        ``validate`` or ``test`` always (with a warning when the config gives others).

        Raises:
            DataSplitError: The val split this run scores holds cases the checkpoint trained
                on (e.g. ``segpipe test`` on fold 1's checkpoint without ``--data.fold 1``).
        """
        saved = state_dict.get("spec") or {}
        if saved.get("mean") is not None and saved.get("std") is not None:
            given = self.spec.stats_source not in ("", "default", "measured")
            # The model is scored as it was trained, and as `segpipe predict` normalises: other
            # statistics given to a validate or test scored it on inputs it never saw.
            overridden = given and self._stage() in ("validate", "test") and not (
                np.allclose(saved["mean"], self.spec.mean or [], rtol=1e-6, atol=0)
                and np.allclose(saved["std"], self.spec.std or [], rtol=1e-6, atol=0))
            if overridden:
                rank_zero_warn(
                    f"the checkpoint was trained with data.mean {list(saved['mean'])} and "
                    f"data.std {list(saved['std'])}, but this run gives {self.spec.mean} and "
                    f"{self.spec.std}: scoring with the checkpoint's, as segpipe predict "
                    "normalises")
            if not given or overridden:
                self._set_stats(saved["mean"], saved["std"], saved.get("stats_source") or "measured")
        crop = state_dict.get("train_crop_size")
        if crop is not None and crop == self.hparams.late_crop_size:
            self._set_train_crop(int(crop))
        if state_dict.get("trained_on_val") and self._scores_val():
            raise DataSplitError(
                "the checkpoint was trained with data.train_on_val: its training data held this "
                "val split, so its scores would not be held out; score it on a test split"
            )
        saved_encoding, now = state_dict.get("mask_encoding"), self._mask_encoding()
        if (isinstance(saved_encoding, dict) and self._stage() in ("validate", "test")
                and saved_encoding != now):
            diff = [k for k in ("mask_values", "mask_colors") if saved_encoding.get(k) != now[k]]
            given = " ".join(f"--data.{k} '{_yaml_flow(saved_encoding.get(k))}'" for k in diff)
            rank_zero_warn(
                "the checkpoint was trained with "
                + ", ".join(f"data.{k}={_yaml_flow(saved_encoding.get(k))}" for k in diff)
                + " but this run has " + ", ".join(f"data.{k}={_yaml_flow(now[k])}" for k in diff)
                + ": its masks are read into other labels than in training (0/255 masks without "
                f"the mapping score every 255 as ignored or as class 255); to score as trained, "
                f"pass {given} or the run's config.yaml")
        if state_dict.get("train_cases"):
            self._check_not_trained_on(state_dict["train_cases"],
                                       state_dict.get("split_settings") or {})
        if isinstance(state_dict.get("train_files"), torch.Tensor):
            self._check_files_not_trained_on(state_dict["train_files"],
                                             state_dict.get("split_settings") or {})

    def update_train_crop(self, progress: float) -> bool:
        """Switch the training crop to ``late_crop_size`` once ``progress`` reaches
        ``late_crop_start``.

        Args:
            progress: Fraction of the planned training done, in [0, 1].

        Returns:
            Whether the training crop changed, so the training loader must be built again.
        """
        late = self.hparams.late_crop_size
        if late is None or self.train_crop_size == late or progress < self.hparams.late_crop_start:
            return False
        self._set_train_crop(int(late))
        return True

    def _set_train_crop(self, size: int) -> None:
        self.train_crop_size = size
        self.datasets.pop("train", None)  # rebuilt with the new crop when next needed

    # ---------------------------------------------------------------- scanning and splits
    def _run_scanner(self) -> Scan:
        hp = self.hparams
        root = Path(self.root).expanduser()
        if self.layout == "folder":
            return scan_folder(root, mask_suffix=hp.get("mask_suffix") or "")
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
            # at least one slice each, as the other layouts keep one to train on
            n_val = (min(n - 1, max(1, round(hp.val_fraction * n)))
                     if hp.val_fraction > 0 and n > 1 else 0)
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
            by_case = hp.get("val_cases") is not None or hp.get("val_case_fraction") is not None
            if hp.val_fraction > 0 and len(train) > 1 and not by_case:  # else split by case
                rng = np.random.default_rng(hp.seed)
                n_val = min(len(train) - 1, max(1, round(hp.val_fraction * len(train))))
                val_idx = set(rng.permutation(len(train))[:n_val].tolist())
                splits["val"] = [s for i, s in enumerate(train) if i in val_idx]
                splits["train"] = [s for i, s in enumerate(train) if i not in val_idx]
                rank_zero_info(f"no val split in {self.root}: holding out {n_val} of "
                               f"{len(train)} train samples (data.val_fraction={hp.val_fraction}, "
                               f"data.seed={hp.seed})")
                if "train" in scan.folders:
                    scan.folders.setdefault("val", scan.folders["train"])
        splits = {k: self._with_cases(v, k) for k, v in splits.items()}
        splits = self._split_by_case(splits)
        if not self.validates:
            pooled = [*splits.get("train", []), *splits.get("val", [])]
            rank_zero_info(f"data.train_on_val: training on train + val ({len(pooled)} images), "
                           "without validation")
            splits = {**splits, "train": pooled, "val": []}
        limit = self.hparams.limit_samples
        #: Images per split before ``limit_samples`` (a test of part of a split says so).
        self.split_sizes = {k: len(v) for k, v in splits.items()}
        self._splits = {k: _subset(v, limit) for k, v in splits.items()}
        self._scan = scan
        return scan

    def _split_by_case(self, splits: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        """Re-split train + val by case when ``val_cases``/``val_case_fraction`` ask for it."""
        hp = self.hparams
        wanted, fraction = hp.get("val_cases"), hp.get("val_case_fraction")
        if wanted is None and fraction is None:
            return splits
        fold = hp.get("fold")
        pool = [*splits.get("train", []), *splits.get("val", [])]
        cases = sorted({s.case for s in pool if s.case})
        if not cases:
            raise DataSplitError(
                f"{self.root}: data.val_cases/val_case_fraction need cases, but no image has "
                "one; set data.case_pattern (a regular expression finding the case in the path)"
            )
        if wanted is not None:
            val = {str(c) for c in wanted}
            missing = sorted(val - set(cases))
            if missing:
                raise DataSplitError(
                    f"data.val_cases {missing} not found; the cases are {', '.join(cases[:20])}"
                    + (" ..." if len(cases) > 20 else "")
                )
        else:
            rng = np.random.default_rng(int(hp.seed))
            n_val = min(len(cases) - 1, max(1, round(float(fraction) * len(cases))))
            order = rng.permutation(len(cases)).tolist()
            if fold:  # folds 1..K-1 share the cases after fold 0 (the default val) evenly
                num_folds = _num_folds(fraction)
                assert num_folds is not None  # checked in __init__
                rest = np.array_split(np.asarray(order[n_val:], dtype=np.int64), num_folds - 1)
                order = rest[fold - 1].tolist()
                if not order:
                    raise DataSplitError(
                        f"{self.root}: data.fold {fold} of {num_folds} has no cases: there are "
                        f"only {len(cases)}; use fewer folds (a larger data.val_case_fraction)"
                    )
                n_val = len(order)
            val = {cases[i] for i in order[:n_val]}
        out = dict(splits)
        out["val"] = [s for s in pool if s.case in val]
        out["train"] = [s for s in pool if s.case not in val]
        which = "" if fold is None else f" (fold {fold} of {_num_folds(fraction)})"
        rank_zero_info(f"val split by case{which}: {len(val)} of {len(cases)} cases "
                       f"({len(out['val'])} images) for val, {len(out['train'])} images for train")
        return out

    def _with_cases(self, samples: list[Sample], split: str = "") -> list[Sample]:
        """Samples with their case set from ``case_pattern`` (or the LGG patient folder); a
        pattern the user gave that finds no case in some of the split's images is warned
        about (they count in the pooled figures, in no case)."""
        pattern = self.hparams.get("case_pattern") or _DEFAULT_CASE_PATTERN.get(self.layout)
        if pattern is None and self.layout != "lgg":
            return samples
        root = Path(self.root).expanduser()
        regex = re.compile(pattern) if pattern else None
        out = []
        for sample in samples:
            if regex is None:  # lgg: ROOT/kaggle_3m/<patient>/<patient>_<n>.tif
                case = sample.image.parent.name
            else:
                try:
                    rel = sample.image.relative_to(root).as_posix()
                except ValueError:
                    rel = sample.image.as_posix()
                found = regex.search(rel)
                if found is None:
                    case = None
                elif "case" in found.groupdict():
                    case = found.group("case")
                else:
                    case = found.group(1) if found.re.groups else found.group(0)
                case = case or None  # an empty match (`([A-Z]*)_`) is no case, as metrics read it
            out.append(dataclasses.replace(sample, case=case))
        missed = [s for s in out if s.case is None]
        if missed and split != "train" and self.hparams.get("case_pattern") and regex is not None:
            try:
                example = missed[0].image.relative_to(root).as_posix()
            except ValueError:
                example = missed[0].image.as_posix()
            which = "any" if len(missed) == len(out) else f"{len(missed)} of the {len(out)}"
            _warn_once(
                "data.case_pattern %r finds no case in %s %s images (e.g. %r, the path under "
                "data.root it is searched in): they count in the pooled figures but in no "
                "case%s", pattern, which, split or "", example,
                f"; the {split or 'data'} split gets no per-case figures"
                if len(missed) == len(out) else "")
        return out

    @property
    def splits(self) -> dict[str, list[Sample]]:
        """Samples per split after held-out splitting and ``limit_samples`` (after setup)."""
        self.scan()
        return self._splits

    def _splits_for(self, stage: str | None) -> list[str]:
        self.scan()
        self.test_split = "test" if "test" in self._splits else "val"
        if stage == "fit":
            return ["train", "val"] if self.validates else ["train"]
        if stage == "validate":
            return ["val"]
        if stage == "test":
            return [self.test_split]
        return [s for s in ("train", "val", "test") if s in self._splits] or ["train"]

    def no_val_hint(self) -> str:
        """Why there is no val split, and the fix (``data.val_fraction`` holds out part of a
        train split of 2 or more images)."""
        train = self._splits.get("train") or []
        if self.hparams.val_fraction > 0 and len(train) <= 1:
            return (f"the train split has {len(train)} image(s), too few for data.val_fraction "
                    f"({self.hparams.val_fraction}) to hold one out; add a val split or more "
                    "training images")
        return "add a val split or set data.val_fraction > 0"

    def _require_split(self, split: str) -> list[Sample]:
        scan = self.scan()
        if split not in self._splits:
            hint = {
                "val": self.no_val_hint(),
                "train": "add the training data",
            }.get(split, "add the split")
            raise DataSplitError(
                f"{self.root}: the {self.layout!r} layout has no {split!r} split; {hint}"
            )
        samples = self._splits[split]
        if not samples and split == "val" and not self.validates:
            raise DataSplitError(
                f"{self.root}: data.train_on_val trains on the val split, so there is none to "
                "score; score the model on a test split (or predict), or leave out "
                "data.train_on_val for a run that holds val out"
            )
        if not samples:
            folder = scan.folders.get(split, Path(self.root))
            for exc in getattr(scan, "unlisted_dirs", {}).get(split, [])[:1]:
                raise DataSplitError(
                    f"{exc.filename}: the folder cannot be listed ({exc.strerror}), and the "
                    f"{split!r} split has no samples without it; give the user running segpipe "
                    "read access to it (chmod a+rx)")
            instead = {"val": ", or delete the empty folder so that data.val_fraction holds "
                              "out part of train",
                       "test": ", or delete the empty folder so that `segpipe test` scores val"
                       }.get(split, "")
            raise DataSplitError(
                f"{folder}: the {split!r} split has no samples; put images there "
                f"(extensions: .png .jpg .jpeg .webp .bmp .tif .tiff .gif){instead}"
            )
        return samples

    @classmethod
    def from_checkpoint(cls, path: str | Path, root: str | Path | None = None
                        ) -> SegmentationDataModule:
        """The data module a ``segpipe fit`` checkpoint was trained with (its recorded
        ``data.*`` settings, so the same splits, fold and seed), for scripts that score its val
        split.

        Args:
            path: The ``.ckpt`` file.
            root: The data root to read instead of the recorded one (the data moved, or is
                mounted elsewhere); None: the recorded one.

        Raises:
            FileNotFoundError, CheckpointError: As :func:`segpipe.predict.checkpoint.read_checkpoint`.
            ValueError: For a checkpoint without data settings (not written by ``segpipe fit``
                with this data module).
        """
        from segpipe.predict.checkpoint import read_checkpoint

        recorded = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
        if not recorded:
            raise ValueError(f"{path} records no data settings (datamodule_hyper_parameters): "
                             "give a checkpoint written by segpipe fit")
        hparams = {k: v for k, v in recorded.items() if not k.startswith("_")}
        if root is not None:
            hparams["root"] = str(root)
        return cls(**hparams)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Scan, split, check (when ``check_data``) and build the datasets a stage needs.

        Lightning stages map to splits: ``fit`` -> train + val, ``validate`` -> val,
        ``test`` -> test (val, with a logged warning, when there is no test split). When
        ``data.mean``/``data.std`` are not given, ``fit`` fills them in (see :attr:`mean`).
        (Prediction has its own path: :mod:`segpipe.predict`, from a checkpoint alone.)

        Args:
            stage: Lightning stage or None for all splits.

        Raises:
            FileNotFoundError: Missing data root or layout folders.
            ValueError: Empty or missing splits.
            DataCheckError: Problems found by the pre-flight check, all listed in one error.
        """
        names = self._splits_for(stage)
        if stage == "test" and self.test_split != "test":
            _warn_once("%s has no test split; `segpipe test` scores the val split", self.root)
        used = {name: self._require_split(name) for name in names}
        if self.hparams.check_data:
            todo = {k: v for k, v in used.items() if k not in self._checked}
            if todo:
                scan = self.scan()
                problems = check_samples(
                    todo,
                    num_classes=self.num_classes,
                    ignore_index=self.ignore_index,
                    in_channels=self.in_channels,
                    bands=self.bands,
                    mask_values=self.mask_values,
                    mask_colors=self.mask_colors,
                    class_names=self.class_names,
                    **scan_findings(scan, todo),
                    # Decode every image once: truncations behind an intact header are caught
                    # here, before training, rather than when the loader reaches the file.
                    decode_images=True,
                )
                limit = self.hparams.get("limit_samples")
                if limit:  # a smoke test's few masks may miss classes: a warning, not an error
                    problems = [
                        dataclasses.replace(p, kind="absent_classes", message=(
                            f"{p.message} (in the data.limit_samples={limit} read)"))
                        if p.kind == "too_few_classes" else p for p in problems]
                for group in group_problems([p for p in problems if p.kind in WARNING_KINDS]):
                    _warn_once("data check: %s", group.line())
                errors = [p for p in problems if p.kind not in WARNING_KINDS]
                if errors:
                    raise DataCheckError(errors)
                self._checked.update(todo)
        if "train" in used:
            self._measure_stats(used["train"])
        for name, samples in used.items():
            if name not in self.datasets:
                self.datasets[name] = self._make_dataset(name, samples)

    @staticmethod
    def _focus_classes(classes: list[int | str] | None, p: float, crop_size: int | None,
                       num_classes: int, class_names: list[str] | None) -> tuple[int, ...]:
        """``data.crop_focus_classes`` as indices, checked (see :meth:`__init__`)."""
        if not classes:
            return ()
        if crop_size is None:
            raise ConfigError("data.crop_focus_classes places training crops on those classes; "
                              "it needs data.crop_size (whole images have no crop to place)")
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"data.crop_focus_p is the fraction of the crops placed on "
                              f"data.crop_focus_classes, in (0, 1] (nnU-Net: 0.33); got {p}")
        names = [str(n) for n in class_names or ()]
        indices = []
        for c in classes:
            if isinstance(c, str) and not c.lstrip("-").isdigit():
                if c not in names:
                    raise ConfigError(
                        f"data.crop_focus_classes names {c!r}, which is not in data.class_names "
                        f"({', '.join(names) or 'none given'}); give a class name from there "
                        f"or an index in 0..{num_classes - 1}")
                c = names.index(c)
            c = int(c)
            if not 0 <= c < num_classes:
                raise ConfigError(f"data.crop_focus_classes lists {c}, which is not a class: give "
                                  f"indices in 0..{num_classes - 1} or names from "
                                  "data.class_names")
            indices.append(c)
        return tuple(dict.fromkeys(indices))

    def _make_dataset(self, split: str, samples: list[Sample]) -> SegmentationDataset:
        hp = self.hparams
        if split == "train":
            transform = build_train_transform(
                preset=hp.augment,
                crop_size=self.train_crop_size,
                scale=tuple(hp.scale),
                hflip=hp.hflip,
                vflip=hp.vflip,
                rotate90=hp.rotate90,
                elastic=float(hp.elastic),
                channel_gain=hp.channel_gain,
                color=hp.color,
                # Padded pixels are ignored, or without an ignore index mirrored (image and
                # mask): a fill label would teach invented pixels as a class.
                mask_fill=self.ignore_index,
                color_relative=self._color_relative,
                focus_classes=self.crop_focus_classes,
                focus_p=float(hp.crop_focus_p),
            )
            seed_transform(transform, int(hp.seed))
        elif split == self.test_split and self._native_test_images:
            transform = None  # keep_test_images_native: masks and images at native size
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
            shared_cache=self.shared_cache,
            uint8_images=self._uint8_batches(),
            pixel_weights=self._pixel_weights() if split == "train" else None,
            # eval_resize resizes the image only: scores are upsampled to the native mask.
            native_masks=split != "train" and hp.eval_resize is not None,
        )

    @property
    def pixel_weighting(self) -> bool:
        """Whether training batches carry per-pixel loss weights (``"weight"``)."""
        return self.hparams.boundary_weight_class is not None

    def _pixel_weights(self) -> Any:
        """The training set's per-pixel weight function (picklable for workers), or None."""
        hp = self.hparams
        if not self.pixel_weighting:
            return None
        return functools.partial(
            boundary_weight_map,
            object_class=int(hp.boundary_weight_class),
            w0=float(hp.boundary_weight_w0),
            sigma=float(hp.boundary_weight_sigma),
        )

    def _uint8_batches(self) -> bool:
        """``data.uint8_batches``, by default whether the attached trainer runs on CUDA."""
        if self.uint8_batches is not None:
            return bool(self.uint8_batches)
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return False
        try:
            return trainer.strategy.root_device.type == "cuda"
        except (AttributeError, RuntimeError):  # no strategy set up yet
            return False

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise a uint8 image batch where it now is (the GPU), and make a uint8 mask batch
        int64 there; float32 images and int64 masks pass.

        Args:
            batch: ``{"image": uint8 or float32 (N, C, H, W), "mask": uint8 or int64 (N, H,
                W), ...}`` on the device.
            dataloader_idx: Unused.

        Returns:
            The batch with a float32 normalised ``image`` and an int64 ``mask``.
        """
        if not isinstance(batch, dict):
            return batch
        image, mask = batch.get("image"), batch.get("mask")
        if image is not None and image.dtype == torch.uint8:
            batch["image"] = normalize_uint8_batch(image, self.mean, self.std)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
            batch["mask"] = mask.long()
        return batch

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

    def _loader(self, dataset: Any, *, train: bool) -> DataLoader:
        """A DataLoader over ``dataset``.

        Training: an :class:`EpochSampler` (order from ``(seed, epoch)``, sharded over ranks) in
        a :class:`ResumableDataLoader`. Val/test: an :class:`UnrepeatedSampler` (each image on
        exactly one rank). Every loader has its own ``generator``, so creating iterators
        never draws from the global torch RNG (which would make resumed runs diverge).
        """
        hint = (
            "set data.crop_size so training crops share one size"
            if train
            else "set data.ignore_index or data.eval_batch_size=1"
        )
        bs = self.batch_size if train else self.eval_batch_size
        if bs > 1 and self.ignore_index is None and not (train and self.train_crop_size):
            self._check_one_mask_size(dataset, train)
        common: dict[str, Any] = {
            "batch_size": bs,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "collate_fn": PadCollate(
                self.ignore_index, hint=hint,
                normalize_uint8=functools.partial(normalize_uint8_batch, mean=self.mean,
                                                  std=self.std),
                ring=self._batch_ring() if train else self._eval_batch_ring(dataset),
            ),
            "worker_init_fn": (
                functools.partial(seed_worker, niceness=self.worker_niceness)
                if self.num_workers > 0 else None
            ),
        }
        world, rank = self._replicas()
        generator = torch.Generator().manual_seed(int(self.hparams.seed))
        if train:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                   seed=int(self.hparams.seed),
                                   samples_per_epoch=self.samples_per_epoch)
            loader = ResumableDataLoader(
                dataset, sampler=sampler, drop_last=len(sampler) > bs, generator=generator,
                **common,
            )
            loader.next_epoch_expected = self._next_epoch_expected
            return loader
        if 0 < len(dataset) < world:
            # A process with no image stops Lightning ("zero length"): in fit, the few val
            # images are shared round (some scored twice); a test or validate is refused.
            if self._stage() != "fit":
                raise DataSplitError(
                    f"the split to score has {len(dataset)} image(s), fewer than the {world} "
                    "processes (trainer.devices x trainer.num_nodes), and each needs one; score "
                    f"it with --trainer.devices {len(dataset)}, or add images")
            rank_zero_warn(
                f"the val split has {len(dataset)} image(s) for {world} processes: each process "
                "needs one, so some are scored twice and the val figures weigh them double")
            sampler = _RoundRobinSampler(len(dataset), rank)
        else:
            sampler = UnrepeatedSampler(dataset, num_replicas=world, rank=rank)
        return SlotDataLoader(dataset, sampler=sampler, drop_last=False, generator=generator,
                              **common)

    def _sharing_batches(self) -> bool:
        return self.shared_batches and self.num_workers > 0 and workers_fork()

    def _ring(self, slot_bytes: int) -> BatchRing | None:
        """Slots of ``slot_bytes`` (plus alignment), one per batch that may be in flight: each
        worker's prefetched ones, and four held by the pin-memory thread and the loop. None
        where they would take more than a sixteenth of the RAM (the pages a slot has held stay
        taken while the loader lives: large rasters' batches cross the ordinary way, which frees
        each after use), or where the system refuses the mapping."""
        slots = self.num_workers * _PREFETCH_FACTOR + 4
        if slots * (slot_bytes + 3 * 64) > ram_bytes() // 16:
            log.info("batches of up to %d MiB: no shared batch slots (%d of them would take "
                     "more than a sixteenth of the RAM)", slot_bytes >> 20, slots)
            return None
        try:
            return BatchRing(slots=slots, slot_bytes=slot_bytes + 3 * 64)
        except OSError as err:  # e.g. strict overcommit refusing the mapping
            _warn_once("no shared batch slots (%s): batches cross tensor by tensor", err)
            return None

    def _batch_ring(self) -> BatchRing | None:
        """Slots for the training batches of forked workers (``shared_batches``), sized for
        the largest crop of the run as float32 images, int64 masks and float32 pixel weights
        (a batch that still does not fit crosses the ordinary way). None without workers, a
        crop or forked workers."""
        crop = max((c for c in (self.train_crop_size, self.hparams.late_crop_size) if c),
                   default=None)
        if not (crop and self._sharing_batches()):
            return None
        per_pixel = 4 * self.in_channels + 8 + (4 if self.pixel_weighting else 0)
        return self._ring(self.batch_size * crop * crop * per_pixel)

    def _eval_batch_ring(self, dataset: Any) -> BatchRing | None:
        """Slots for the val/test batches of forked workers, sized for float32 images and int64
        masks of the largest image among up to 64 of the split's (read from their headers,
        evenly spread; batches of larger ones cross the ordinary way), the images at
        ``eval_resize`` where it is set. None without workers, forked workers or images."""
        samples = list(getattr(dataset, "samples", None) or [])
        if not (samples and self._sharing_batches()):
            return None
        from segpipe.data.io import ImageReadError, image_size

        step = max(1, len(samples) // 64)
        try:
            sizes = [image_size(sample.image) for sample in samples[::step][:64]]
        except ImageReadError:
            return None  # the data check names the file; the batches go the ordinary way
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        resize = self.hparams.eval_resize
        image_pixels = resize[0] * resize[1] if resize is not None else height * width
        return self._ring(self.eval_batch_size * (4 * self.in_channels * image_pixels
                                                  + 8 * height * width))

    def _next_validation_expected(self) -> bool:
        """Whether another validation will come, as far as the trainer says when this one's
        batches run out: none after the run's last epoch (by ``max_epochs``, ``max_steps`` or
        a stop), nor in a sanity check's short pass."""
        trainer = self.trainer
        if trainer is None:
            return True
        return not (trainer.sanity_checking or ends_after_this_epoch(trainer, steps_to_come=0))

    def _next_epoch_expected(self) -> bool:
        """Whether the trainer will train another epoch, as far as it says when this epoch's
        batches run out (its last step not yet taken): then the train loader's workers start
        loading it (:class:`ResumableDataLoader`). A time budget's last epoch is not foreseen
        (loading ahead for it costs the workers a few batches at the run's end)."""
        trainer = self.trainer
        return trainer is None or not ends_after_this_epoch(trainer, steps_to_come=1)

    def _check_one_mask_size(self, dataset: Any, train: bool = False) -> None:
        """Refuse batches of differently sized masks without an ignore index to pad them with
        (val/test; training without a crop size), before any batch is built (in a loader worker
        it was a long traceback). Reads each mask's header once per split."""
        samples = getattr(dataset, "samples", None)
        if not samples:
            return
        from segpipe.data.io import image_size

        first = samples[0].mask
        if first is None:
            return
        size = image_size(first)
        for sample in samples[1:]:
            other = image_size(sample.mask) if sample.mask is not None else size
            if other != size:
                option = (f"data.batch_size {self.batch_size}" if train
                          else f"data.eval_batch_size {self.eval_batch_size}")
                fix = ("data.crop_size (e.g. "
                       f"{min(size + other) // 16 * 16 or min(size + other)}) so that training "
                       "crops share one size, or data.ignore_index (e.g. 255)" if train else
                       "data.ignore_index (e.g. 255) or data.eval_batch_size 1")
                raise ConfigError(
                    f"{option} batches {'training ' if train else ''}masks of different "
                    f"sizes ({first.name} is {size[1]}x{size[0]}, {sample.mask.name} is "
                    f"{other[1]}x{other[0]}), and without "
                    f"data.ignore_index nothing can pad them; set {fix}")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (``drop_last`` when there is more than one batch).

        The order and the augmentation are functions of ``(data.seed, epoch, index)``, so a
        resumed run (also from a mid-epoch checkpoint) trains on exactly the batches the
        uninterrupted run would have.
        """
        return self._loader(self._dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches at native size (padded per batch); none with
        ``data.train_on_val`` in ``fit``."""
        if not self.validates and self._stage() == "fit":
            return []  # type: ignore[return-value]  # Lightning skips an empty list
        loader = self._loader(self._dataset("val"), train=False)
        if self._stage() == "fit" and isinstance(loader, SlotDataLoader):
            # the next validation's first batches load during the training epoch
            loader.restart_when_done = True
            loader.next_pass_expected = self._next_validation_expected
        return loader

    def test_dataloader(self) -> DataLoader:
        """Test batches (val when the data has no test split)."""
        self._splits_for("test")
        return self._loader(self._dataset(self.test_split), train=False)


class _RoundRobinSampler(torch.utils.data.Sampler[int]):
    """One index per process, ``rank % n``: for val splits smaller than the process count."""

    def __init__(self, n: int, rank: int) -> None:
        self.index = rank % n

    def __iter__(self) -> Iterator[int]:
        return iter([self.index])

    def __len__(self) -> int:
        return 1

