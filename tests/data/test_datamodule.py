"""SegmentationDataModule: batch contract, splits, loaders and the pre-flight check."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.data import DataCheckError, SegmentationDataModule, check_samples, scan_folder
from segpipe.data.checks import class_pixel_counts
from segpipe.data import PadCollate, default_class_colors, default_num_workers
from segpipe.data.io import write_image, write_mask
from segpipe.errors import ConfigError
from tests.data.synthetic import (
    make_camvid_like,
    make_folder_dataset,
    make_isbi_like,
    make_lgg_like,
    synthetic_mask_colors,
)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("folder") / "ds", n_train=6, n_val=3,
                               n_test=2, size=(40, 48), num_classes=3)


def _dm(root: Path, **kw) -> SegmentationDataModule:
    kw.setdefault("num_workers", 0)
    return SegmentationDataModule(str(root), **kw)


def _check_batch(batch: dict, n: int, c: int, hw: tuple[int, int]) -> None:
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (n, c, *hw)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (n, *hw)
    assert isinstance(batch["path"], list) and len(batch["path"]) == n
    assert all(isinstance(p, str) for p in batch["path"])


def test_default_workers_leave_the_training_threads_their_cores(monkeypatch) -> None:
    from segpipe.data import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "available_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_num_workers() == 0  # both cores train: load between steps
    monkeypatch.setattr(loading, "available_cpus", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_num_workers() == 4  # hyper-threads the training threads leave free, at most 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "available_cpus", lambda: 3)
    assert default_num_workers() == 2  # a GPU trains; all but one CPU load
    monkeypatch.setattr(loading, "available_cpus", lambda: 16)
    assert default_num_workers() == 8  # at most 8 (4 starved a GPU training a U-Net 64)


def test_defaults_and_hparams(folder_root: Path) -> None:
    dm = SegmentationDataModule(str(folder_root), num_classes=3)
    assert dm.class_names == ["class_0", "class_1", "class_2"]
    assert dm.class_colors == default_class_colors(3) == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert dm.mean == [0.485, 0.456, 0.406] and dm.std == [0.229, 0.224, 0.225]
    assert dm.num_workers == default_num_workers()
    assert dm.pin_memory == torch.cuda.is_available()
    assert dm.hparams.root == str(folder_root) and dm.hparams.num_classes == 3
    assert dm.hparams.layout == "folder" and dm.hparams.ignore_index is None
    assert len(set(map(tuple, default_class_colors(40)))) == 40
    with pytest.raises(ValueError, match="class_names"):
        SegmentationDataModule("x", num_classes=3, class_names=["a"])
    with pytest.raises(ValueError, match=r"data.class_names names \['obj'\] more than once"):
        SegmentationDataModule("x", num_classes=3, class_names=["bg", "obj", "obj"])
    colours = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [9, 9, 9]]
    with pytest.raises(ValueError, match=r"colour\(s\) \[\[9, 9, 9\]\] would be class\(es\) \[3\]"):
        SegmentationDataModule("x", num_classes=3, mask_colors=colours, ignore_index=None)
    # the colour after the classes may be the ignored one (e.g. a void colour)
    SegmentationDataModule("x", num_classes=3, mask_colors=colours, ignore_index=3)
    with pytest.raises(ValueError, match=r"data.mask_values maps to \[7\]"):
        SegmentationDataModule("x", num_classes=3, mask_values={0: 0, 255: 7})
    with pytest.raises(ValueError, match="mean/data.std"):
        SegmentationDataModule("x", in_channels=1, mean=[0.1, 0.2, 0.3], std=[0.1, 0.1, 0.1])
    # one without the other was completed with a default std (0.25 where the images' was 0.1)
    with pytest.raises(ValueError, match="data.mean is given without data.std: "):
        SegmentationDataModule("x", in_channels=1, mean=[0.9])
    with pytest.raises(ValueError, match="data.std is given without data.mean: "):
        SegmentationDataModule("x", in_channels=1, std=[0.1])
    # it named a "(height, width)" form the option does not take, and no data. prefix
    with pytest.raises(ValueError, match=r"data.crop_size must be a positive number of pixels "
                       r"\(the side of a square crop; null: whole images\), got 0"):
        SegmentationDataModule("x", crop_size=0)


def test_from_checkpoint_rebuilds_the_recorded_settings(folder_root: Path, tmp_path: Path) -> None:
    recorded = dict(_dm(folder_root, num_classes=3, crop_size=32, seed=4).hparams)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {},
                "datamodule_hyper_parameters": {**recorded, "_private": 1}}, ckpt)
    same = SegmentationDataModule.from_checkpoint(ckpt)
    assert same.hparams["root"] == str(folder_root) and same.hparams["seed"] == 4
    assert same.hparams["crop_size"] == 32 and "_private" not in same.hparams
    moved = SegmentationDataModule.from_checkpoint(ckpt, root=tmp_path / "elsewhere")
    assert moved.hparams["root"] == str(tmp_path / "elsewhere") and moved.hparams["seed"] == 4
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"bare\.ckpt records no data settings"):
        SegmentationDataModule.from_checkpoint(tmp_path / "bare.ckpt")
    with pytest.raises(FileNotFoundError, match="give a .ckpt file written by `segpipe fit`"):
        SegmentationDataModule.from_checkpoint(tmp_path / "missing.ckpt")


def test_fit_batches_follow_contract(folder_root: Path) -> None:
    dm = _dm(folder_root, num_classes=3, batch_size=4, crop_size=32, ignore_index=255)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert train.drop_last is True
    batch = next(iter(train))
    _check_batch(batch, 4, 3, (32, 32))
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    val = next(iter(dm.val_dataloader()))
    _check_batch(val, 3, 3, (40, 48))  # native size, not padded to a multiple
    assert not dm.val_dataloader().drop_last


def test_test_loader(folder_root: Path) -> None:
    dm = _dm(folder_root, num_classes=3, eval_batch_size=2)
    dm.setup("test")
    _check_batch(next(iter(dm.test_dataloader())), 2, 3, (40, 48))


def test_val_fallback_and_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=10, n_val=0, n_test=0, size=(16, 16))
    dm = _dm(root, num_classes=3, val_fraction=0.2, seed=1, batch_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "holding out 2 of 10 train samples (data.val_fraction=0.2, data.seed=1)" in caplog.text
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    dm2 = _dm(root, num_classes=3, val_fraction=0.2, seed=1)
    dm2.setup("fit")
    assert dm2.splits["val"] == val  # seeded
    with caplog.at_level(logging.WARNING):
        dm.setup("test")
    assert "no test split" in caplog.text
    assert dm.test_split == "val"
    assert len(next(iter(dm.test_dataloader()))["path"]) == 2
    dm3 = _dm(root, num_classes=3, val_fraction=0.2, limit_samples=3)
    dm3.setup("fit")
    assert len(dm3.splits["train"]) == 3 and len(dm3.splits["val"]) == 2


def test_preflight_check_counts_the_selected_bands(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32),
                               channels=5, image_ext=".tif")
    with pytest.raises(DataCheckError, match="5 channels but data.in_channels=3"):
        _dm(root, num_classes=3, in_channels=3).setup("fit")
    dm = _dm(root, num_classes=3, in_channels=3, bands=[4, 2, 1], batch_size=2)
    dm.setup("fit")  # the check's own fix: pick 3 of the 5 bands
    assert next(iter(dm.train_dataloader()))["image"].shape[1] == 3


def test_preflight_check_warns_of_colours_missing_from_the_table(tmp_path: Path, caplog) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32),
                               mask_mode="rgb")
    dm = _dm(root, num_classes=2, ignore_index=255, mask_colors=synthetic_mask_colors(3)[:2],
             batch_size=2)
    with caplog.at_level(logging.WARNING, logger="segpipe.data.datamodule"):
        dm.setup("fit")  # trains as configured, with class 2's pixels ignored
    (message,) = [r.getMessage() for r in caplog.records if "not in data.mask_colors" in r.getMessage()]
    r, g, b = synthetic_mask_colors(3)[2]
    assert re.match(rf"data check: \[train, val\] \d masks: mask colours \[{r}, {g}, {b}\] ", message)
    assert "read as ignore_index=255" in message
    assert (next(iter(dm.train_dataloader()))["mask"] == 255).any()


def test_preflight_check_refuses_nan_pixels(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(24, 32))
    image = np.random.default_rng(0).random((24, 32, 3)).astype(np.float32)
    image[3, 4, 1] = np.nan
    image[5, 6, 0] = np.inf
    bad = root / "train" / "images" / "img_000.tif"
    (root / "train" / "images" / "img_000.png").unlink()
    write_image(bad, image)
    with pytest.raises(DataCheckError, match=r"\[train\] 1 image: NaN or infinite pixel values "
                                             r"\(.*img_000\.tif\) -> fix: replace them"):
        _dm(root, num_classes=3).setup("fit")


def test_mask_suffix_pairs_masks_named_after_their_image(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32))
    for mask in root.rglob("masks/*.png"):
        mask.rename(mask.with_name(mask.stem + "_mask.png"))
    with pytest.raises(DataCheckError) as exc:
        _dm(root, num_classes=3).setup("fit")
    assert "no mask found" in str(exc.value) and "no matching image" in str(exc.value)
    assert "set data.mask_suffix: '_mask'" in str(exc.value)
    dm = _dm(root, num_classes=3, mask_suffix="_mask", batch_size=2)
    dm.setup("fit")
    pairs = [(s.image.stem, s.mask.stem) for s in dm.splits["train"]]
    assert len(pairs) == 4 and all(m == f"{i}_mask" for i, m in pairs)
    with pytest.raises(ValueError, match="data.mask_suffix applies to the 'folder' layout"):
        _dm(root, num_classes=3, layout="camvid", mask_suffix="_L")


def test_an_ignore_index_among_the_classes_is_refused_with_a_fix_that_works(
        folder_root: Path) -> None:
    """Such a class was dropped from mIoU but counted as 0 in mDice and the per-image scores;
    the message names a mapping that gives the other classes 0..C-2, and that mapping works."""
    _dm(folder_root, num_classes=3, ignore_index=255)
    with pytest.raises(ConfigError) as err:
        _dm(folder_root, num_classes=3, ignore_index=0)
    message = str(err.value)
    assert "data.ignore_index 0 is one of the classes 0..2" in message
    assert "data.mask_values '{0: 255, 1: 0, 2: 1}'" in message
    assert "data.num_classes 2 and data.ignore_index 255" in message
    # composed with the user's own table (masks stored as 0/128/255), or for colour masks
    with pytest.raises(ConfigError, match=r"data.mask_values '\{0: 0, 128: 1, 255: 255\}'"):
        _dm(folder_root, num_classes=3, ignore_index=2, mask_values={0: 0, 128: 1, 255: 2})
    with pytest.raises(ConfigError, match=r"leave its colour \[0, 0, 255\] out of data.mask_colors"):
        _dm(folder_root, num_classes=3, ignore_index=2,
            mask_colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]])
    dm = _dm(folder_root, num_classes=2, ignore_index=255, mask_values={0: 255, 1: 0, 2: 1})
    dm.setup("fit")
    mask = next(iter(dm.train_dataloader()))["mask"]
    assert set(mask.unique().tolist()) <= {0, 1, 255}
    # Two classes: the remap left one class, which data.num_classes then refused.
    with pytest.raises(ConfigError) as err:
        _dm(folder_root, num_classes=2, ignore_index=0)
    assert "ignoring one leaves nothing to tell apart" in str(err.value)
    assert "num_classes 1" not in str(err.value)


def test_train_without_drop_last_and_workers(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(16, 16))
    dm = _dm(root, num_classes=3, batch_size=4, num_workers=1, crop_size=16)
    assert dm.persistent_workers
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.drop_last is False and loader.num_workers == 1
    _check_batch(next(iter(loader)), 2, 3, (16, 16))


class _WorkerState(torch.utils.data.Dataset):
    """Reports, from inside a DataLoader worker, its nice value."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return os.nice(0)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX nice values")
