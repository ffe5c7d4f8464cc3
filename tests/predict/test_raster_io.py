"""Windowed raster reading (segpipe.data.io.RasterReader / probe_raster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from segpipe.data.io import ImageReadError, open_raster, probe_raster, write_image


def _tif(path: Path, data: np.ndarray, **kw) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, **kw) as ds:
        ds.write(data)
    return path


def test_windows_bands_and_nodata(tmp_path: Path) -> None:
    data = np.arange(4 * 30 * 20, dtype=np.uint16).reshape(4, 30, 20) + 1
    data[:, 5:8, 2:4] = 0
    p = _tif(tmp_path / "a.tif", data, nodata=0, crs="EPSG:4326",
             transform=from_origin(10, 50, 0.1, 0.1))
    info = probe_raster(p)
    assert info is not None and info.georeferenced and (info.width, info.height) == (20, 30)
    with open_raster(p, bands=[3, 1]) as r:
        assert r.channels == 2 and r.has_mask
        pix, valid = r.read(4, 10, 1, 6)
        assert pix.shape == (6, 5, 2) and np.array_equal(pix[..., 0], data[2, 4:10, 1:6])
        assert valid is not None and not valid[1:4, 1:3].any() and valid.sum() == 30 - 6
        pix, valid = r.read(20, 30)
        assert valid is None  # all valid: no mask array
    with pytest.raises(ImageReadError, match="band 5 requested"):
        open_raster(p, bands=[5])


def test_plain_images_are_not_rasters(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    write_image(tmp_path / "y.tif", np.zeros((4, 4, 3), np.uint8))
    assert probe_raster(tmp_path / "x.png") is None
    info = probe_raster(tmp_path / "y.tif")
    assert info is not None and not info.georeferenced
    (tmp_path / "z.tif").write_bytes(b"")
    with pytest.raises(ImageReadError, match="0 bytes"):
        probe_raster(tmp_path / "z.tif")
