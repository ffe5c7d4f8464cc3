"""Per-band statistics (segpipe.data.stats) on synthetic GeoTIFFs and PNGs written in tmp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.data import ImageReadError
from segpipe.data.datasets import adapt_channels
from segpipe.data.io import read_image, to_float, write_image
from segpipe.data.stats import STD_FLOOR, BandStats, band_statistics, needs_measured_stats

# Reflectance-like 4-band data: 0..10000 stored as uint16, a different level per band.
_BAND_LEVELS = np.array([300, 800, 1500, 4000])


def _reflectance_tifs(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """uint16 4-band GeoTIFFs of different sizes with values in 0..10000."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = 20 + 3 * i, 31 - 2 * i
        img = _BAND_LEVELS + rng.normal(0, 250 * (1 + np.arange(4)), size=(h, w, 4))
        img = np.clip(img, 0, 10000).astype(np.uint16)
        paths.append(write_image(folder / f"refl_{i}.tif", img))
    return paths


def _twelve_bit_pngs(folder: Path, n: int = 3, seed: int = 1) -> list[Path]:
    """Single-band 16-bit PNGs holding 12-bit values (0..4095)."""
    rng = np.random.default_rng(seed)
    return [
        write_image(folder / f"gray12_{i}.png",
                    rng.integers(0, 4096, size=(18 + i, 22), dtype=np.uint16))
        for i in range(n)
    ]


def _reference(paths: list[Path], bands=None, in_channels=None) -> np.ndarray:
    """All pixels of all images after the training conversion, as (P, C) float64."""
    rows = []
    for p in paths:
        img = adapt_channels(to_float(read_image(p, bands)), in_channels, p)
        rows.append(img.reshape(-1, img.shape[2]))
    return np.concatenate(rows).astype(np.float64)


def test_exact_on_uint16_geotiffs(tmp_path: Path) -> None:
    paths = _reflectance_tifs(tmp_path)
    st = band_statistics(paths, bands=None, in_channels=4, max_pixels_per_image=10**6)
    ref = _reference(paths)
    np.testing.assert_allclose(st.mean, ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.std, ref.std(axis=0), rtol=1e-10)
    np.testing.assert_array_equal(st.min, ref.min(axis=0))
    np.testing.assert_array_equal(st.max, ref.max(axis=0))
    assert (st.num_images, st.num_pixels) == (3, len(ref))
    assert st.dtypes == ["uint16"] and st.scale == 65535.0
    # The scaled means sit where the default 0.5 / 0.25 would squash them.
    assert all(0.0 < m < 0.1 for m in st.mean)
    raw = st.raw()
    assert raw is not None
    np.testing.assert_allclose(raw["mean"], ref.mean(axis=0) * 65535, rtol=1e-9)
    assert raw["min"] == [float(v) for v in np.round(ref.min(axis=0) * 65535)]
    assert all(float(v).is_integer() for v in raw["max"])


def test_band_selection_and_channel_adaptation(tmp_path: Path) -> None:
    paths = _reflectance_tifs(tmp_path)
    full = band_statistics(paths, in_channels=4, max_pixels_per_image=10**6)
    picked = band_statistics(paths, bands=[4, 2], in_channels=2, max_pixels_per_image=10**6)
    assert picked.mean == [full.mean[3], full.mean[1]] and picked.std == [full.std[3], full.std[1]]
    with pytest.raises(ImageReadError, match="in_channels=3"):
        band_statistics(paths, in_channels=3)


def test_twelve_bit_pngs_exact(tmp_path: Path) -> None:
    paths = _twelve_bit_pngs(tmp_path)
    assert read_image(paths[0]).dtype == np.uint16
    st = band_statistics(paths, bands=None, in_channels=1, max_pixels_per_image=10**6)
    ref = _reference(paths)
    np.testing.assert_allclose(st.mean, ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.std, ref.std(axis=0), rtol=1e-10)
    assert st.max[0] <= 4095 / 65535 + 1e-9 and st.raw()["max"][0] <= 4095
    # Gray replicated to 3 channels, as the dataset does for in_channels=3.
    rgb = band_statistics(paths, bands=None, in_channels=3, max_pixels_per_image=10**6)
    assert rgb.mean == st.mean * 3 and rgb.std == st.std * 3


def test_pixel_subsampling_is_seeded_and_close(tmp_path: Path) -> None:
    paths = _reflectance_tifs(tmp_path, n=5)
    kw = dict(bands=None, in_channels=4, max_pixels_per_image=200)
    a = band_statistics(paths, seed=3, **kw)
    assert a == band_statistics(paths, seed=3, **kw)  # same call, same numbers
    assert a == band_statistics(paths, seed=3, max_workers=1, **kw)  # thread count irrelevant
    assert a != band_statistics(paths, seed=4, **kw)
    assert a.num_pixels == 5 * 200
    full = band_statistics(paths, in_channels=4, max_pixels_per_image=10**6)
    np.testing.assert_allclose(a.mean, full.mean, rtol=0.05)
    np.testing.assert_allclose(a.std, full.std, rtol=0.15)


