"""Per-band statistics (segpipe.data.stats): cases the mutation audit found untested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from segpipe.data.io import write_image
from segpipe.data.stats import band_statistics


def test_min_and_max_of_float_images_leave_nan_out(tmp_path: Path) -> None:
    img = np.arange(1, 13, dtype=np.float32).reshape(3, 4, 1)  # 1..12
    img[0, 0, 0] = np.nan  # the 1
    img[2, 3, 0] = np.nan  # the 12
    st = band_statistics([write_image(tmp_path / "f.tif", img)], in_channels=1)
    assert (st.min, st.max, st.num_pixels) == ([2.0], [11.0], 12)


def test_declared_nodata_is_left_out_of_the_statistics(tmp_path: Path) -> None:
    data = np.full((2, 6, 8), 1000, np.uint16)
    data[1] = 3000
    data[:, :2] = 0  # nodata in every band
    with rasterio.open(tmp_path / "n.tif", "w", driver="GTiff", width=8, height=6, count=2,
                       dtype="uint16", nodata=0) as ds:
        ds.write(data)
    st = band_statistics([tmp_path / "n.tif"], in_channels=2)
    assert st.mean == [pytest.approx(1000 / 65535), pytest.approx(3000 / 65535)]
    assert st.num_pixels == 4 * 8 and st.min == st.mean
