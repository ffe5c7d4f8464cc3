"""Prediction engine: rasters by blocks, nodata and the per-file log (found by a mutation
audit)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from segpipe.predict.checkpoint import load_predictor
from segpipe.predict.engine import ItemResult, WritingCallback
from segpipe.predict.writers import PredictionWriter
from tests.predict.test_command import _fill_disk_after, run, write_geotiff
from tests.predict.test_raster_io import _force_block_cols, _predict, _tif

GEO = {"crs": "EPSG:32633", "transform": from_origin(500000, 4600000, 10, 10)}


def test_a_failed_files_log_line_names_the_file(tmp_path: Path, pointwise_ckpt: Path,
                                                 caplog) -> None:
    """Without a progress bar (a batch job's log) the failure is logged; it must say which
    file failed, not only why."""
    _, cfg = load_predictor(pointwise_ckpt)
    cb = WritingCallback(PredictionWriter(tmp_path, ["mask"], cfg), 1, progress=False)
    cb.on_predict_start(object())
    with caplog.at_level(logging.ERROR, logger="segpipe.predict.engine"):
        cb.write_on_batch_end([ItemResult("in/broken.png", "broken.png", "failed", "0 bytes")])
        cb.on_predict_end()
    assert "failed: in/broken.png: 0 bytes" in caplog.text
    assert cb.summary.failures == [("in/broken.png", "0 bytes")]


def test_the_probs_mask_of_a_raster_blended_in_blocks_is_its_nodata(
        tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In blocks narrower than the raster, a strip whose nodata lies in one block only must
    keep the other blocks valid in the probs file's mask."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 256, (3, 70, 200), dtype=np.uint8)
    data[:, 10:20, 120:150] = 0  # nodata in the second and third blocks of 60 columns only
    (tmp_path / "in").mkdir()
    _tif(tmp_path / "in" / "nd.tif", data, nodata=0, **GEO)
    seen: list[tuple] = []
    _force_block_cols(monkeypatch, 60, seen)
    _predict(pointwise_ckpt, tmp_path / "in", tmp_path / "out", ["geotiff", "probs"])
    assert len({c0 for _, _, c0, _ in seen}) >= 3
    expected = np.ones((70, 200), bool)
    expected[10:20, 120:150] = False
    with rasterio.open(tmp_path / "out" / "nd_probs.tif") as p:
        assert np.array_equal(p.dataset_mask() > 0, expected)
    with rasterio.open(tmp_path / "out" / "nd.tif") as g:
        assert np.array_equal(g.read(1) != 255, expected)


def test_a_rasters_nodata_value_does_not_leak_into_the_predictions_beside_it(
        tmp_path: Path, unet_ckpt: Path) -> None:
    """Nodata pixels are set to the mean before the network sees them; a fill value of 0
    (far below the mean) or 255 changed the masks of the valid pixels around them."""
    rng = np.random.default_rng(4)
    data = rng.integers(1, 255, (3, 64, 96), dtype=np.uint8)
    labels = {}
    for nodata in (0, 255):
        filled = data.copy()
        filled[:, 20:40, 30:60] = nodata
        src = tmp_path / f"in{nodata}"
        src.mkdir()
        _tif(src / "s.tif", filled, nodata=nodata, **GEO)
        _predict(unet_ckpt, src, tmp_path / f"out{nodata}", ["geotiff"])
        with rasterio.open(tmp_path / f"out{nodata}" / "s.tif") as ds:
            labels[nodata] = ds.read(1)
    assert (labels[0][20:40, 30:60] == 255).all()
    assert np.array_equal(labels[0], labels[255])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_a_full_disk_mid_batch_counts_the_files_finished_before_it(
        tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Rasters are written from the predict step; r0's outputs were complete when r1
    filled the disk in the same batch, and the summary printed with the error must count it."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        write_geotiff(src / f"r{i}.tif",
                      np.random.default_rng(i).integers(0, 255, (3, 40, 50), np.uint8))
    _fill_disk_after(monkeypatch, out, files=2)  # r0's GeoTIFF and PNG fit
    assert run(pointwise_ckpt, src, out, "--format", "auto", "mask") == 2
    captured = capsys.readouterr()
    assert "predict: 1 written, 0 skipped (already done), 0 failed" in captured.out
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "r0.png", "r0.tif"]


def test_files_written_by_the_writing_threads_count_when_the_run_is_interrupted(
        tmp_path: Path, pointwise_ckpt: Path) -> None:
    """With --write_workers, Ctrl-C (or SIGTERM) may come while finished writes wait to be
    counted; the summary must count every output that was named into place."""
    from segpipe.predict.writers import RowChunk

    _, cfg = load_predictor(pointwise_ckpt)
    writer = PredictionWriter(tmp_path / "out", ["mask"], cfg)
    cb = WritingCallback(writer, 3, progress=False, write_workers=2)
    cb.on_predict_start(object())
    cb.write_on_batch_end([
        ItemResult(str(tmp_path / f"{n}.png"), f"{n}.png", "predicted", formats=["mask"],
                   prediction=RowChunk(np.zeros((8, 8), np.uint8)))
        for n in ("a", "b")])
    cb.on_exception(KeyboardInterrupt())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert (cb.summary.written, cb.summary.failed) == (2, 0)


def test_the_runner_puts_the_training_batchnorm_statistics_back(tmp_path: Path,
                                                                 unet_ckpt: Path) -> None:
    """``bn_adapt`` blends the inputs' statistics in for the run only; a library user who
    runs the same network again (another folder) must start from the training statistics."""
    import torch
    from torch.utils.data import DataLoader

    from segpipe.data.io import write_image
    from segpipe.predict.engine import (InProcessRunner, InputFile, PredictInputs, PredictModule,
                                        PredictOptions, collate_records)
    from tests.predict.conftest import noise_image

    task, cfg = load_predictor(unet_ckpt)
    write_image(tmp_path / "in" / "a.png", noise_image(32, 32))
    writer = PredictionWriter(tmp_path / "out", ["mask"], cfg)
    inputs = PredictInputs([InputFile(tmp_path / "in" / "a.png", Path("a.png"))], writer, cfg)
    module = PredictModule(task, cfg, writer, PredictOptions(bn_adapt=0.5, progress=False))
    stats = {k: v.clone() for k, v in task.net.state_dict().items() if "running_" in k}
    assert stats  # the U-Net keeps BatchNorm statistics
    cb = WritingCallback(writer, 1, progress=False)
    loader = DataLoader(inputs, batch_size=1, collate_fn=collate_records)
    assert InProcessRunner(torch.device("cpu"), "32-true").run(module, cb, loader) is False
    assert cb.summary.written == 1 and module.bn_description
    after = task.net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
