"""Data layer: reading images and masks, layouts, augmentation, checks and the data module.

The package exports what users of segpipe call; the helpers live in the submodules
(:mod:`~segpipe.data.io`, :mod:`~segpipe.data.datasets`, :mod:`~segpipe.data.transforms`, ...).

Batch format: ``{"image": float32 (N, C, H, W) normalised, "mask": int64 (N, H, W),
"path": list[str]}``; prediction batches have no ``"mask"`` and add ``"size"`` (N, 2).
"""

from segpipe.data.checks import DataCheckError, Problem, check_samples, class_pixel_counts
from segpipe.data.collate import PadCollate
from segpipe.data.datamodule import SegmentationDataModule
from segpipe.data.loading import default_num_workers
from segpipe.data.spec import DataSpec, default_class_colors, default_class_names, default_mean_std
from segpipe.data.datasets import PredictDataset, Sample, Scan, SegmentationDataset
from segpipe.data.datasets import scan_camvid, scan_folder, scan_isbi, scan_lgg
from segpipe.data.io import ImageReadError, read_image, read_mask, write_image, write_mask
from segpipe.data.stats import BandStats, band_statistics, needs_measured_stats
from segpipe.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "BandStats",
    "DataCheckError",
    "DataSpec",
    "ImageReadError",
    "PadCollate",
    "PredictDataset",
    "Problem",
    "Sample",
    "Scan",
    "SegmentationDataModule",
    "SegmentationDataset",
    "band_statistics",
    "build_eval_transform",
    "build_train_transform",
    "check_samples",
    "class_pixel_counts",
    "default_class_colors",
    "default_class_names",
    "default_mean_std",
    "default_num_workers",
    "needs_measured_stats",
    "read_image",
    "read_mask",
    "scan_camvid",
    "scan_folder",
    "scan_isbi",
    "scan_lgg",
    "write_image",
    "write_mask",
]
