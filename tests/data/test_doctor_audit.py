"""`segpipe check-data` (segpipe.data.doctor): findings the mutation audit found untested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segpipe.data import SegmentationDataModule
from segpipe.data.doctor import DataReport, check_data, median_frequency_weights, sniff_masks
from segpipe.data.io import read_mask, write_image, write_mask
from tests.data.synthetic import make_folder_dataset


def _folder(root: Path, **kw) -> Path:
    args = dict(n_train=4, n_val=2, n_test=0, size=(16, 20), num_classes=3, seed=1)
    args.update(kw)
    return make_folder_dataset(root, **args)


def _check(root: Path, **kw) -> DataReport:
    args = dict(num_classes=3)
    args.update(kw)
    return check_data(SegmentationDataModule(root=str(root), **args), sample_size=4,
                      max_workers=1)


def test_median_frequency_weights_use_the_median_not_the_mean() -> None:
    # every class in every image: freq = share of all pixels (0.7, 0.2, 0.1); median 0.2
    counts = np.array([[70, 20, 10], [70, 20, 10]])
    assert median_frequency_weights(counts) == pytest.approx([0.2 / 0.7, 1.0, 2.0])


def test_class_images_count_the_masks_holding_each_class(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    masks = sorted((root / "train" / "masks").glob("*.png"))
    for i, mask in enumerate(masks):  # class 2 in the first mask only, class 1 in two
        labels = np.zeros((16, 20), np.uint8)
        labels[:2, :2] = 2 if i == 0 else 0
        labels[4:6, :] = 1 if i in (1, 2) else 0
        write_mask(mask, labels)
    rep = _check(root)
    assert rep.class_images["train"] == [4, 2, 1]
    assert rep.class_pixels["train"] == [4 * 320 - 80 - 4, 80, 4]
    assert rep.class_frequency("train") == pytest.approx([(1280 - 84) / 1280, 80 / 1280,
                                                          4 / 1280])


def test_a_mask_with_unmapped_values_does_not_stop_the_pixel_counts(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    mask = sorted((root / "train" / "masks").glob("*.png"))[0]
    labels = read_mask(mask).astype(np.uint8)
    labels[0, :3] = 9  # a value data.mask_values does not map
    write_mask(mask, labels)
    rep = _check(root, mask_values={0: 0, 1: 1, 2: 2})
    assert [(p.kind, p.path.name) for p in rep.problems] == [("bad_labels", mask.name)]
    assert "pixel counts skipped" not in " ".join(rep.warnings)
    assert sum(rep.class_pixels["train"]) == 3 * 16 * 20  # the three other masks
    assert rep.class_weights is not None and None not in rep.class_weights


def test_an_image_with_too_many_bands_does_not_stop_the_band_statistics(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", image_ext=".tif")
    odd = sorted((root / "train" / "images").glob("*.tif"))[0]
    write_image(odd, np.zeros((16, 20, 5), np.uint8))
    rep = _check(root)
    assert [(p.kind, p.path.name) for p in rep.problems] == [("channel_mismatch", odd.name)]
    assert "band statistics skipped" not in " ".join(rep.warnings)
    assert rep.band_stats["num_images"] == 3 and rep.band_stats["images_available"] == 3


def test_index_masks_holding_every_class_are_indices_without_an_ignore_index(
        tmp_path: Path) -> None:
    masks = []
    for i in range(2):
        masks.append(write_mask(tmp_path / f"m{i}.png",
                                np.arange(12, dtype=np.uint8).reshape(3, 4) % 3))
    found = sniff_masks(masks, num_classes=3, ignore_index=None)
    assert found["kinds"] == {"indices": 2}
    assert found["verdict"].startswith("class indices, values 0..2")


def test_all_background_masks_are_indices_not_0_255(tmp_path: Path) -> None:
    masks = [write_mask(tmp_path / f"m{i}.png", np.zeros((3, 4), np.uint8)) for i in range(2)]
    found = sniff_masks(masks, num_classes=2, ignore_index=255)
    assert found["kinds"] == {"indices": 2}
    assert not any("0/255" in h for h in found["hints"] + found["warnings"])


def test_an_absent_class_gets_weight_one_in_the_yaml() -> None:
    rep = DataReport(root="r", layout="folder", num_classes=3, class_names=["a", "b", "c"],
                     ignore_index=None, class_weights=[0.5, None, 2.0])
    assert rep.weights_yaml() == "class_weights: [0.5000, 1.0000, 2.0000]"
