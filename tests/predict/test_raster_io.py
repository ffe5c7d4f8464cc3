"""Windowed raster reading (segpipe.data.io.RasterReader / probe_raster), and rasters predicted
block by block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import segpipe.predict.engine as engine
import segpipe.predict.tiling as tiling
from segpipe.data.io import ImageReadError, open_raster, probe_raster, write_image
from segpipe.predict.command import predict


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


def test_nodata_in_some_bands_only_keeps_gdals_rule_and_is_warned_about(tmp_path: Path) -> None:
    """A pixel is nodata when every band read is (GDAL's rule: 0 in one band of a float scene
    with nodata 0 may be real), or when any band is NaN. A float raster whose pixels are nodata
    in some bands only is warned about: a sentinel such as -9999 there enters the network."""
    data = np.full((3, 6, 5), 0.5, np.float32)
    data[0, 1:3, 1:3] = -9999.0  # one band only
    data[:, 0, 4] = -9999.0  # every band
    data[1, 4, 4] = np.nan
    with pytest.warns(UserWarning, match=r"f.tif: some pixels are nodata \(-9999.0\) in only "
                      "some of the bands read"), open_raster(_tif(tmp_path / "f.tif", data,
                                                                  nodata=-9999.0)) as r:
        _, valid = r.read(0, 6)
    expected = np.ones((6, 5), bool)
    expected[0, 4] = expected[4, 4] = False
    assert valid is not None and np.array_equal(valid, expected)
    blue = np.full((3, 6, 5), 100, np.uint8)
    blue[:2, 0, 0] = 0  # (0, 0, 100): a real colour, no warning for integer rasters
    blue[:, 5, 4] = 0  # every band: nodata
    import warnings

    path = _tif(tmp_path / "u.tif", blue, nodata=0)
    with warnings.catch_warnings(record=True) as seen, open_raster(path) as r:
        warnings.simplefilter("always")
        _, valid = r.read(0, 6)
    assert not [w for w in seen if "only some of the bands" in str(w.message)]
    assert valid is not None and valid[0, 0] and not valid[5, 4] and valid.sum() == 29


def test_a_truncated_raster_says_gdals_reason(tmp_path: Path) -> None:
    """rasterio's text pointed at a "previous exception" that is never shown."""
    data = np.random.default_rng(0).integers(0, 255, (3, 600, 600), dtype=np.uint8)
    path = _tif(tmp_path / "t.tif", data, tiled=True, blockxsize=256, blockysize=256)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError) as err, open_raster(path) as r:
        r.read(0, 600)
    assert "TIFFReadEncodedTile" in str(err.value)
    assert "previous exception" not in str(err.value)


def test_plain_images_are_not_rasters(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    write_image(tmp_path / "y.tif", np.zeros((4, 4, 3), np.uint8))
    assert probe_raster(tmp_path / "x.png") is None
    info = probe_raster(tmp_path / "y.tif")
    assert info is not None and not info.georeferenced
    (tmp_path / "z.tif").write_bytes(b"")
    with pytest.raises(ImageReadError, match="0 bytes"):
        probe_raster(tmp_path / "z.tif")


# ------------------------------------------------------------------ prediction by blocks
def _force_block_cols(monkeypatch: pytest.MonkeyPatch, cols: int, seen: list[tuple]) -> None:
    """Make `segpipe predict` blend rasters in blocks of at most ``cols`` columns."""
    original = tiling.sliding_window_blocks

    def blocks(*args, **kwargs):
        kwargs["block_cols"] = cols
        for blk in original(*args, **kwargs):
            seen.append((blk.row0, blk.row1, blk.col0, blk.col1))
            yield blk

    monkeypatch.setattr(engine, "sliding_window_blocks", blocks)


def _predict(ckpt: Path, src: Path, out: Path, formats: list[str]) -> None:
    summary = predict(ckpt, src, out, formats=formats, tile=64, overlap=0.25, batch_size=3,
                      precision="32-true", accelerator="cpu", num_workers=0, progress=False)
    assert summary.written == 1 and not summary.failed, summary.report()


def test_raster_blocks_equal_the_in_memory_sliding_window(
    tmp_path: Path, unet_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GeoTIFF blended in blocks of ≤ 100 columns gives the labels and probabilities of the
    same pixels as a PNG predicted in memory (`predict_tiled`, whole strips)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (3, 150, 330), dtype=np.uint8)
    (tmp_path / "tif").mkdir()
    _tif(tmp_path / "tif" / "scene.tif", data, crs="EPSG:32633",
         transform=from_origin(500000, 4600000, 10, 10))
    write_image(tmp_path / "png" / "scene.png", np.moveaxis(data, 0, -1))
    _predict(unet_ckpt, tmp_path / "png", tmp_path / "whole", ["mask", "probs"])
    seen: list[tuple] = []
    _force_block_cols(monkeypatch, 100, seen)
    _predict(unet_ckpt, tmp_path / "tif", tmp_path / "blocks", ["geotiff", "probs", "mask"])
    assert len({c0 for _, _, c0, _ in seen}) >= 4 and len({r0 for r0, _, _, _ in seen}) >= 3
    with rasterio.open(tmp_path / "blocks" / "scene.tif") as ds:
        labels = ds.read(1)
    with rasterio.open(tmp_path / "blocks" / "scene_probs.tif") as a, \
            rasterio.open(tmp_path / "whole" / "scene_probs.tif") as b:
        pa, pb = a.read().astype(int), b.read().astype(int)
    whole = np.asarray(Image.open(tmp_path / "whole" / "scene.png"))
    assert np.array_equal(labels, whole)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "blocks" / "scene.png")), whole)
    assert np.abs(pa - pb).max() <= 1


