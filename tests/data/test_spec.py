"""The data spec: stated once, measured when needed, saved in the checkpoint, read by predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data import DataSpec, SegmentationDataModule
from segpipe.data.io import read_image, write_image, write_mask
from segpipe.data.spec import default_class_colors, spec_from_legacy
from segpipe.predict.checkpoint import checkpoint_spec, load_predictor
from tests.cli_args import TINY_UNET

#: Reflectance-like 4-band uint16 values (0..10000) per class: far below uint16's maximum, so
#: scaled by 1/65535 they sit at 0.01..0.15 and the 0.5/0.25 default would flatten them.
BAND_LEVELS = np.array([[800, 1200, 600, 3000], [1500, 900, 2500, 700], [4000, 5000, 4500, 9000]])


def make_uint16_tiles(root: Path, n_train: int = 6, n_val: int = 2, size: int = 32) -> Path:
    """``ROOT/{train,val}/{images,masks}``: 4-band uint16 GeoTIFF-like tiles, 3 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            labels = np.zeros((size, size), np.uint8)
            labels[:, size // 3 :] = 1
            labels[size // 2 :, :] = 2
            labels = np.roll(labels, int(rng.integers(0, size)), axis=1)
            image = BAND_LEVELS[labels] + rng.integers(-100, 100, (size, size, 4))
            write_image(root / split / "images" / f"t{i}.tif", image.astype(np.uint16))
            write_mask(root / split / "masks" / f"t{i}.png", labels)
    return root


def test_create_fills_defaults_and_round_trips() -> None:
    spec = DataSpec.create(3, ignore_index=255)
    assert spec.class_names == ["class_0", "class_1", "class_2"]
    assert spec.class_colors == default_class_colors(3) and not spec.has_stats
    assert spec.normalization() == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert DataSpec.from_dict(spec.to_dict()) == spec
    stats = spec.with_stats([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], "measured")
    assert stats.has_stats and stats.stats_source == "measured"
    assert DataSpec.from_dict(stats.to_dict()) == stats
    assert DataSpec.create(2, in_channels=4).resolved().mean == [0.5] * 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_classes": 0}, "data.num_classes must be >= 1"),
        ({"num_classes": 2, "class_names": ["a"]}, "one name per class"),
        ({"num_classes": 2, "class_colors": [[1, 2, 3]]}, "2 RGB triplets"),
        ({"num_classes": 2, "in_channels": 2, "mean": [0.1], "std": [1.0]}, "one per input"),
        ({"num_classes": 2, "in_channels": 1, "mean": [0.1], "std": [0.0]}, "must be > 0"),
        ({"num_classes": 2, "eval_resize": [5]}, "eval_resize"),
    ],
)
def test_bad_specs_name_the_option(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DataSpec.create(**kwargs)


def test_legacy_checkpoint_hyperparameters_give_the_same_spec() -> None:
    spec = spec_from_legacy(
        {"num_classes": 3, "class_names": ["a", "b", "c"], "ignore_index": 255},
        {"num_classes": 3, "in_channels": 4, "bands": [1, 2, 3, 4], "mean": [0.1] * 4,
         "std": [0.2] * 4, "class_colors": [[1, 1, 1], [2, 2, 2], [3, 3, 3]], "root": "x"},
    )
    assert spec is not None
    assert (spec.num_classes, spec.in_channels, spec.bands) == (3, 4, [1, 2, 3, 4])
    assert spec.class_names == ["a", "b", "c"] and spec.ignore_index == 255
    assert spec.mean == [0.1] * 4 and spec.class_colors[2] == [3, 3, 3]


def test_multiband_uint16_statistics_are_measured_on_train(tmp_path: Path) -> None:
    root = make_uint16_tiles(tmp_path / "tiles")
    dm = SegmentationDataModule(str(root), num_classes=3, in_channels=4, batch_size=2,
                                color=False, scale=(1.0, 1.0))
    assert not dm.spec.has_stats
    dm.setup("fit")
    assert dm.spec.stats_source == "measured"
    train = np.stack([
        np.asarray(read_image(s.image), np.float64) / 65535.0
        for s in dm.splits["train"]
    ])
    np.testing.assert_allclose(dm.mean, train.mean(axis=(0, 1, 2)), rtol=0.02)
    np.testing.assert_allclose(dm.std, train.std(axis=(0, 1, 2)), rtol=0.05)
    batch = next(iter(dm.train_dataloader()))
    image = batch["image"]
    assert abs(float(image.mean())) < 0.5 and 0.5 < float(image.std()) < 2  # not at -1.9 ± 0.1
    # A second module (validate/test from a checkpoint) takes the saved statistics.
    other = SegmentationDataModule(str(root), num_classes=3, in_channels=4)
    other.load_state_dict(dm.state_dict())
    assert other.mean == dm.mean and other.spec.stats_source == "measured"


def test_config_statistics_win_and_rgb_uses_the_default(tmp_path: Path) -> None:
    root = make_uint16_tiles(tmp_path / "tiles", n_train=2, n_val=1)
    given = SegmentationDataModule(str(root), num_classes=3, in_channels=4,
                                   mean=[0.1] * 4, std=[0.2] * 4)
    given.setup("fit")
    assert given.mean == [0.1] * 4 and given.spec.stats_source == "config"
    given.load_state_dict({"spec": {**given.spec.to_dict(), "mean": [0.9] * 4}})
    assert given.mean == [0.1] * 4  # what the config states is kept


def test_fit_saves_measured_spec_and_predict_uses_it(tmp_path: Path) -> None:
    from segpipe.cli import main

    root = make_uint16_tiles(tmp_path / "tiles")
    run = tmp_path / "run"
    args = [*TINY_UNET, "--data.in_channels=4", "--data.crop_size=null", "--data.batch_size=2",
            "--data.class_names=[water,field,city]"]
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                 f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1",
                 "--trainer.logger=false", *args]) == 0
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    spec = checkpoint_spec(ckpt)
    assert spec is not None and spec.stats_source == "measured" and spec.in_channels == 4
    assert spec.class_names == ["water", "field", "city"] and max(spec.mean) < 0.2
    assert ckpt["hyper_parameters"]["net"]["init_args"]["in_channels"] == 4  # linked
    task, cfg = load_predictor(ckpt_path)
    assert cfg.mean == spec.mean and cfg.std == spec.std and cfg.class_names == spec.class_names
    assert task.spec == spec
    # segpipe test in a new process normalises with the checkpoint's statistics
    assert main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                 f"--trainer.default_root_dir={run}", "--trainer.logger=false",
                 "--ckpt_path", str(ckpt_path), *args]) == 0


def test_colour_jitter_of_measured_data_is_relative_to_its_range(tmp_path: Path) -> None:
    """Brightness shifts of 0.2 x the dtype maximum would swamp 16-bit reflectance data."""
    root = make_uint16_tiles(tmp_path / "tiles", n_train=4, n_val=1)
    dm = SegmentationDataModule(str(root), num_classes=3, in_channels=4, batch_size=4,
                                scale=(1.0, 1.0), hflip=False)
    dm.setup("fit")
    images = torch.cat([next(iter(dm.train_dataloader()))["image"] for _ in range(4)])
    per_image_mean = images.mean(dim=(1, 2, 3))
    assert float(per_image_mean.abs().max()) < 1.0  # jitter within the data's spread