def test_workers_run_at_lower_priority(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(16, 16))
    assert _dm(root, num_classes=3).worker_niceness == (0 if torch.cuda.is_available() else 10)
    dm = _dm(root, num_classes=3, num_workers=1, worker_niceness=5)
    dm.setup("fit")
    worker_init = dm.train_dataloader().worker_init_fn  # what the real loaders' workers run
    assert worker_init is not None
    loader = torch.utils.data.DataLoader(_WorkerState(), num_workers=1, worker_init_fn=worker_init)
    (nice,) = [int(item) for item in loader]
    assert nice == os.nice(0) + 5
    with pytest.raises(ValueError, match="worker_niceness must be in 0..19"):
        _dm(root, num_classes=3, worker_niceness=20)


def test_elastic_reaches_the_training_pipeline_only(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(32, 32))
    dm = _dm(root, num_classes=3, elastic=5.0)
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.datasets["train"].transform.transforms]
    assert "GridElastic" in names
    assert "GridElastic" not in [type(t).__name__ for t in dm.datasets["val"].transform.transforms]
    with pytest.raises(ValueError, match="data.elastic is a displacement in pixels"):
        _dm(root, num_classes=3, elastic=-1.0)


def _brightness_by_max(dm: SegmentationDataModule) -> bool:
    (jitter,) = [t for t in dm.datasets["train"].transform.transforms
                 if type(t).__name__ == "RandomBrightnessContrast"]
    return bool(jitter.brightness_by_max)


