"""Prediction settings a checkpoint must restore: the per-image input normalisation the task
was trained with, and checkpoint paths under the home folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.predict import Segmenter
from segpipe.predict.checkpoint import load_predictor, save_predict_checkpoint

NET = {"class_path": "tests.predict.nets.PointwiseNet", "init_args": {"in_channels": 3, "num_classes": 3}}


def test_per_image_input_norm_is_restored_for_prediction(tmp_path: Path) -> None:
    """A task trained with ``input_norm: per_image`` standardises each image itself; the
    rebuilt network must do so too, so an image and a brighter, higher-contrast copy of it
    (an affine change of every band) get the same logits."""
    ckpt = save_predict_checkpoint(tmp_path / "pi.ckpt", net=NET, input_norm="per_image")
    task, cfg = load_predictor(ckpt)
    assert cfg.input_norm == "per_image"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(x * 3.0 + 0.5), task(x), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_under_the_home_folder_loads_with_a_tilde(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``~/run/m.ckpt`` (a path from a config file or a Python string, which no shell expands)
    is the checkpoint in the home folder, for load_predictor and Segmenter alike, and
    ``Segmenter.predict("~/img.png", tile=...)`` reads the image there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    save_predict_checkpoint(tmp_path / "run" / "m.ckpt", net=NET)
    task, cfg = load_predictor("~/run/m.ckpt")
    assert cfg.num_classes == 3 and Path(cfg.checkpoint) == tmp_path / "run" / "m.ckpt"
    from PIL import Image

    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "img.png")
    seg = Segmenter.from_checkpoint("~/run/m.ckpt", device="cpu")
    mask = seg.predict("~/img.png", tile=32)
    assert mask.shape == (32, 40) and not (tmp_path / "~").exists()


def test_an_image_under_the_home_folder_is_predicted_without_a_tile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Segmenter.predict("~/img.png")`` with no tile reads the image in the home folder, as
    it does with a tile."""
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save_predict_checkpoint(tmp_path / "m.ckpt", net=NET)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "img.png")
    assert Segmenter.from_checkpoint(tmp_path / "m.ckpt", device="cpu").predict(
        "~/img.png").shape == (32, 40)


@pytest.mark.parametrize("classes, dtype, nodata", [(255, np.uint8, 255), (256, np.uint16, 65535)])
def test_masks_of_more_than_255_classes_keep_nodata_apart(classes: int, dtype, nodata: int) -> None:
    """Label 255 is the nodata value of uint8 masks, so a model of 256 classes (whose last class
    is 255) writes uint16 masks with nodata 65535."""
    from segpipe.data.spec import DataSpec
    from segpipe.predict.checkpoint import PredictConfig

    cfg = PredictConfig.from_spec(DataSpec.create(classes))
    assert cfg.mask_dtype == np.dtype(dtype) and cfg.nodata_value == nodata
    assert cfg.nodata_value >= classes and cfg.palette().shape == (nodata + 1, 3)