def test_evenly_spaced_image_subset(tmp_path: Path) -> None:
    # Image i is constant i * 1000, so the mean says which images were read.
    paths = [write_image(tmp_path / f"c_{i:02d}.tif", np.full((4, 5, 1), i * 1000, np.uint16))
             for i in range(10)]
    st = band_statistics(paths, in_channels=1, max_images=3)
    assert st.num_images == 3
    expected = np.mean([0, 4000, 9000]) / 65535  # first, middle (4.5 rounds to even), last
    assert st.mean[0] == pytest.approx(expected, rel=1e-6)
    assert band_statistics(paths, in_channels=1, max_images=100).num_images == 10


def test_std_is_floored_never_zero(tmp_path: Path) -> None:
    const16 = write_image(tmp_path / "const16.tif", np.full((8, 8, 2), 1234, np.uint16))
    st = band_statistics([const16], in_channels=2)
    assert st.std_floor == pytest.approx(1 / 65535)
    assert st.std == [st.std_floor, st.std_floor]
    const8 = write_image(tmp_path / "const8.png", np.full((8, 8), 7, np.uint8))
    assert band_statistics([const8], in_channels=1).std == [pytest.approx(1 / 255)]
    constf = write_image(tmp_path / "constf.tif", np.full((8, 8, 1), 0.5, np.float32))
    st = band_statistics([constf], in_channels=1)
    assert st.std == [STD_FLOOR] and st.scale == 1.0


def test_float_images_ignore_nan(tmp_path: Path) -> None:
    img = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    img[0, 0, 0] = np.nan
    st = band_statistics([write_image(tmp_path / "f.tif", img)], in_channels=1)
    finite = img[np.isfinite(img)].astype(np.float64)
    assert st.mean[0] == pytest.approx(finite.mean()) and st.std[0] == pytest.approx(finite.std())


def test_mixed_dtypes_have_no_raw_units(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", np.full((4, 4), 255, np.uint8))
    b = write_image(tmp_path / "b.png", np.zeros((4, 4), np.uint16))
    st = band_statistics([a, b], in_channels=1)
    assert st.dtypes == ["uint16", "uint8"] and st.scale is None and st.raw() is None
    assert st.mean == [pytest.approx(0.5)]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        band_statistics([], in_channels=3)
    path = _twelve_bit_pngs(tmp_path, n=1)
    with pytest.raises(ValueError, match="max_images must be an int >= 1"):
        band_statistics(path, max_images=0)
    with pytest.raises(ValueError, match="max_pixels_per_image"):
        band_statistics(path, max_pixels_per_image=0)


def test_yaml_lines_and_json(tmp_path: Path) -> None:
    st = band_statistics(_reflectance_tifs(tmp_path), in_channels=4)
    mean_line, std_line = st.yaml_lines()
    assert mean_line.startswith("mean: [") and std_line.startswith("std: [")
    assert [float(v) for v in mean_line[7:-1].split(",")] == pytest.approx(st.mean, rel=1e-3)
    back = json.loads(json.dumps(st.to_dict()))
    assert back["mean"] == st.mean and back["raw"]["std"] == pytest.approx(st.raw()["std"])
    assert BandStats(**{k: v for k, v in back.items() if k != "raw"}) == st


def test_needs_measured_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb8 = [write_image(tmp_path / f"rgb_{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            for i in range(2)]
    assert needs_measured_stats(rgb8, in_channels=3) is False
    assert needs_measured_stats(rgb8) is False
    assert needs_measured_stats(rgb8, in_channels=1) is True  # RGB -> gray: default is 0.5/0.25
    rgb8_tif = write_image(tmp_path / "rgb8.tif", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert needs_measured_stats([rgb8_tif], in_channels=3) is False
    gray8 = write_image(tmp_path / "gray8.png", np.zeros((8, 8), np.uint8))
    assert needs_measured_stats([gray8], in_channels=3) is True
    assert needs_measured_stats(_reflectance_tifs(tmp_path), in_channels=4) is True
    assert needs_measured_stats(_reflectance_tifs(tmp_path), bands=[3, 2, 1], in_channels=3) is True
    assert needs_measured_stats(_twelve_bit_pngs(tmp_path), in_channels=3) is True
    assert needs_measured_stats([*rgb8, gray8], in_channels=3) is True  # any of the first few
    assert needs_measured_stats([], in_channels=3) is False