def test_brightness_jitter_follows_the_images_not_where_the_statistics_came_from(
        tmp_path: Path) -> None:
    """Pasting the mean/std that `check-data` prints (as it advises) made the jitter absolute:
    shifts of 0.2 of the dtype's maximum on reflectance bands that span 0.02-0.09, up to 25
    standard deviations, and a much worse model, in silence."""
    four = make_folder_dataset(tmp_path / "four", n_train=3, n_val=1, n_test=0, size=(32, 32),
                               channels=4, image_ext=".tif")
    measured = _dm(four, num_classes=3, in_channels=4)
    measured.setup("fit")
    assert measured.spec.stats_source == "measured" and not _brightness_by_max(measured)
    given = _dm(four, num_classes=3, in_channels=4, mean=measured.mean, std=measured.std)
    given.setup("fit")
    assert given.spec.stats_source == "config" and not _brightness_by_max(given)
    rgb = make_folder_dataset(tmp_path / "rgb", n_train=3, n_val=1, n_test=0, size=(32, 32))
    for kw in ({}, {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]}):  # 8-bit RGB: by the max
        dm = _dm(rgb, num_classes=3, **kw)
        dm.setup("fit")
        assert _brightness_by_max(dm) and "_HueSaturationValueRGB" in _names(dm)
    # Three bands picked from a 16-bit product are no RGB photo: no hue/saturation jitter.
    rng = np.random.default_rng(0)
    for path in sorted((four / "train" / "images").glob("*.tif")):
        write_image(path, rng.integers(0, 10000, (32, 32, 4), dtype=np.uint16))
    picked = _dm(four, num_classes=3, in_channels=3, bands=[4, 2, 1])
    picked.setup("fit")
    assert not _brightness_by_max(picked) and "_HueSaturationValueRGB" not in _names(picked)


def _names(dm: SegmentationDataModule) -> list[str]:
    return [type(t).__name__ for t in dm.datasets["train"].transform.transforms]


def test_statistics_in_raw_units_for_integer_images_are_refused(tmp_path: Path) -> None:
    """Reflectance x 10000 statistics pasted from a GIS normalised every pixel of uint16 images
    to about -2 and the model learnt nothing, in silence."""
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(16, 16))
    rng = np.random.default_rng(0)
    for path in sorted((root / "train" / "images").glob("*.png")):
        path.unlink()
        write_image(path.with_suffix(".tif"), rng.integers(0, 10000, (16, 16, 3), dtype=np.uint16))
    raw = _dm(root, num_classes=3, mean=[2998.9, 3060.9, 1451.9], std=[1396.1, 1539.8, 530.0])
    with pytest.raises(ConfigError, match=r"look like raw pixel values, but segpipe divides "
                                          r"uint16 images by 65535"):
        raw.setup("fit")
    scaled = _dm(root, num_classes=3, mean=[0.08, 0.08, 0.08], std=[0.04, 0.04, 0.04])
    scaled.setup("fit")  # statistics of the scaled images: fine


