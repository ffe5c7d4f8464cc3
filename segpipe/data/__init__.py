"""Data layer: reading images and masks, layouts, augmentation, checks and the data module.

Batch format: ``{"image": float32 (N, C, H, W) normalised, "mask": int64 (N, H, W),
"path": list[str]}``; prediction batches have no ``"mask"`` and add ``"size"`` (N, 2).
"""

from segpipe.data.checks import DataCheckError, Problem, check_samples, class_pixel_counts
from segpipe.data.collate import PadCollate
from segpipe.data.datamodule import SegmentationDataModule
from segpipe.data.loading import default_num_workers
from segpipe.data.spec import DataSpec, default_class_colors, default_class_names, default_mean_std
from segpipe.data.datasets import (
    PredictDataset,
    Sample,
    Scan,
    SegmentationDataset,
    encode_mask,
    find_images,
    scan_camvid,
    scan_folder,
    scan_isbi,
    scan_lgg,
)
from segpipe.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    image_size,
    read_image,
    read_mask,
    to_float,
    write_image,
    write_mask,
)
from segpipe.data.stats import BandStats, band_statistics, needs_measured_stats
from segpipe.data.transforms import (
    build_eval_transform,
    build_train_transform,
    normalize,
    normalize_to_tensor,
)

__all__ = [
    "IMAGE_EXTENSIONS",
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
    "encode_mask",
    "find_images",
    "image_size",
    "needs_measured_stats",
    "normalize",
    "normalize_to_tensor",
    "read_image",
    "read_mask",
    "scan_camvid",
    "scan_folder",
    "scan_isbi",
    "scan_lgg",
    "to_float",
    "write_image",
    "write_mask",
]
