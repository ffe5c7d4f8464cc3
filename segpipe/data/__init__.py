"""Data layer: reading images and masks, layouts, augmentation, checks and the data module.

Batch format: ``{"image": float32 (N, C, H, W) normalised, "mask": int64 (N, H, W),
"path": list[str]}``; prediction batches have no ``"mask"`` and add ``"size"`` (N, 2).
"""

from segpipe.data.checks import DataCheckError, Problem, check_samples, class_pixel_counts
from segpipe.data.datamodule import (
    PadCollate,
    SegmentationDataModule,
    default_class_colors,
    default_num_workers,
)
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
from segpipe.data.transforms import (
    build_eval_transform,
    build_train_transform,
    default_mean_std,
    normalize,
    normalize_to_tensor,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataCheckError",
    "ImageReadError",
    "PadCollate",
    "PredictDataset",
    "Problem",
    "Sample",
    "Scan",
    "SegmentationDataModule",
    "SegmentationDataset",
    "build_eval_transform",
    "build_train_transform",
    "check_samples",
    "class_pixel_counts",
    "default_class_colors",
    "default_mean_std",
    "default_num_workers",
    "encode_mask",
    "find_images",
    "image_size",
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