def test_validate_and_test_score_with_the_checkpoints_statistics(folder_root: Path) -> None:
    """Other data.mean/data.std given to `segpipe test` scored the model on inputs it never
    saw (test mIoU 0.45 against 0.96), without a word; predict normalises as trained."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    saved = {"spec": {"mean": [0.3, 0.4, 0.5], "std": [0.1, 0.2, 0.3], "stats_source": "measured"}}
    for fn, adopted in ((TrainerFn.TESTING, True), (TrainerFn.VALIDATING, True),
                        (TrainerFn.FITTING, False)):  # a resumed fit keeps what it is given
        dm = _dm(folder_root, num_classes=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        dm.setup("test" if fn == TrainerFn.TESTING else "validate")
        dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        if adopted:
            with pytest.warns(UserWarning, match=r"trained with data.mean \[0.3, 0.4, 0.5\] and "
                              r"data.std \[0.1, 0.2, 0.3\], but this run gives .* scoring with "
                              "the checkpoint's"):
                dm.load_state_dict(saved)
        else:
            dm.load_state_dict(saved)
        expected = [0.3, 0.4, 0.5] if adopted else [0.5, 0.5, 0.5]
        assert dm.mean == expected
        assert all(d.mean == expected for d in dm.datasets.values())


def test_channel_gain_reaches_the_training_pipeline_only(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=0, size=(32, 32))
    dm = _dm(root, num_classes=3, channel_gain=(0.5, 2.0))
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.datasets["train"].transform.transforms]
    assert "MultiplicativeNoise" in names
    assert "MultiplicativeNoise" not in [type(t).__name__
                                         for t in dm.datasets["val"].transform.transforms]
    with pytest.raises(ValueError, match=r"data.channel_gain must be \[low, high\]"):
        _dm(root, num_classes=3, channel_gain=(2.0, 0.5))


def test_boundary_weights_reach_training_batches_only(tmp_path: Path) -> None:
    from segpipe.data.transforms import boundary_weight_map

    # Cells (class 1) separated by one-pixel membranes (class 0), as ISBI's slices.
    root = make_isbi_like(tmp_path / "isbi", n_slices=6, size=(32, 40))
    isbi = dict(layout="isbi", num_classes=2, in_channels=1, mask_values={0: 0, 255: 1},
                val_slices=[4, 6])
    dm = _dm(root, **isbi, batch_size=2, crop_size=24, boundary_weight_class=1,
             boundary_weight_w0=7.0, boundary_weight_sigma=2.0)
    dm.setup("fit")
    assert dm.pixel_weighting
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, 2, 1, (24, 24))
    assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (2, 24, 24)
    for mask, weight in zip(batch["mask"], batch["weight"]):  # computed on the augmented crop
        expected = boundary_weight_map(mask.numpy(), object_class=1, w0=7.0, sigma=2.0)
        np.testing.assert_allclose(weight.numpy(), expected)
    assert batch["weight"].max() > 1
    assert "weight" not in next(iter(dm.val_dataloader()))
    assert not _dm(root, **isbi).pixel_weighting
    with pytest.raises(ValueError, match="data.boundary_weight_class is the class whose regions"):
        _dm(root, **isbi, boundary_weight_class=2)
    with pytest.raises(ValueError, match="data.boundary_weight_sigma > 0"):
        _dm(root, **isbi, boundary_weight_class=1, boundary_weight_sigma=0.0)


def test_pad_collate_pads_pixel_weights_with_zero() -> None:
    items = [
        {"image": torch.ones(3, 4, 5), "mask": torch.ones(4, 5, dtype=torch.int64),
         "weight": torch.full((4, 5), 2.0), "path": "a"},
        {"image": torch.ones(3, 6, 3), "mask": torch.ones(6, 3, dtype=torch.int64),
         "weight": torch.full((6, 3), 3.0), "path": "b"},
    ]
    out = PadCollate(255)(items)
    assert out["weight"].shape == (2, 6, 5)
    assert out["weight"][0, 5, 0] == 0 and out["weight"][0, 3, 4] == 2
    assert out["weight"][1, 0, 4] == 0 and out["weight"][1, 5, 2] == 3


def test_pad_collate() -> None:
    items = [
        {"image": torch.ones(3, 4, 5), "mask": torch.ones(4, 5, dtype=torch.int64), "path": "a"},
        {"image": torch.ones(3, 6, 3), "mask": torch.ones(6, 3, dtype=torch.int64), "path": "b"},
    ]
    out = PadCollate(255)(items)
    assert out["image"].shape == (2, 3, 6, 5) and out["mask"].shape == (2, 6, 5)
    assert out["mask"][0, 5, 0] == 255 and out["image"][0, :, 5, 0].eq(0).all()
    assert out["mask"][1, 0, 4] == 255 and out["mask"][1, 5, 2] == 1
    assert out["path"] == ["a", "b"]
    with pytest.raises(ValueError, match="data.ignore_index or data.eval_batch_size=1"):
        PadCollate(None)(items)


def test_pad_collate_batches_native_masks_of_one_size_beside_resized_images() -> None:
    """An evaluation resize: (4, 4) images, their (8, 8) native masks; no padding, so no
    ignore index is needed (LGG's eval_resize once failed here: 'different sizes')."""
    items = [{"image": torch.full((3, 4, 4), float(i)), "mask": torch.full((8, 8), i),
              "size": torch.tensor([8, 8]), "path": str(i)} for i in range(2)]
    out = PadCollate(None)(items)
    assert out["image"].shape == (2, 3, 4, 4) and out["mask"].shape == (2, 8, 8)
    assert out["mask"][1].eq(1).all() and out["image"][1].eq(1).all()
    assert out["size"].tolist() == [[8, 8], [8, 8]]
    items[1]["mask"] = torch.ones(8, 6, dtype=torch.int64)  # masks differ: padding needed
    with pytest.raises(ValueError, match=r"\(8, 6\).*data.ignore_index or data.eval_batch"):
        PadCollate(None)(items)


@pytest.mark.parametrize("channels_last", [True, False])
def test_pad_collate_layout_and_values(channels_last: bool) -> None:
    rng = torch.Generator().manual_seed(0)
    hwc = torch.randn(5, 6, 3, generator=rng)
    items = [
        {"image": hwc.permute(2, 0, 1), "mask": torch.full((5, 6), 2), "path": "a"},  # HWC memory
        {"image": torch.randn(3, 5, 6, generator=rng), "mask": torch.ones(5, 6, dtype=torch.int64),
         "path": "b"},  # CHW memory
    ]
    out = PadCollate(255, channels_last=channels_last)(items)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out["image"].is_contiguous(memory_format=fmt) and out["mask"].is_contiguous()
    for i, item in enumerate(items):
        assert torch.equal(out["image"][i], item["image"]) and torch.equal(out["mask"][i], item["mask"])


def test_batches_from_a_worker_are_channels_last(folder_root: Path) -> None:
    dm = _dm(folder_root, num_classes=3, batch_size=2, num_workers=1, crop_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.int64


def test_eval_pads_mixed_sizes(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=2, n_test=0, size=(16, 16))
    write_image(root / "val/images/big.png", np.zeros((20, 24, 3), np.uint8))
    write_mask(root / "val/masks/big.png", np.zeros((20, 24), np.uint8))
    dm = _dm(root, num_classes=3, ignore_index=255, eval_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    _check_batch(batch, 3, 3, (20, 24))
    dm = _dm(root, num_classes=3, eval_batch_size=3)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"big.png is 24x20, img_000.png is 16x16\), and without "
                       "data.ignore_index nothing can pad them"):
        next(iter(dm.val_dataloader()))


def test_eval_resize_resizes_val_images_but_keeps_each_mask_native(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=2, n_test=0, size=(16, 16))
    big = np.zeros((20, 24), np.uint8)
    big[:, 12:] = 2
    write_image(root / "val/images/big.png", np.zeros((20, 24, 3), np.uint8))
    write_mask(root / "val/masks/big.png", big)
    dm = _dm(root, num_classes=3, ignore_index=255, eval_batch_size=3, eval_resize=[8, 12])
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (3, 3, 8, 12)  # what the network sees
    assert batch["mask"].shape == (3, 20, 24)  # the largest mask, the others padded (ignored)
    big_i = next(i for i, p in enumerate(batch["path"]) if p.endswith("big.png"))
    assert torch.equal(batch["mask"][big_i], torch.from_numpy(big).long())  # not resampled
    assert batch["size"].tolist() == [[20, 24] if i == big_i else [16, 16] for i in range(3)]
    small = 1 - big_i if big_i < 2 else 0
    assert batch["mask"][small, 16:].eq(255).all() and batch["mask"][small, :, 16:].eq(255).all()
    train = next(iter(dm.train_dataloader()))  # training crops: image and mask alike, no size
    assert train["image"].shape[-2:] == train["mask"].shape[-2:] and "size" not in train
    dm = _dm(root, num_classes=3, eval_batch_size=3, eval_resize=[8, 12])  # no ignore index
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"big.png is 24x20.*set data.ignore_index \(e.g. 255\) "
                       "or data.eval_batch_size 1"):
        next(iter(dm.val_dataloader()))
    (root / "val/images/big.png").unlink()  # masks of one size: no ignore index needed
    (root / "val/masks/big.png").unlink()
    dm = _dm(root, num_classes=3, eval_batch_size=3, eval_resize=[8, 12])
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 12) and batch["mask"].shape == (2, 16, 16)


@pytest.mark.parametrize("asked_after_setup", [False, True])
def test_test_images_can_be_kept_native_for_multiscale_views(tmp_path: Path,
                                                             asked_after_setup: bool) -> None:
    """model.test_tta_scales asks for native test images (asked after setup, as the task asks
    in its own setup, or before): masks and "size" as with the resize, the val split resized
    as before when test has a split of its own."""
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=2, n_test=2, size=(16, 20))
    dm = _dm(root, num_classes=3, eval_batch_size=2, eval_resize=[8, 12])
    if not asked_after_setup:
        dm.keep_test_images_native()
    dm.setup("test")
    if asked_after_setup:
        dm.keep_test_images_native()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 20) and batch["mask"].shape == (2, 16, 20)
    assert batch["size"].tolist() == [[16, 20]] * 2
    resized = _dm(root, num_classes=3, eval_batch_size=2, eval_resize=[8, 12])
    resized.setup("test")
    plain = next(iter(resized.test_dataloader()))
    assert plain["image"].shape == (2, 3, 8, 12) and torch.equal(plain["mask"], batch["mask"])
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["image"].shape == (2, 3, 8, 12)