def test_raster_blocks_keep_nodata(
    tmp_path: Path, unet_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodata across block edges: 255 labels and zero probabilities there, and the same
    outputs as one block per strip (the row-strip path)."""
    rng = np.random.default_rng(6)
    data = rng.integers(1, 256, (3, 140, 300), dtype=np.uint8)
    data[:, 30:90, 70:160] = 0  # spans strips and blocks
    (tmp_path / "in").mkdir()
    _tif(tmp_path / "in" / "nd.tif", data, nodata=0, crs="EPSG:32633",
         transform=from_origin(500000, 4600000, 10, 10))
    outs = {}
    for cols in (80, 10**6):
        seen: list[tuple] = []
        _force_block_cols(monkeypatch, cols, seen)
        out = tmp_path / f"out{cols}"
        _predict(unet_ckpt, tmp_path / "in", out, ["geotiff", "probs"])
        with rasterio.open(out / "nd.tif") as ds, rasterio.open(out / "nd_probs.tif") as p:
            outs[cols] = (ds.read(1), p.read(), len({c0 for _, _, c0, _ in seen}))
    (lab, probs, nblocks), (lab1, probs1, nblocks1) = outs[80], outs[10**6]
    assert nblocks >= 4 and nblocks1 == 1
    assert (lab[30:90, 70:160] == 255).all() and (probs[:, 30:90, 70:160] == 0).all()
    assert (lab != 255).sum() == lab.size - 60 * 90
    assert np.array_equal(lab, lab1) and np.abs(probs.astype(int) - probs1).max() <= 1


def test_large_rasters_get_overviews_small_ones_none(tmp_path: Path) -> None:
    """GIS viewers draw a raster zoomed out from its overviews; without them QGIS read every
    pixel of a 16384² mask at each redraw (or asked to build them)."""
    import segpipe.data.io as io

    labels = np.repeat(np.arange(8, dtype=np.uint8), 263)[None, None].repeat(40, axis=1)
    for width, expected in ((io.OVERVIEW_MIN_SIZE, []), (2104, [2, 4, 8, 16])):
        path = tmp_path / f"w{width}.tif"
        with io.RasterWriter(path, width=width, height=40, count=1, dtype=np.uint8,
                             overviews="nearest") as writer:
            writer.write_rows(0, labels[..., :width])
        with rasterio.open(path) as ds:
            assert ds.overviews(1) == expected
            if expected:  # nearest: labels, never a blend of two
                assert set(np.unique(ds.read(1, out_shape=(5, width // 16)))) <= set(range(8))
                assert ds.tags(ns="rio_overview") == {"resampling": "nearest"}


def test_predicted_label_rasters_have_overviews_that_keep_nodata(
    tmp_path: Path, unet_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segpipe.data.io as io

    monkeypatch.setattr(io, "OVERVIEW_MIN_SIZE", 100)
    data = np.random.default_rng(3).integers(1, 256, (3, 60, 300), dtype=np.uint8)
    data[:, :, :150] = 0
    (tmp_path / "in").mkdir()
    _tif(tmp_path / "in" / "nd.tif", data, nodata=0, crs="EPSG:32633",
         transform=from_origin(500000, 4600000, 10, 10))
    _predict(unet_ckpt, tmp_path / "in", tmp_path / "out", ["geotiff", "probs"])
    with rasterio.open(tmp_path / "out" / "nd.tif") as ds:
        assert ds.overviews(1) == [2]
        half = ds.read(1, out_shape=(30, 150))
        assert (half[:, :74] == 255).all() and (half[:, 76:] != 255).all()
        assert ds.read(1).shape == (60, 300)  # the overview is beside the data, not instead
    with rasterio.open(tmp_path / "out" / "nd_probs.tif") as ds:
        assert ds.overviews(1) == []  # a third more bytes and time for data read as it is
