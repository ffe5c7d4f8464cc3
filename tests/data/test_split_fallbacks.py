"""Fallback val splits keep data to train on."""

from __future__ import annotations

from pathlib import Path


from segpipe.data import SegmentationDataModule
from tests.data.synthetic import make_isbi_like


def test_isbi_val_fraction_fallback_leaves_a_slice_for_training(tmp_path: Path) -> None:
    """With few ISBI slices and no val folder, the last round(val_fraction * n) slices go to
    val but at least one stays in train (as the folder layout's and LGG's held-out splits
    do), instead of failing with an error about data.val_slices, which was not set."""
    root = make_isbi_like(tmp_path / "isbi", n_slices=2, size=(8, 8))
    dm = SegmentationDataModule(str(root), layout="isbi", num_classes=2,
                                mask_values={0: 0, 255: 1}, in_channels=1, val_fraction=0.75)
    assert len(dm.splits["train"]) == 1 and len(dm.splits["val"]) == 1