def test_missing_root_and_empty_split(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "nope", num_classes=2)
    with pytest.raises(FileNotFoundError, match=r"nope.*'folder' layout expects"):
        dm.setup("fit")
    (tmp_path / "empty/train/images").mkdir(parents=True)
    (tmp_path / "empty/val/images").mkdir(parents=True)
    dm = _dm(tmp_path / "empty", num_classes=2)
    with pytest.raises(ValueError, match=r"train/images: the 'train' split has no samples"):
        dm.setup("fit")


def _broken_dataset(root: Path) -> Path:
    make_folder_dataset(root, n_train=4, n_val=2, n_test=0, size=(16, 16), num_classes=3)
    (root / "train/masks/img_000.png").unlink()                         # missing mask
    write_mask(root / "train/masks/stray.png", np.zeros((16, 16), np.uint8))  # orphan
    (root / "train/masks/img_001.png").write_bytes(b"")                 # unreadable mask
    write_mask(root / "train/masks/img_002.png", np.zeros((8, 16), np.uint8))  # size mismatch
    write_mask(root / "val/masks/img_000.png", np.full((16, 16), 9, np.uint8))  # bad labels
    (root / "val/images/img_001.png").write_text("not a png")          # unreadable image
    return root


def test_checker_reports_everything_at_once(tmp_path: Path) -> None:
    root = _broken_dataset(tmp_path / "bad")
    dm = _dm(root, num_classes=3)
    with pytest.raises(DataCheckError) as exc:
        dm.setup("fit")
    msg = str(exc.value)
    kinds = {p.kind for p in exc.value.problems}
    assert kinds == {"missing_mask", "orphan_mask", "unreadable_mask", "size_mismatch",
                     "bad_labels", "unreadable_image"}
    for path in ("train/images/img_000.png", "train/masks/stray.png",
                 "train/masks/img_001.png", "train/masks/img_002.png",
                 "val/masks/img_000.png", "val/images/img_001.png"):
        assert str(root / path) in msg
    assert "file is empty (0 bytes)" in msg and "label values [9] outside 0..2" in msg
    assert "add the mask" in msg and "re-export" in msg and "data.ignore_index" in msg
    # validate only checks the val split
    with pytest.raises(DataCheckError) as exc:
        _dm(root, num_classes=3).setup("validate")
    assert {p.split for p in exc.value.problems} == {"val"}
    # check_data=False skips the check
    _dm(root, num_classes=3, check_data=False).setup("fit")


def test_checker_listing_is_capped(tmp_path: Path) -> None:
    from segpipe.data.checks import Problem

    problems = [Problem(tmp_path / f"{i}.png", "train", "missing_mask", "no mask") for i in
                range(60)]
    msg = str(DataCheckError(problems))
    assert "60 problem(s) in 60 file(s)" in msg and "... and 10 more" in msg
    assert str(tmp_path / "49.png") in msg and str(tmp_path / "50.png") not in msg


def test_check_samples_direct_and_pixel_counts(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=0, n_test=0, size=(16, 16),
                               num_classes=2, mask_mode="binary")
    scan = scan_folder(root)
    bad = check_samples(scan, num_classes=2, max_workers=1)
    assert {p.kind for p in bad} == {"bad_labels"}  # 255 without mapping
    assert check_samples(scan, num_classes=2, mask_values={0: 0, 255: 1}) == []
    # 255 ignored: the foreground is never seen, an error worded for this cause
    only_bg = check_samples(scan, num_classes=2, ignore_index=255)
    assert [p.kind for p in only_bg] == ["too_few_classes"]
    assert "hold 0 and 255 only" in only_bg[0].message
    counts = class_pixel_counts(scan["train"], 2, mask_values={0: 0, 255: 1})
    assert counts.sum() == 3 * 16 * 16 and counts[1] > 0


