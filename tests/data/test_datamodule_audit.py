"""SegmentationDataModule split behaviour found untested by a mutation audit: held-out sizes
and k-fold partitions."""

from __future__ import annotations

from pathlib import Path

from segpipe.data import SegmentationDataModule
from tests.data.synthetic import make_folder_dataset, make_lgg_like


def test_val_fraction_rounds_the_held_out_count(tmp_path: Path) -> None:
    """Without a val split, round(val_fraction * n) train images are held out (0.3 * 9 = 2.7
    -> 3, not truncated to 2), disjoint from the images left to train on."""
    root = make_folder_dataset(tmp_path / "ds", n_train=9, n_val=0, n_test=0, size=(16, 16))
    dm = SegmentationDataModule(str(root), num_classes=3, val_fraction=0.3, seed=0,
                                num_workers=0)
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(val) == 3 and len(train) == 6
    assert not {s.image for s in train} & {s.image for s in val}


def test_folds_cover_every_case_when_later_folds_are_larger_than_fold_0(tmp_path: Path) -> None:
    """With 10 cases and 4 folds fold 0 takes round(0.25 * 10) = 2 cases and folds 1..3 share
    the other 8 (3, 3, 2): each fold validates on all of its share, so the folds together
    validate every case exactly once."""
    root = make_lgg_like(tmp_path / "lgg", n_patients=10, slices_per_patient=1, size=(8, 8),
                         val_patients=1)
    folds = []
    for k in range(4):
        dm = SegmentationDataModule(str(root), layout="lgg", num_classes=2,
                                    mask_values={0: 0, 255: 1}, val_case_fraction=0.25, fold=k)
        val = {s.case for s in dm.splits["val"]}
        assert not val & {s.case for s in dm.splits["train"]}
        folds.append(val)
    assert sorted(len(f) for f in folds[1:]) == [2, 3, 3] and len(folds[0]) == 2
    assert len(set.union(*folds)) == sum(len(f) for f in folds) == 10


def test_measured_statistics_come_from_the_training_images_only(tmp_path: Path) -> None:
    """Normalisation statistics measured at fit (images that are not 8-bit RGB) are those of
    the train split: val images (here all white) do not enter them."""
    import numpy as np

    from segpipe.data.io import write_image

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(16, 16),
                               channels=4, image_ext=".tif")
    for f in (root / "val" / "images").iterdir():
        write_image(f, np.full((16, 16, 4), 255, dtype=np.uint8))
    dm = SegmentationDataModule(str(root), num_classes=3, in_channels=4, num_workers=0)
    dm.setup("fit")
    assert dm.spec.stats_source == "measured"
    train = dm.datasets["train"]
    pixels = np.stack([train.load(i)[0] for i in range(len(train))])  # as training reads them
    expected = pixels.astype(np.float64).reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(dm.mean, expected, atol=0.02)


def test_mask_values_mapping_to_num_classes_is_refused() -> None:
    """data.mask_values may map raw values to classes 0..num_classes-1 or the ignore index:
    a mapping to num_classes itself (one past the last class) is a configuration error."""
    import pytest

    with pytest.raises(ValueError, match="mask_values"):
        SegmentationDataModule("x", num_classes=3, mask_values={0: 0, 255: 3})
    SegmentationDataModule("x", num_classes=3, mask_values={0: 0, 255: 2})


def test_isbi_without_val_folder_validates_on_the_last_slices(tmp_path: Path) -> None:
    """ISBI with fewer than 24 slices and no val folder validates on the last
    round(val_fraction * n) slices, a contiguous block at the end; the others train."""
    from tests.data.synthetic import make_isbi_like

    root = make_isbi_like(tmp_path / "isbi", n_slices=6, size=(8, 8))
    dm = SegmentationDataModule(str(root), layout="isbi", num_classes=2,
                                mask_values={0: 0, 255: 1}, in_channels=1, val_fraction=0.34)
    assert [s.image.name for s in dm.splits["val"]] == ["04.png", "05.png"]
    assert [s.image.name for s in dm.splits["train"]] == [f"0{i}.png" for i in range(4)]


def test_training_loader_shuffles_each_epoch(tmp_path: Path) -> None:
    """The training loader's order is a seeded permutation per epoch: not the file order, and
    another order in the next epoch."""
    root = make_folder_dataset(tmp_path / "ds", n_train=12, n_val=1, n_test=0, size=(16, 16))
    dm = SegmentationDataModule(str(root), num_classes=3, batch_size=1, num_workers=0)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    first, second = sampler.permutation(0), sampler.permutation(1)
    assert sorted(first) == list(range(12))
    assert first != list(range(12)) and first != second


def test_training_crops_larger_than_the_image_pad_the_mask_with_the_ignore_index(
        tmp_path: Path) -> None:
    """With data.ignore_index, a training crop larger than the image pads the mask with the
    ignore index (the invented pixels are not learnt), not with mirrored labels."""
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(16, 16))
    dm = SegmentationDataModule(str(root), num_classes=3, crop_size=32, ignore_index=255,
                                augment="none", batch_size=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mask = batch["mask"]
    assert mask.shape[-2:] == (32, 32)
    assert int((mask == 255).sum()) == mask.shape[0] * (32 * 32 - 16 * 16)
