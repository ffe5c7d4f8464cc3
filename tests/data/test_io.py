"""Reading images and masks: conversions and plain-language errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from affine import Affine

from segpipe.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    image_size,
    read_image,
    read_mask,
    to_float,
    write_image,
    write_mask,
)


def _noise(h: int, w: int, c: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_extensions() -> None:
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff",
                                     ".gif"}


# ------------------------------------------------------------------ conversions
def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    arr = _noise(5, 7, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    assert image_size(tmp_path / "a.png") == (5, 7)


def test_grayscale_gives_one_channel(tmp_path: Path) -> None:
    arr = _noise(4, 6)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (4, 6, 1)
    np.testing.assert_array_equal(out[:, :, 0], arr)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    arr = _noise(4, 6, 4)
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, arr[:, :, :3])


def test_la_drops_alpha(tmp_path: Path) -> None:
    arr = _noise(4, 6, 2)
    Image.fromarray(arr, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (4, 6, 1)
    np.testing.assert_array_equal(out[:, :, 0], arr[:, :, 0])


def test_palette_image_to_rgb_but_mask_keeps_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0] + [0] * 759)
    img.save(tmp_path / "p.png")
    rgb = read_image(tmp_path / "p.png")
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 1]) == (200, 0, 0)
    mask = read_mask(tmp_path / "p.png")
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, idx)


def test_16bit_png_scaled(tmp_path: Path) -> None:
    arr = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and out.shape == (2, 2, 1)
    np.testing.assert_array_equal(out[:, :, 0], arr)
    f = to_float(out)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f[:, :, 0], arr / 65535.0, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_16bit_rgb_png_keeps_precision(tmp_path: Path) -> None:
    data = np.array([[[1000, 30000, 65535]]], dtype=np.uint16).repeat(3, 0).repeat(2, 1)
    with rasterio.open(tmp_path / "rgb16.png", "w", driver="PNG", width=2, height=3, count=3,
                       dtype="uint16") as ds:
        ds.write(np.moveaxis(data, -1, 0))
    out = read_image(tmp_path / "rgb16.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, data)
    assert image_size(tmp_path / "rgb16.png") == (3, 2)


def test_16bit_tiff_scaled(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    write_image(tmp_path / "t.tif", arr)
    out = read_image(tmp_path / "t.tif")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_allclose(to_float(out), arr / 65535.0, rtol=1e-6)


def test_to_float_dtypes() -> None:
    assert to_float(np.array([255], np.uint8))[0] == pytest.approx(1.0)
    assert to_float(np.array([65535], np.uint16))[0] == pytest.approx(1.0)
    assert to_float(np.array([127], np.int8))[0] == pytest.approx(1.0)
    f = np.array([3.5, -2.0], np.float64)
    out = to_float(f)
    assert out.dtype == np.float32 and out.tolist() == [3.5, -2.0]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    h, w = 24, 40
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # left dark, right bright
    arr[:, :, 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (w, h, 3)
    expected = np.rot90(arr, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 8
    assert image_size(tmp_path / "r.jpg") == (w, h)


def test_multiband_geotiff_band_selection(tmp_path: Path) -> None:
    data = np.stack([np.full((4, 5), 100 * (b + 1), np.uint16) for b in range(5)])
    with rasterio.open(
        tmp_path / "ms.tif", "w", driver="GTiff", width=5, height=4, count=5, dtype="uint16",
        crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4000000),
    ) as ds:
        ds.write(data)
    full = read_image(tmp_path / "ms.tif")
    assert full.shape == (4, 5, 5)
    sel = read_image(tmp_path / "ms.tif", bands=[4, 3, 2])
    assert sel.shape == (4, 5, 3)
    assert sel[0, 0].tolist() == [400, 300, 200]
    with pytest.raises(ImageReadError, match="band 7 requested but the file has 5"):
        read_image(tmp_path / "ms.tif", bands=[7])
    assert image_size(tmp_path / "ms.tif") == (4, 5)


def test_a_band_tagged_alpha_is_data_when_the_model_takes_every_band(tmp_path: Path) -> None:
    from segpipe.data.io import open_raster

    # RGB + near-infrared uint8: GDAL's defaults tag the 4th band alpha.
    data = np.random.default_rng(2).integers(1, 256, (4, 20, 30), dtype=np.uint8)
    data[3, :5, :5] = 0  # dark water in the near-infrared: no nodata
    with rasterio.open(tmp_path / "rgbn.tif", "w", driver="GTiff", width=30, height=20, count=4,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4000000)) as ds:
        ds.write(data)
        assert ds.colorinterp[3].name == "alpha"
    assert read_image(tmp_path / "rgbn.tif").shape == (20, 30, 3)  # RGBA: alpha dropped
    assert read_image(tmp_path / "rgbn.tif", channels=3).shape == (20, 30, 3)
    four = read_image(tmp_path / "rgbn.tif", channels=4)  # a 4-band model: all four
    np.testing.assert_array_equal(four, data.transpose(1, 2, 0))
    with open_raster(tmp_path / "rgbn.tif", channels=4) as reader:
        pixels, valid = reader.read(0, 20)
    assert valid is None  # its zeros are data, not nodata
    np.testing.assert_array_equal(pixels, data.transpose(1, 2, 0))
    with open_raster(tmp_path / "rgbn.tif") as reader:
        pixels, valid = reader.read(0, 20)
    assert pixels.shape == (20, 30, 3) and valid is not None and (~valid).sum() == 25


def test_a_fifth_alpha_band_marks_nodata_though_gdal_masks_nothing(tmp_path: Path) -> None:
    # gdalwarp -dstalpha on a 4-band scene: 4 data bands + alpha. GDAL applies alpha as the
    # mask only in 2- and 4-band files, so the warp's empty area was predicted as classes.
    from rasterio.enums import ColorInterp

    from segpipe.data.io import open_raster, read_image_valid

    data = np.random.default_rng(3).integers(1, 60000, (5, 20, 30), dtype=np.uint16)
    data[4] = 65535
    data[:, :, :8] = 0  # outside the warped scene: transparent, every band 0
    with rasterio.open(tmp_path / "warp.tif", "w", driver="GTiff", width=30, height=20, count=5,
                       dtype="uint16", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4000000)) as ds:
        ds.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * 3 + [ColorInterp.alpha]
        ds.write(data)
    for bands in (None, [1, 2, 3, 4], [2]):
        with open_raster(tmp_path / "warp.tif", bands=bands) as reader:
            pixels, valid = reader.read(0, 20)
            _, part = reader.read(5, 10, 4, 12)
        assert pixels.shape[2] == (len(bands) if bands else 4)
        assert valid is not None and valid.sum() == 20 * 22 and not valid[:, :8].any()
        assert part is not None and part.tolist() == [[False] * 4 + [True] * 4] * 5
        pixels, valid = read_image_valid(tmp_path / "warp.tif", bands)
        assert valid is not None and valid.sum() == 20 * 22 and not valid[:, :8].any()
    with open_raster(tmp_path / "warp.tif", channels=5) as reader:  # a 5-band model: data
        assert reader.read(0, 20)[1] is None


def test_band_selection_on_png(tmp_path: Path) -> None:
    arr = _noise(3, 3, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", bands=[3])[:, :, 0],
                                  arr[:, :, 2])


# ------------------------------------------------------------------ masks
def test_read_mask_index_and_rgb(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", labels)
    m = read_mask(tmp_path / "m.png")
    assert m.dtype == np.int64 and m.shape == (2, 3)
    np.testing.assert_array_equal(m, labels)
    rgb = _noise(2, 3, 3)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    c = read_mask(tmp_path / "c.png")
    assert c.dtype == np.uint8 and c.shape == (2, 3, 3)
    write_mask(tmp_path / "m.tif", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), labels)


def test_write_mask_with_palette_keeps_indices(tmp_path: Path) -> None:
    labels = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    write_mask(tmp_path / "p.png", labels, palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), labels)


def test_float_mask_with_fractions_rejected(tmp_path: Path) -> None:
    write_image(tmp_path / "f.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(ImageReadError, match="non-integer"):
        read_mask(tmp_path / "f.tif")


# ------------------------------------------------------------------ errors
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found") as exc:
        read_image(tmp_path / "nope.png")
    assert exc.value.path == tmp_path / "nope.png"


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    for fn in (read_image, read_mask, image_size):
        with pytest.raises(ImageReadError) as exc:
            fn(p)
        assert exc.value.reason == "file is empty (0 bytes)"
        assert str(exc.value).startswith(f"{p}: file is empty (0 bytes)")


def test_truncated_png(tmp_path: Path) -> None:
    p = tmp_path / "t.png"
    Image.fromarray(_noise(64, 64, 3)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    for fn in (read_image, read_mask):
        with pytest.raises(ImageReadError, match="truncated or corrupt image data") as exc:
            fn(p)
        assert exc.value.path == p


def test_truncated_tiff(tmp_path: Path) -> None:
    p = tmp_path / "t.tif"
    write_image(p, _noise(64, 64, 3))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as exc:
        read_image(p)
    assert exc.value.path == p
    assert "truncated or corrupt" in exc.value.reason or "not an image" in exc.value.reason


@pytest.mark.parametrize("head", [b"II*\x00" + (10**6).to_bytes(4, "little"),
                                  b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_an_image_cut_before_its_header_is_truncated_not_no_image(tmp_path: Path, head) -> None:
    """An LZW TIFF whose directory lies at its end (as LGG's do), cut short, was called "not
    an image ... (not text or HTML saved with an image extension)"."""
    p = tmp_path / ("cut.tif" if head.startswith(b"II") else "cut.png")
    p.write_bytes(head + bytes(range(256)) * 8)
    with pytest.raises(ImageReadError, match="truncated or corrupt image data") as exc:
        read_image(p)
    assert exc.value.path == p and "header cannot be read" in exc.value.reason


def test_text_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("<html>404 not found</html>")
    with pytest.raises(ImageReadError, match="not an image Pillow or rasterio can read"):
        read_image(p)
    with pytest.raises(ImageReadError, match="not an image"):
        image_size(p)
    t = tmp_path / "notes.tif"
    t.write_text("hello")
    with pytest.raises(ImageReadError, match="not an image Pillow or rasterio can read"):
        read_image(t)


def test_a_gdal_format_segpipe_does_not_read_says_so(tmp_path: Path) -> None:
    # A VRT was "not an image Pillow or rasterio can read ... not text or HTML".
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text('<VRTDataset rasterXSize="4" rasterYSize="4"></VRTDataset>')
    with pytest.raises(ImageReadError, match=r"segpipe does not read \.vrt files") as exc:
        read_image(vrt)
    assert "gdal_translate -of GTiff -co TILED=YES mosaic.vrt mosaic.tif" in str(exc.value)


def _png_with_huge_header(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_header(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    _png_with_huge_header(p, 100_000, 100_000)
    assert p.stat().st_size < 200
    with pytest.raises(ImageReadError, match="image of 100000×100000 pixels exceeds the "
                                             "decompression-bomb limit"):
        read_image(p)
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        image_size(p)


def test_decompression_bomb_lowered_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_noise(20, 30, 3)).save(tmp_path / "a.png")
    write_image(tmp_path / "a.tif", _noise(20, 30, 3))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match="image of 30×20 pixels exceeds"):
        read_image(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="image of 30×20 pixels exceeds"):
        read_image(tmp_path / "a.tif")
    # the command line's way to raise it for trusted files, as the message says
    with pytest.raises(ImageReadError, match="SEGPIPE_MAX_IMAGE_PIXELS=N"):
        read_image(tmp_path / "a.png")
    from segpipe.data.io import _limit_from_environment

    monkeypatch.setenv("SEGPIPE_MAX_IMAGE_PIXELS", "1000")
    _limit_from_environment()
    assert read_image(tmp_path / "a.png").shape == (20, 30, 3)
    monkeypatch.setenv("SEGPIPE_MAX_IMAGE_PIXELS", "none")
    _limit_from_environment()
    assert Image.MAX_IMAGE_PIXELS is None


# ------------------------------------------------------------------ rasterio on demand
_LAZY_RASTERIO = """
import sys
import numpy as np
import segpipe.cli  # every command imports this (and with it segpipe.data.io)
from segpipe.data import io
from PIL import Image

png, tif = sys.argv[1], sys.argv[2]
assert "rasterio" not in sys.modules, "imported with segpipe"
Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png)
io.read_image(png); io.read_mask(png); io.image_size(png)
assert io.probe_raster(png) is None
assert "rasterio" not in sys.modules, "imported for a PNG"
io.write_image(tif, np.zeros((4, 6, 2), np.uint16))
assert "rasterio" in sys.modules
import rasterio.env
with io.open_raster(tif) as reader:
    reader.read(0, 4)
print(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
"""


def test_rasterio_imported_only_for_rasters(tmp_path: Path) -> None:
    """Commands and PNG data never load rasterio/GDAL; a windowed read caps GDAL's cache."""
    import os
    import subprocess
    import sys

    from segpipe.data.io import RASTER_CACHE_MB

    env = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    done = subprocess.run(
        [sys.executable, "-c", _LAZY_RASTERIO, str(tmp_path / "a.png"), str(tmp_path / "a.tif")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == RASTER_CACHE_MB * 1024 * 1024


class _FakeGdalConfig:
    """Stands in for rasterio.env's public config functions; records what is set."""

    def __init__(self, current: object, env_options: dict | None = None) -> None:
        self.current, self.env_options, self.set_calls = current, env_options, []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import rasterio.env

        from segpipe.data import io

        monkeypatch.setattr(io, "_CACHE_LIMITED", False)
        monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
        monkeypatch.setattr(rasterio.env, "get_gdal_config", lambda key: self.current)
        monkeypatch.setattr(rasterio.env, "set_gdal_config",
                            lambda key, value: self.set_calls.append((key, value)))
        monkeypatch.setattr(rasterio.env, "hasenv", lambda: self.env_options is not None)
        monkeypatch.setattr(rasterio.env, "getenv", lambda: dict(self.env_options or {}))


def test_gdal_cache_cap_uses_public_config_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.data import io

    fake = _FakeGdalConfig(current=5 * 1024**3)
    fake.install(monkeypatch)
    io._limit_gdal_cache()
    io._limit_gdal_cache()
    assert fake.set_calls == [("GDAL_CACHEMAX", io.RASTER_CACHE_MB * 1024 * 1024)]


@pytest.mark.parametrize("case", ["environment", "smaller", "percent", "caller_env"])
def test_gdal_cache_cap_respects_the_users_setting(case: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.data import io

    fake = _FakeGdalConfig(
        current={"smaller": 8 * 1024**2, "percent": "10%"}.get(case, 5 * 1024**3),
        env_options={"gdal_cachemax": 512} if case == "caller_env" else None,
    )
    fake.install(monkeypatch)
    if case == "environment":
        monkeypatch.setenv("GDAL_CACHEMAX", "512")
    io._limit_gdal_cache()
    assert fake.set_calls == []
    # Inside the caller's own rasterio.Env the cap waits: applied on an open after it exits.
    assert io._CACHE_LIMITED is (case != "caller_env")


@pytest.mark.parametrize("name", ["stack.tif", "stack.gif"])
def test_an_image_stack_in_one_file_is_refused(tmp_path: Path, name: str) -> None:
    """A multi-page TIFF (how ISBI 2012 ships its 30 slices) or an animated GIF was read as
    its first page, silently: the other pages were lost to training and prediction."""
    p = tmp_path / name
    pages = [Image.fromarray(_noise(32, 40, seed=i)) for i in range(4)]
    pages[0].save(p, save_all=True, append_images=pages[1:])
    for fn in (read_image, read_mask, image_size):
        with pytest.raises(ImageReadError, match=r"holds 4 (pages|frames) \(an image stack\)"):
            fn(p)


def test_complex_valued_rasters_are_refused_with_the_conversion(tmp_path: Path) -> None:
    """SAR's single-look complex data were predicted from their real part alone, with numpy's
    'discards the imaginary part' warning passed through."""
    from segpipe.data.io import open_raster, probe_raster

    p = tmp_path / "slc.tif"
    with rasterio.open(p, "w", driver="GTiff", width=8, height=6, count=1,
                       dtype="complex64") as ds:
        ds.write((np.ones((1, 6, 8)) + 2j).astype(np.complex64))
    for fn in (read_image, probe_raster, lambda f: open_raster(f, None, 1)):
        with pytest.raises(ImageReadError, match=r"slc\.tif: its bands hold complex values "
                           r"\(complex64.*convert them to amplitude first"):
            fn(p)


def test_a_geotiff_with_overviews_is_one_image(tmp_path: Path) -> None:
    """Overviews (reduced-resolution pages of the same image) are not a stack."""
    from rasterio.enums import Resampling

    p = tmp_path / "ov.tif"
    write_image(p, _noise(256, 256, 3))
    with rasterio.open(p, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.average)
    assert read_image(p).shape == (256, 256, 3)
    assert image_size(p) == (256, 256)
    from segpipe.data.io import open_raster, probe_raster

    assert probe_raster(p) is not None
    with open_raster(p) as reader:
        assert reader.width == 256


def test_output_stamps_and_input_fingerprints(tmp_path: Path) -> None:
    """A rerun of `segpipe predict` tells its outputs by their stamps: read without Pillow's
    pixel limit (finished outputs failed under a lower one), a damaged header said so; and an
    input's fingerprint changes with an edit in place (a same-size edit before its last MiB
    kept it) and with its world file (a corrected georeference kept the old output)."""
    import os

    from segpipe.data.io import input_fingerprint, read_output_stamp, write_label_png

    mask = tmp_path / "m.png"
    write_label_png(mask, np.zeros((40, 50), np.uint8), stamp='{"input": "a&b"}')
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100  # far under 40 x 50 x 2
    try:
        assert read_output_stamp(mask) == '{"input": "a&b"}'
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    cut = tmp_path / "cut.png"
    cut.write_bytes(mask.read_bytes()[:40])
    with pytest.raises(OSError, match="damaged header"):
        read_output_stamp(cut)
    big = tmp_path / "scene.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(bytes(data))
    before = input_fingerprint(big)
    data[:100] = bytes(100)  # in place, the same size, far from the end
    with open(big, "r+b") as fh:
        fh.write(bytes(data[:100]))
    os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 1_000_000))
    assert input_fingerprint(big) != before
    tile = tmp_path / "tile.png"
    write_label_png(tile, np.zeros((4, 4), np.uint8))
    plain = input_fingerprint(tile)
    (tmp_path / "tile.pgw").write_text("1\n0\n0\n-1\n400000\n5600000\n")
    with_world = input_fingerprint(tile)
    assert with_world != plain
    (tmp_path / "tile.pgw").write_text("1\n0\n0\n-1\n600000\n5600000\n")
    os.utime(tmp_path / "tile.pgw", ns=(0, 10**18))
    assert input_fingerprint(tile) != with_world


def test_a_name_with_no_room_for_its_aux_xml_is_not_georeferenced(tmp_path: Path) -> None:
    """An image named with 247 bytes or more: looking for its .aux.xml raised "File name too
    long", and predict failed the file that fit, check-data and the API read."""
    from segpipe.data.io import input_fingerprint, sidecar_georeference

    image = tmp_path / ("M" * 245 + ".png")
    write_image(image, np.zeros((8, 8, 3), np.uint8))
    assert sidecar_georeference(image) is None
    assert input_fingerprint(image)


def test_an_unreadable_file_is_a_permission_problem_not_a_corrupt_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was "truncated or corrupt image data", to be re-exported."""
    import segpipe.data.io as io

    image = tmp_path / "locked.png"
    write_image(image, np.zeros((8, 8, 3), np.uint8))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(image))

    monkeypatch.setattr(io.Image, "open", denied)
    with pytest.raises(io.ImageReadError, match=r"locked\.png: no permission to read the file "
                                                r"\(Permission denied\).*chmod a\+r"):
        io.read_image(image)