def test_other_layouts_give_batches(tmp_path: Path) -> None:
    camvid = make_camvid_like(tmp_path / "camvid", n_train=3, n_val=2, size=(24, 32),
                              num_classes=4, void_index=4)
    dm = _dm(camvid, layout="camvid", num_classes=4, ignore_index=4, batch_size=2,
             crop_size=16)
    dm.setup("fit")
    _check_batch(next(iter(dm.train_dataloader())), 2, 3, (16, 16))
    assert 4 in next(iter(dm.val_dataloader()))["mask"].unique().tolist()

    lgg = make_lgg_like(tmp_path / "lgg", n_patients=3, slices_per_patient=2, size=(16, 16),
                        with_excluded=True)
    dm = _dm(lgg, layout="lgg", num_classes=2, mask_values={0: 0, 255: 1}, batch_size=2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4 and len(dm.splits["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, 2, 3, (16, 16))
    assert set(batch["mask"].unique().tolist()) <= {0, 1}

    isbi = make_isbi_like(tmp_path / "isbi", n_slices=6, size=(16, 16))
    dm = _dm(isbi, layout="isbi", num_classes=2, in_channels=1, mask_values={0: 0, 255: 1},
             batch_size=2, val_slices=[4, 6])
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4 and len(dm.splits["val"]) == 2
    _check_batch(next(iter(dm.train_dataloader())), 2, 1, (16, 16))
    dm = _dm(isbi, layout="isbi", num_classes=2, in_channels=1, mask_values={0: 0, 255: 1},
             val_fraction=0.2)
    dm.setup("fit")  # fewer than 24 slices: the last val_fraction of the slices
    assert [Path(s.image).name for s in dm.splits["val"]] == ["05.png"]


def test_late_crop_switches_once_and_survives_a_checkpoint(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=1, n_test=0, size=(40, 40))
    kw = {"num_classes": 3, "batch_size": 2, "crop_size": 16, "late_crop_size": 24,
          "late_crop_start": 0.5}
    dm = _dm(root, **kw)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape[-2:] == (16, 16)
    assert not dm.update_train_crop(0.49)
    assert dm.update_train_crop(0.5) and not dm.update_train_crop(0.9)  # once
    assert next(iter(dm.train_dataloader()))["image"].shape[-2:] == (24, 24)
    assert next(iter(dm.val_dataloader()))["image"].shape[-2:] == (40, 40)  # eval keeps sizes
    resumed = _dm(root, **kw)
    resumed.setup("fit")  # Lightning sets up before it restores the checkpoint's state
    resumed.load_state_dict(dm.state_dict())
    assert next(iter(resumed.train_dataloader()))["image"].shape[-2:] == (24, 24)
    assert _dm(root, **kw).train_crop_size == 16
    with pytest.raises(ValueError, match="data.late_crop_size .* needs data.crop_size set"):
        _dm(root, num_classes=3, late_crop_size=24)
    with pytest.raises(ValueError, match="no smaller than it"):
        _dm(root, num_classes=3, crop_size=32, late_crop_size=24)
    with pytest.raises(ValueError, match=r"data.late_crop_start is a fraction .* \(0, 1\)"):
        _dm(root, num_classes=3, crop_size=16, late_crop_size=24, late_crop_start=1.0)


def test_crop_focus_places_training_crops_on_named_classes(tmp_path: Path) -> None:
    """data.crop_focus_classes by name: every training crop (focus_p 1) holds the 3x3 blob of
    the rare class, which uniform 16-px crops of the 64-px images mostly miss; bad settings are
    refused with the fix."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=1, n_test=0, size=(64, 64))
    for i, path in enumerate(sorted((root / "train" / "masks").glob("*.png"))):
        mask = np.zeros((64, 64), np.uint8)
        mask[5 + 12 * i : 8 + 12 * i, 50:53] = 2
        Image.fromarray(mask).save(path)
    kw = {"num_classes": 3, "class_names": ["bg", "fg", "rare"], "batch_size": 4,
          "crop_size": 16, "scale": [1.0, 1.0], "check_data": False}

    def rare_pixels(dm: SegmentationDataModule) -> list[int]:
        dm.setup("fit")
        return [int(n) for epoch in range(3) for batch in dm.train_dataloader()
                for n in (batch["mask"] == 2).flatten(1).sum(1)]

    assert rare_pixels(_dm(root, crop_focus_classes=["rare"], crop_focus_p=1.0, **kw)) == [9] * 12
    assert sum(n > 0 for n in rare_pixels(_dm(root, **kw))) < 6
    dm = _dm(root, crop_focus_classes=[2, "rare", "1"], **kw)
    assert dm.crop_focus_classes == (2, 1) and dm.hparams.crop_focus_p == 0.33
    with pytest.raises(ValueError, match="needs data.crop_size"):
        _dm(root, num_classes=3, crop_focus_classes=[2])
    with pytest.raises(ValueError, match="'cyclist', which is not in data.class_names"):
        _dm(root, **{**kw, "crop_focus_classes": ["cyclist"]})
    with pytest.raises(ValueError, match="lists 3, which is not a class"):
        _dm(root, **{**kw, "crop_focus_classes": [3]})
    with pytest.raises(ValueError, match=r"crop_focus_p .* in \(0, 1\]"):
        _dm(root, **{**kw, "crop_focus_classes": [2], "crop_focus_p": 0.0})


def test_fewer_val_images_than_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process without an image stops Lightning: fit shares the few round, test refuses."""
    from types import SimpleNamespace

    from segpipe.data.datamodule import DataSplitError

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=1, n_test=0, size=(16, 16))
    dm = _dm(root, num_classes=3)
    dm.setup("fit")
    for fn, rank in (("fit", 0), ("fit", 1)):
        trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                  state=SimpleNamespace(fn=SimpleNamespace(value=fn)))
        monkeypatch.setattr(dm, "trainer", trainer, raising=False)
        with pytest.warns(UserWarning, match="some are scored twice"):
            batches = list(dm.val_dataloader())
        assert [len(b["path"]) for b in batches] == [1]  # every process has the one image
    trainer.state.fn.value = "validate"
    with pytest.raises(DataSplitError, match="fewer than the 2 processes .* --trainer.devices 1"):
        dm.val_dataloader()


def _replace_pair(root: Path, split: str, name: str, size: tuple[int, int]) -> None:
    """Rewrite one folder-layout pair at another ``(height, width)``: noise, an all-0 mask."""
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    write_image(root / split / "images" / name, image)
    write_mask(root / split / "masks" / name, np.zeros(size, dtype=np.uint8))


def test_differently_sized_eval_masks_without_an_ignore_index_are_refused_up_front(
        tmp_path: Path) -> None:
    """They failed in the collate, inside a loader worker: a 60-line traceback."""
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=3, size=(16, 16))
    _replace_pair(root, "test", "img_001.png", (12, 20))
    dm = _dm(root, num_classes=3, ignore_index=None, eval_batch_size=2)
    dm.setup("test")
    with pytest.raises(ConfigError, match=r"img_000.png is 16x16, img_001.png is 20x12\), and "
                       r"without data.ignore_index nothing can pad them; set data.ignore_index"):
        dm.test_dataloader()
    _dm(root, num_classes=3, ignore_index=None, eval_batch_size=1).test_dataloader()
    _dm(root, num_classes=3, ignore_index=255, eval_batch_size=2).test_dataloader()


def test_differently_sized_training_masks_without_crop_or_ignore_index_are_refused_up_front(
        tmp_path: Path) -> None:
    """Training batches of them failed in the collate at the first step: a 64-line traceback."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(48, 64))
    _replace_pair(root, "train", "img_001.png", (40, 56))
    dm = _dm(root, num_classes=3, ignore_index=None, batch_size=2, crop_size=None)
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"data.batch_size 2 batches training masks of different "
                       r"sizes \(img_000.png is 64x48, img_001.png is 56x40\).*set "
                       r"data.crop_size \(e.g. 32\)"):
        dm.train_dataloader()
    dm = _dm(root, num_classes=3, ignore_index=None, batch_size=2, crop_size=32)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))


def test_one_class_is_refused_first_with_the_binary_setup(folder_root: Path) -> None:
    """num_classes 1 with 0/255 masks was told its mask_values map outside 0..0."""
    with pytest.raises(ConfigError, match=r"data.num_classes must be >= 2 \(background counts "
                       r"as a class\), got 1; a binary task is data.num_classes 2"):
        _dm(folder_root, num_classes=1, mask_values={0: 0, 255: 1})


def test_the_training_images_dtype_is_recorded_in_the_spec(tmp_path: Path) -> None:
    """Prediction warns of inputs of another dtype (scaled otherwise) from this."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(16, 16))
    dm = _dm(root, num_classes=3)
    assert dm.spec.input_dtype is None
    dm.setup("fit")
    assert dm.spec.input_dtype == "uint8"
    rng = np.random.default_rng(0)
    (root / "train" / "images" / "img_000.png").unlink()
    write_image(root / "train" / "images" / "img_000.tif",
                rng.integers(0, 65535, (16, 16, 3), dtype=np.uint16))
    dm = _dm(root, num_classes=3)
    dm.setup("fit")
    assert dm.spec.input_dtype is None  # mixed: not known, nothing will be said


