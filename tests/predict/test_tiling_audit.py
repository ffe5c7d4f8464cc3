"""Sliding-window edge cases: which files are predicted by windows, bad tile sizes and
model outputs, and tiny batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from segpipe.data.io import probe_raster
from segpipe.predict.tiling import (
    TensorSource,
    predict_tiled,
    raster_by_windows,
    sliding_window_blocks,
    tile_starts,
)


def _pointwise(k: int = 3, c: int = 3):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, k, 1)
    return lambda x: conv(x).softmax(1)


def _tif(path: Path, height: int, width: int, georeferenced: bool) -> Path:
    geo = {"crs": "EPSG:32633", "transform": from_origin(500000, 4000000, 10, 10)} if georeferenced else {}
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1,
                       dtype="uint8", **geo) as ds:
        ds.write(np.zeros((1, height, width), np.uint8))
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_which_rasters_are_predicted_by_windows(tmp_path: Path) -> None:
    """Without an eval resize every raster goes by windows; with one, only georeferenced
    rasters larger than the chip size do (a chip exactly that size is resized whole, as
    ``segpipe test`` scores it), and never a TIFF without georeference."""
    chip = _tif(tmp_path / "chip.tif", 20, 24, georeferenced=True)
    scene = _tif(tmp_path / "scene.tif", 20, 25, georeferenced=True)
    plain = _tif(tmp_path / "plain.tif", 20, 25, georeferenced=False)
    info = {p.stem: probe_raster(p) for p in (chip, scene, plain)}
    assert all(raster_by_windows(i, False, 24) for i in info.values())
    assert not raster_by_windows(info["chip"], True, 24)
    assert raster_by_windows(info["scene"], True, 24)
    assert not raster_by_windows(info["plain"], True, 24)
    assert not raster_by_windows(None, False, 24)


def test_a_tile_smaller_than_one_pixel_is_refused() -> None:
    """A tile size of 0 is an error, not a grid of tiles that never advance."""
    with pytest.raises(ValueError, match="tile must be >= 1"):
        tile_starts(100, 0, 0.25)


def test_a_model_returning_the_wrong_shape_is_a_clear_error() -> None:
    """A probability function giving another number of classes (a one-channel output would
    broadcast over all of them) or another size than the tiles is reported, not blended."""
    fn = _pointwise(k=3)
    x = torch.randn(3, 40, 40)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 16, 16\)"):
        predict_tiled(x, _pointwise(k=1), 3, 16, 0.25)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 16, 16\)"):
        predict_tiled(x, lambda t: fn(t)[..., :8, :8], 3, 16, 0.25)


@torch.no_grad()
def test_a_batch_size_below_one_still_predicts_one_tile_at_a_time() -> None:
    """A batch size of 0 runs one tile per call instead of failing."""
    fn = _pointwise()
    x = torch.randn(3, 40, 50)
    calls: list[int] = []
    blocks = list(sliding_window_blocks(TensorSource(x), fn, 3, 16, 0.25, batch_size=0,
                                        on_tiles=calls.append))
    assert blocks and set(calls) == {1}
    torch.testing.assert_close(predict_tiled(x, fn, 3, 16, 0.25, batch_size=0),
                               fn(x[None])[0], atol=1e-5, rtol=0)
