"""Data layer: reading images and masks, layouts, augmentation, checks and the data module.

The package exports what users of segpipe call; the helpers live in the submodules
(:mod:`~segpipe.data.io`, :mod:`~segpipe.data.datasets`, :mod:`~segpipe.data.transforms`, ...).

Batch format: ``{"image": float32 (N, C, H, W) normalised, "mask": int64 (N, H, W),
"path": list[str]}``; prediction batches have no ``"mask"`` and add ``"size"`` (N, 2).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each exported name and the submodule that defines it. Importing ``segpipe.data`` loads none
#: of them: a name is imported on first use, so a command that needs the image readers does
#: not load Lightning (the data module) or albumentations (the transforms).
_EXPORTS: dict[str, str] = {
    "BandStats": "segpipe.data.stats",
    "DataCheckError": "segpipe.data.checks",
    "DataSpec": "segpipe.data.spec",
    "ImageReadError": "segpipe.data.io",
    "PadCollate": "segpipe.data.collate",
    "PredictDataset": "segpipe.data.datasets",
    "Problem": "segpipe.data.checks",
    "Sample": "segpipe.data.datasets",
    "Scan": "segpipe.data.datasets",
    "SegmentationDataModule": "segpipe.data.datamodule",
    "SegmentationDataset": "segpipe.data.datasets",
    "band_statistics": "segpipe.data.stats",
    "build_eval_transform": "segpipe.data.transforms",
    "build_train_transform": "segpipe.data.transforms",
    "check_samples": "segpipe.data.checks",
    "class_pixel_counts": "segpipe.data.checks",
    "default_class_colors": "segpipe.data.spec",
    "default_class_names": "segpipe.data.spec",
    "default_mean_std": "segpipe.data.spec",
    "default_num_workers": "segpipe.data.loading",
    "needs_measured_stats": "segpipe.data.stats",
    "read_image": "segpipe.data.io",
    "read_mask": "segpipe.data.io",
    "scan_camvid": "segpipe.data.datasets",
    "scan_folder": "segpipe.data.datasets",
    "scan_isbi": "segpipe.data.datasets",
    "scan_lgg": "segpipe.data.datasets",
    "write_image": "segpipe.data.io",
    "write_mask": "segpipe.data.io",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'segpipe.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
