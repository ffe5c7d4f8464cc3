"""Scanners and SegmentationDataset behaviour found untested by a mutation audit: held-out
sizes, normalisation channel order and the decoded-sample cache with ignored pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segpipe.data.datasets import Sample, SegmentationDataset, scan_folder, scan_lgg
from segpipe.data.io import write_image, write_mask
from tests.data.synthetic import make_folder_dataset, make_lgg_like


def _patients(samples) -> set[str]:
    return {s.image.parent.name for s in samples}


def test_lgg_seeded_holdout_rounds_the_patient_count_and_keeps_one_for_training(
        tmp_path: Path) -> None:
    """The seeded LGG split holds out round(val_fraction * patients) patients (2.7 -> 3, not
    truncated to 2), and never all of them: at least one patient is left to train on."""
    root = make_lgg_like(tmp_path / "lgg", n_patients=9, slices_per_patient=1, size=(8, 8),
                         write_splits_csv=False)
    scan = scan_lgg(root, val_fraction=0.3, seed=1)
    assert len(_patients(scan["val"])) == 3 and len(_patients(scan["train"])) == 6
    small = make_lgg_like(tmp_path / "small", n_patients=3, slices_per_patient=1, size=(8, 8),
                          write_splits_csv=False)
    scan = scan_lgg(small, val_fraction=0.9, seed=0)
    assert len(_patients(scan["val"])) == 2 and len(_patients(scan["train"])) == 1


def test_configured_mean_and_std_apply_per_channel_in_order(tmp_path: Path) -> None:
    """``mean``/``std`` are per channel in the image's channel order (R, G, B): a constant
    image normalises to ``(v - mean[c]) / std[c]`` in channel c."""
    image = np.full((6, 7, 3), 128, dtype=np.uint8)
    write_image(tmp_path / "a.png", image)
    write_mask(tmp_path / "a_mask.png", np.zeros((6, 7), dtype=np.uint8))
    mean, std = [0.1, 0.3, 0.6], [0.5, 0.25, 0.125]
    ds = SegmentationDataset([Sample(tmp_path / "a.png", tmp_path / "a_mask.png")],
                             mean=mean, std=std, in_channels=3, num_classes=2)
    out = ds[0]["image"]
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), (128 / 255 - mean[c]) / std[c], atol=1e-5)


def test_cached_labels_keep_the_ignore_index_and_labels_above_127(tmp_path: Path) -> None:
    """The decoded-sample cache stores labels compactly but losslessly: an item read from the
    cache has the same labels (ignore index 255, classes above 127) as the first read."""
    labels = np.zeros((8, 10), dtype=np.uint8)
    labels[:, :3], labels[:, 3:6], labels[0, 0] = 200, 255, 1
    write_image(tmp_path / "a.png", np.zeros((8, 10, 3), dtype=np.uint8))
    write_mask(tmp_path / "a_mask.png", labels)
    ds = SegmentationDataset([Sample(tmp_path / "a.png", tmp_path / "a_mask.png")],
                             in_channels=3, num_classes=201, ignore_index=255, cache_mb=1)
    first, again = ds[0]["mask"], ds[0]["mask"]
    assert len(ds._cache) == 1  # the second read came from the cache
    assert torch.equal(first, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(again, first)


def test_a_label_equal_to_num_classes_is_out_of_range(tmp_path: Path) -> None:
    """Labels run 0..num_classes-1: a mask whose largest value is exactly num_classes is
    reported (by check_label_range and by the dataset, naming the file), not passed on to
    the loss."""
    import pytest

    from segpipe.data.datasets import check_label_range
    from segpipe.data.io import ImageReadError

    assert check_label_range(np.array([[0, 1], [2, 3]]), 3, None) == [3]
    assert check_label_range(np.array([[0, 1], [2, 3]]), 3, 3) == []
    assert check_label_range(np.array([[0, 1], [2, 2]]), 3, None) == []
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[0, 0] = 3
    write_image(tmp_path / "a.png", np.zeros((6, 6, 3), dtype=np.uint8))
    write_mask(tmp_path / "a_mask.png", labels)
    ds = SegmentationDataset([Sample(tmp_path / "a.png", tmp_path / "a_mask.png")],
                             in_channels=3, num_classes=3)
    with pytest.raises(ImageReadError, match="a_mask.png"):
        ds[0]


def test_rgb_to_grey_uses_luminance_weights_in_rgb_order() -> None:
    """An RGB image fed to a 1-channel model becomes 0.299 R + 0.587 G + 0.114 B (the channels
    in the order read, R first), so pure red is 0.299 and pure blue 0.114."""
    from segpipe.data.datasets import adapt_channels

    image = np.zeros((2, 3, 3), dtype=np.float32)
    image[0, :, 0] = 1.0  # red row
    image[1, :, 2] = 1.0  # blue row
    grey = adapt_channels(image, 1, "x.png")
    assert grey.shape == (2, 3, 1)
    np.testing.assert_allclose(grey[0, :, 0], 0.299, atol=1e-6)
    np.testing.assert_allclose(grey[1, :, 0], 0.114, atol=1e-6)


def test_item_augmentation_depends_on_epoch_and_pass_and_is_reproducible(tmp_path: Path) -> None:
    """An item fetched with an ItemKey is augmented from (seed, epoch, index, pass): the same
    key gives the same crop, another epoch or another pass over the data gives another."""
    from segpipe.data.datasets import ItemKey
    from segpipe.data.transforms import build_train_transform

    root = make_folder_dataset(tmp_path / "ds", n_train=1, n_val=0, n_test=0, size=(48, 48))
    t = build_train_transform("default", crop_size=24, mask_fill=255)
    ds = SegmentationDataset(scan_folder(root)["train"], transform=t, seed=0, in_channels=3,
                             num_classes=3, ignore_index=255)

    def image(**kw) -> torch.Tensor:
        return ds[ItemKey(0, **kw)]["image"]

    base = image(epoch=0, draw=0)
    assert torch.equal(base, image(epoch=0, draw=0))
    assert not any(torch.equal(base, image(epoch=e, draw=0)) for e in (1, 2, 3))
    assert not any(torch.equal(base, image(epoch=0, draw=d)) for d in (1, 2, 3))
