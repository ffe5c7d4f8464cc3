"""Output formats, atomic commits, safe paths and windowed TIFF writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from segpipe.data.spec import default_class_colors
from segpipe.data.io import RasterWriter
from segpipe.fileio import TMP_PREFIX
from segpipe.predict.checkpoint import PredictConfig
from segpipe.predict.writers import (
    OutputMeta,
    PredictionWriter,
    RowChunk,
    UnsafeOutputPath,
    blend_overlay,
)


def config(num_classes: int = 3) -> PredictConfig:
    return PredictConfig(
        checkpoint="test.ckpt", num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)],
        class_colors=default_class_colors(num_classes), in_channels=3, bands=None,
        mean=[0.5] * 3, std=[0.25] * 3,
    )


def test_more_than_255_classes_give_uint16_outputs(tmp_path: Path) -> None:
    cfg = config(300)
    assert cfg.mask_dtype == np.uint16 and cfg.nodata_value == 65535
    labels = (np.arange(20 * 30).reshape(20, 30) % 300).astype(np.uint16)
    writer = PredictionWriter(tmp_path, ["mask", "palette", "geotiff"], cfg)
    writer.write("a/img.jpg", ["mask", "palette", "geotiff"], RowChunk(labels), Path("img.jpg"))
    mask = np.asarray(Image.open(tmp_path / "a" / "img.png"))
    assert np.array_equal(mask.astype(np.int64), labels.astype(np.int64))
    colour = np.asarray(Image.open(tmp_path / "a" / "img_palette.png"))
    assert colour.shape == (20, 30, 3)  # no 16-bit palettes: an RGB picture instead
    assert np.array_equal(colour[0, 1], cfg.palette()[1])
    with rasterio.open(tmp_path / "a" / "img.tif") as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 65535
        assert np.array_equal(ds.read(1), labels)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path, ["mask", "geotiff", "probs"], config())
    meta = OutputMeta(Path("x.tif"), 40, 30)
    with pytest.raises(RuntimeError, match="killed"):
        with writer.open("sub/x.tif", ["mask", "geotiff", "probs"], meta) as sink:
            sink.write_rows(0, RowChunk(np.zeros((10, 30), np.uint8),
                                        probs=np.zeros((3, 10, 30), np.uint8)))
            raise RuntimeError("killed")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_rows_must_complete_the_image(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path, ["geotiff"], config())
    with pytest.raises(ValueError, match="rows must be written in order"):
        with writer.open("x.png", ["geotiff"], OutputMeta(Path("x.png"), 40, 30)) as sink:
            sink.write_rows(5, RowChunk(np.zeros((10, 30), np.uint8)))
    assert not list(tmp_path.iterdir())


def test_output_paths_stay_inside_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = PredictionWriter(out, ["mask"], config())
    assert writer.target("a/b/c.jpg", "mask") == out / "a" / "b" / "c.png"
    for bad in ("../escape.png", "/etc/passwd.png", "a/../../x.png"):
        with pytest.raises(UnsafeOutputPath):
            writer.target(bad, "mask")
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeOutputPath, match="outside the output folder"):
        writer.target("link/x.png", "mask")


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        PredictionWriter(tmp_path, ["jpeg"], config())


def test_overlay_blends_and_keeps_nodata() -> None:
    display = np.full((2, 2, 3), 100, np.uint8)
    lut = np.zeros((256, 3), np.uint8)
    lut[1] = (200, 0, 0)
    labels = np.array([[0, 1], [255, 1]])
    out = blend_overlay(display, labels, lut, alpha=0.5, nodata=255)
    assert out[0, 1].tolist() == [150, 50, 50] and out[0, 0].tolist() == [50, 50, 50]
    assert out[1, 0].tolist() == [100, 100, 100]


def test_png_formats_refuse_rasters_above_the_pixel_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    writer = PredictionWriter(tmp_path, ["mask"], config())
    with pytest.raises(ValueError, match="use --format geotiff"):
        with writer.open("x.tif", ["mask"], OutputMeta(Path("x.tif"), 20, 20)):
            pass
    assert not list(tmp_path.iterdir())


def test_raster_writer_rows_in_any_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (2, 300, 70)).astype(np.uint8)
    path = tmp_path / "w.tif"
    with RasterWriter(path, width=70, height=300, count=2, dtype=np.uint8, blocksize=64) as w:
        row = 0
        for n in (1, 63, 64, 100, 50, 22):
            w.write_rows(row, data[:, row : row + n])
            row += n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    with rasterio.open(path) as ds:
        assert np.array_equal(ds.read(), data) and ds.block_shapes[0] == (64, 64)