def test_fit_stops_when_the_training_masks_leave_one_class(tmp_path: Path) -> None:
    """0/255 masks with ignore_index 255 (the folder config's default): fit trained a model that
    never saw the foreground and saved it, silently (check-data only warned)."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=2, n_test=0, size=(16, 16),
                               num_classes=2, mask_mode="binary")
    dm = _dm(root, num_classes=2, ignore_index=255, batch_size=2)
    with pytest.raises(DataCheckError, match=r"hold 0 and 255 only.*mask_values: \{0: 0, 255: 1\}"):
        dm.setup("fit")
    dm = _dm(root, num_classes=2, ignore_index=None, mask_values={0: 0, 255: 1}, batch_size=2)
    dm.setup("fit")  # mapped: both classes present


def test_a_class_without_a_training_pixel_is_warned_about(tmp_path: Path, caplog) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=2, n_test=0, size=(16, 16),
                               num_classes=3)
    dm = _dm(root, num_classes=4, batch_size=2, class_names=["a", "b", "c", "d"])
    with caplog.at_level("WARNING", logger="segpipe"):
        dm.setup("fit")
    assert "class(es) d have no training pixel" in caplog.text


def _reflectance_tile(path: Path, seed: int, nodata_rows: int, partial_rows: int = 0) -> None:
    """A float32 reflectance (0-1) GeoTIFF, its first rows the declared nodata -9999, and the
    ``partial_rows`` after them -9999 in the first band only."""
    import rasterio

    rng = np.random.default_rng(seed)
    data = rng.uniform(0.1, 0.9, (3, 16, 16)).astype(np.float32)
    data[:, :nodata_rows] = -9999.0
    data[0, nodata_rows:nodata_rows + partial_rows] = -9999.0
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=3,
                       dtype="float32", nodata=-9999.0) as ds:
        ds.write(data)


def test_declared_nodata_in_training_rasters_is_no_data(tmp_path: Path) -> None:
    """Scene-edge tiles with nodata -9999: the measured mean was -1666 and std 3726, so every
    real pixel reached the network as about 0.447, and the nodata strip was trained on with
    its labels; predict treats the same pixels as nodata."""
    root = tmp_path / "ds"
    for split, n in (("train", 3), ("val", 1)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            _reflectance_tile(root / split / "images" / f"t{i}.tif", i, nodata_rows=4)
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 8:] = 1
            write_mask(root / split / "masks" / f"t{i}.png", mask)
    dm = _dm(root, num_classes=2, batch_size=2, crop_size=None, augment="none")
    with pytest.raises(DataCheckError, match=r"\[train, val\] 4 images: nodata pixels .*set "
                       r"data.ignore_index"):
        dm.setup("fit")
    dm = _dm(root, num_classes=2, batch_size=2, crop_size=None, augment="none",
             ignore_index=255)
    dm.setup("fit")
    assert all(0.1 < m < 0.9 for m in dm.mean), dm.mean  # measured on the data pixels only
    item = dm.datasets["train"][0]
    assert item["mask"][:4].eq(255).all() and item["mask"][4:].ne(255).all()
    assert item["image"][:, :4].abs().max() < 1e-5  # the training mean: 0 once normalised


def test_pixels_nodata_in_some_bands_only_are_warned_about_and_left_out_of_the_statistics(
        tmp_path: Path, caplog) -> None:
    """The sentinel of a band nodata at a pixel whose other bands hold data made that band's
    measured mean -689.5 and std 2534 (a valid pixel since one band is: GDAL's rule, which
    predict follows and warns of), without a word from the check; and the class frequencies
    counted the labels under the image's nodata, which training ignores."""
    from segpipe.data.checks import class_pixel_counts

    root = tmp_path / "ds"
    for split, n in (("train", 2), ("val", 1)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            _reflectance_tile(root / split / "images" / f"t{i}.tif", i, nodata_rows=4,
                              partial_rows=3)
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 8:] = 1
            mask[:4] = 1  # under the nodata rows: never trained on
            write_mask(root / split / "masks" / f"t{i}.png", mask)
    dm = _dm(root, num_classes=2, batch_size=2, crop_size=None, augment="none",
             ignore_index=255)
    with caplog.at_level("WARNING", logger="segpipe"):
        dm.setup("fit")
    assert all(0.1 < m < 0.9 for m in dm.mean) and all(s < 0.4 for s in dm.std), (dm.mean, dm.std)
    assert "3 images: pixels nodata in only some of the bands read" in caplog.text
    counts = class_pixel_counts(scan_folder(root)["train"], 2, 255)
    assert counts.tolist() == [2 * 12 * 8, 2 * 12 * 8]  # the 4 nodata rows' class 1 left out


def test_unmapped_mask_values_are_one_cause_with_their_union(tmp_path: Path) -> None:
    """Masks whose stray values differ from file to file (anti-aliased edges) gave one error
    line per mask: thousands of lines for thousands of masks."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(16, 16),
                               num_classes=2, mask_mode="binary")
    for i, mask in enumerate(sorted((root / "train" / "masks").glob("*.png"))):
        m = np.asarray(Image.open(mask)).copy()
        m[0, 0] = 7 + i
        write_mask(mask, m)
    dm = _dm(root, num_classes=2, mask_values={0: 0, 255: 1}, batch_size=2)
    with pytest.raises(DataCheckError) as exc:
        dm.setup("fit")
    assert "1 cause(s)" in str(exc.value)
    assert "3 masks: mask values [7, 8, 9] are not in data.mask_values (known: [0, 255])" in str(
        exc.value)


def test_images_of_several_pixel_types_are_warned_about(tmp_path: Path, caplog) -> None:
    """8-bit PNGs beside 12-bit-in-16-bit TIFFs: ImageNet statistics and input_dtype uint8 were
    decided from the first 3 files, and nothing said the 16-bit ones reach the network ~16x
    darker."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=1, n_test=0, size=(16, 16))
    write_image(root / "train" / "images" / "z.tif",
                np.random.default_rng(0).integers(0, 4096, (16, 16, 3), dtype=np.uint16))
    write_mask(root / "train" / "masks" / "z.png", np.zeros((16, 16), np.uint8))
    dm = _dm(root, num_classes=3, batch_size=2)
    with caplog.at_level("WARNING", logger="segpipe"):
        dm.setup("fit")
    assert "1 image: the images mix pixel types (uint16: 1, uint8: 5); these are uint16 (" \
        in caplog.text and "z.tif)" in caplog.text  # the odd one named (an 8-bit one was)


