"""Scanners and data module on the real data sets (``SEGPIPE_DATA_DIR``; skipped without it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data import SegmentationDataModule, read_mask, scan_camvid, scan_isbi, scan_lgg

pytestmark = pytest.mark.realdata


def _subdir(data_dir: Path, name: str) -> Path:
    path = data_dir / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def _check_batch(batch: dict, c: int) -> None:
    n = batch["image"].shape[0]
    assert batch["image"].dtype == torch.float32 and batch["image"].ndim == 4
    assert batch["image"].shape[1] == c
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (
        n, *batch["image"].shape[2:])
    assert len(batch["path"]) == n and all(isinstance(p, str) for p in batch["path"])


def test_camvid(data_dir: Path) -> None:
    root = _subdir(data_dir, "camvid")
    scan = scan_camvid(root)
    assert len(scan["train"]) == 367 and len(scan["val"]) == 101
    assert "test" not in scan and scan.orphans == {}
    samples = scan["train"] + scan["val"]
    assert all(s.mask is not None for s in samples)
    with ThreadPoolExecutor(4) as pool:
        values = set().union(*pool.map(lambda s: set(np.unique(read_mask(s.mask)).tolist()),
                                       samples))
    assert values <= set(range(12))
    dm = SegmentationDataModule(str(root), layout="camvid", num_classes=11, ignore_index=11,
                                batch_size=2, eval_batch_size=2, crop_size=224, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, 3)
    assert batch["image"].shape[2:] == (224, 224)
    val = next(iter(dm.val_dataloader()))
    _check_batch(val, 3)
    assert val["image"].shape[2:] == (360, 480)
    assert set(val["mask"].unique().tolist()) <= set(range(12))


def test_lgg(data_dir: Path) -> None:
    root = _subdir(data_dir, "lgg_mri")
    scan = scan_lgg(root)
    assert len(scan["train"]) == 1095 and len(scan["val"]) == 111
    train_p = {s.image.parent.name for s in scan["train"]}
    val_p = {s.image.parent.name for s in scan["val"]}
    assert len(train_p) == 88 and len(val_p) == 11 and not train_p & val_p
    assert all(s.mask is not None and s.mask.exists() for s in scan["train"] + scan["val"])
    dm = SegmentationDataModule(str(root), layout="lgg", num_classes=2,
                                mask_values={0: 0, 255: 1}, batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, 3)
    assert batch["image"].shape[2:] == (256, 256)
    assert set(batch["mask"].unique().tolist()) <= {0, 1}


def test_isbi(data_dir: Path) -> None:
    root = _subdir(data_dir, "isbi2012_em")
    scan = scan_isbi(root)
    assert len(scan["train"]) == 20 and len(scan["val"]) == 4
    assert [s.image.name for s in scan["val"]] == ["20.png", "21.png", "22.png", "23.png"]
    dm = SegmentationDataModule(str(root), layout="isbi", num_classes=2, in_channels=1,
                                mask_values={0: 0, 255: 1}, batch_size=2, crop_size=256,
                                num_workers=0)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 20 and len(dm.splits["val"]) == 4
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, 1)
    assert batch["image"].shape[2:] == (256, 256)
    val = next(iter(dm.val_dataloader()))
    _check_batch(val, 1)
    assert val["image"].shape[2:] == (512, 512)
    assert set(val["mask"].unique().tolist()) == {0, 1}