def test_a_masks_folder_under_another_name_is_named(tmp_path: Path) -> None:
    """Masks in train/labels gave "no mask found" for every image, never naming the folder the
    layout reads."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(16, 16))
    (root / "train" / "masks").rename(root / "train" / "labels")
    dm = _dm(root, num_classes=3, batch_size=2)
    with pytest.raises(DataCheckError) as exc:
        dm.setup("fit")
    assert (f"[train] 3 images: no mask found: {root / 'train' / 'masks'} does not exist (beside "
            "the images: labels/)") in str(exc.value)


def test_a_declared_nodata_of_nan_is_nodata_not_a_bad_value(tmp_path: Path) -> None:
    import rasterio

    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            data = np.random.default_rng(i).uniform(0.1, 0.9, (3, 16, 16)).astype(np.float32)
            data[:, :3] = np.nan
            with rasterio.open(root / split / "images" / f"t{i}.tif", "w", driver="GTiff",
                               width=16, height=16, count=3, dtype="float32",
                               nodata=float("nan")) as ds:
                ds.write(data)
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 8:] = 1
            write_mask(root / split / "masks" / f"t{i}.png", mask)
    dm = _dm(root, num_classes=2, batch_size=2, crop_size=None, augment="none",
             ignore_index=255)
    dm.setup("fit")  # it was refused as "NaN or infinite pixel values"
    item = dm.datasets["train"][0]
    assert item["mask"][:3].eq(255).all() and torch.isfinite(item["image"]).all()


def test_a_smoke_test_on_few_samples_warns_of_missing_classes(tmp_path: Path, caplog) -> None:
    """data.limit_samples reads a few masks, which may hold one class only: a warning there,
    not the too-few-classes error of a whole data set."""
    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=1, n_test=0, size=(16, 16))
    for mask in (root / "train" / "masks").glob("*.png"):
        write_mask(mask, np.zeros((16, 16), np.uint8))
    with pytest.raises(DataCheckError, match="only class_0 has training pixels"):
        _dm(root, num_classes=3, batch_size=2).setup("fit")
    with caplog.at_level("WARNING", logger="segpipe"):
        _dm(root, num_classes=3, batch_size=2, limit_samples=2).setup("fit")
    assert "(in the data.limit_samples=2 read)" in caplog.text


def test_colour_coded_masks_give_the_classes_their_colours() -> None:
    """A model trained on colour-coded masks wrote palette masks, overlays and report pictures
    in the default colours, unlike the user's own masks, unless data.class_colors repeated
    data.mask_colors."""
    colours = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [9, 9, 9]]  # the last: void (ignored)
    dm = SegmentationDataModule("x", num_classes=3, mask_colors=colours, ignore_index=3)
    assert dm.class_colors == colours[:3]
    short = SegmentationDataModule("x", num_classes=3, mask_colors=colours[:2], ignore_index=None)
    assert short.class_colors == [*colours[:2], default_class_colors(3)[2]]
    given = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert SegmentationDataModule("x", num_classes=3, mask_colors=colours, ignore_index=3,
                                  class_colors=given).class_colors == given
    assert SegmentationDataModule("x", num_classes=3).class_colors == default_class_colors(3)


def test_a_mask_named_in_another_letter_case_is_told_apart(tmp_path: Path) -> None:
    """`Train_001.png` for `train_001.png` got the `_mask` suffix advice of other files, and
    after that fix it was still unmatched."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32))
    masks = sorted((root / "train" / "masks").glob("*.png"))
    masks[0].rename(masks[0].with_name(masks[0].stem.upper() + ".png"))
    masks[1].rename(masks[1].with_name(masks[1].stem + "_mask.png"))
    with pytest.raises(DataCheckError) as exc:
        _dm(root, num_classes=3).setup("fit")
    text = str(exc.value)
    upper = masks[0].stem.upper() + ".png"
    assert (f"names differ from their image's or mask's only in letter case (e.g. the mask "
            f"{upper} and the image {masks[0].stem}.png), and names are matched exactly: rename "
            "one side") in text
    line = next(x for x in text.splitlines() if "set data.mask_suffix: '_mask'" in x)
    assert upper not in line, text  # the suffix advice is the other file's alone


def test_many_names_in_another_letter_case_are_one_cause_per_kind(tmp_path: Path) -> None:
    """30 mis-cased pairs were 60 error lines (the fix named each pair); a stem in several
    splits got the hint in one split only."""
    root = make_folder_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=0, size=(16, 16))
    for split in ("train", "val"):
        for image in (root / split / "images").glob("*.png"):
            image.rename(image.with_name(image.stem.upper() + ".PNG"))
    with pytest.raises(DataCheckError) as exc:
        _dm(root, num_classes=3).setup("fit")
    causes = [x for x in str(exc.value).splitlines() if "only in letter case" in x]
    assert len(causes) == 2, str(exc.value)  # the images without a mask, the masks without one
    assert "[train, val] 9 images: no mask found" in causes[0] + causes[1], causes
    assert "[train, val] 9 masks: no matching image" in causes[0] + causes[1], causes


def _deny_listing(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Folders that cannot be listed, as for a user without read permission (tests run as
    root here, where chmod does not stop reading)."""
    denied = {os.path.realpath(f) for f in folders}

    def wrap(real):
        def listing(path="."):
            if os.path.realpath(os.fspath(path)) in denied:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)
        return listing

    monkeypatch.setattr(os, "scandir", wrap(os.scandir))
    monkeypatch.setattr(os, "listdir", wrap(os.listdir))


@pytest.mark.parametrize("side", ["images", "masks"])
def test_a_data_folder_that_cannot_be_listed_is_named_not_its_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: str) -> None:
    """Its files went unfound: an image sub-folder's masks were each "mask has no matching
    image -> add the matching image or delete the mask", a mask sub-folder's images each
    "missing mask"; check-data said the same."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32))
    for kind in ("images", "masks"):
        (root / "train" / kind / "more").mkdir()
        for f in sorted((root / "train" / kind).glob("*.png"))[:2]:
            f.rename(f.parent / "more" / f.name)
    _deny_listing(monkeypatch, root / "train" / side / "more")
    with pytest.raises(DataCheckError) as exc:
        _dm(root, num_classes=3).setup("fit")
    text = str(exc.value)
    assert f"train/{side}/more" in text and "folder cannot be listed (Permission denied)" in text
    assert "chmod a+rx" in text
    assert "no matching image" not in text and "missing mask" not in text, text
    assert "no mask found" not in text, text

    from segpipe.data.doctor import check_data  # check-data names it the same way
    report = check_data(_dm(root, num_classes=3))
    kinds = {p.kind for p in report.problems}
    assert kinds == {"unlisted_folder"}, report.problems


def test_a_split_left_empty_by_a_folder_it_cannot_list_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.data.datamodule import DataSplitError

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(24, 32))
    _deny_listing(monkeypatch, root / "val" / "images")
    with pytest.raises(DataSplitError, match=r"val/images: the folder cannot be listed "
                                             r"\(Permission denied\).*chmod a\+rx"):
        _dm(root, num_classes=3).setup("fit")
