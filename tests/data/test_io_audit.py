"""Reading images and masks: conversions that the mutation audit found untested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from segpipe.data.io import ImageReadError, image_size, read_image, read_image_valid, read_mask


def test_16bit_rgba_png_keeps_precision_and_alpha_is_nodata(tmp_path: Path) -> None:
    # Pillow reads a 16-bit RGBA PNG as 8-bit RGBA: it must go through GDAL like 16-bit RGB.
    rgb = np.array([[[1000, 30000, 65535]]], dtype=np.uint16).repeat(3, 0).repeat(2, 1)
    alpha = np.full((3, 2, 1), 65535, np.uint16)
    alpha[0, 0] = 0
    with rasterio.open(tmp_path / "rgba16.png", "w", driver="PNG", width=2, height=3, count=4,
                       dtype="uint16") as ds:
        ds.write(np.moveaxis(np.concatenate([rgb, alpha], axis=2), -1, 0))
    out, valid = read_image_valid(tmp_path / "rgba16.png")
    assert out.dtype == np.uint16 and out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out, rgb)
    assert valid is not None and valid.tolist() == [[False, True], [True, True], [True, True]]


def test_bilevel_mask_reads_as_0_1_and_bilevel_image_as_0_255(tmp_path: Path) -> None:
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(bits).convert("1").save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "1"
    assert read_mask(tmp_path / "m.png").tolist() == bits.astype(int).tolist()
    assert read_image(tmp_path / "m.png")[..., 0].tolist() == (bits * 255).tolist()


def _geotiff(path: Path, x0: float, y0: float, res_x: float = 10.0, res_y: float = 10.0,
             crs: str = "EPSG:32633") -> Path:
    from affine import Affine

    with rasterio.open(path, "w", driver="GTiff", height=16, width=20, count=1, dtype="uint8",
                       crs=crs, transform=Affine(res_x, 0, x0, 0, -res_y, y0)) as ds:
        ds.write(np.zeros((1, 16, 20), np.uint8))
    return path


@pytest.mark.parametrize("x0, y0, expected", [
    (500030, 4600000, "mask is offset from its image by +3 columns and +0 rows"),
    (500000, 4600050, "mask is offset from its image by +0 columns and -5 rows"),
    (500000, 4600000, None),
])
def test_a_mask_offset_along_one_axis_only_is_named(tmp_path: Path, x0, y0, expected) -> None:
    from segpipe.data.io import grid_mismatch

    image = _geotiff(tmp_path / "i.tif", 500000, 4600000)
    mask = _geotiff(tmp_path / "m.tif", x0, y0)
    assert grid_mismatch(image, mask) == expected


def test_a_mask_a_few_percent_off_the_images_pixel_size_is_named(tmp_path: Path) -> None:
    # 10.5 m pixels over 10 m ones: 20 columns drift by a whole pixel across the tile
    from segpipe.data.io import grid_mismatch

    image = _geotiff(tmp_path / "i.tif", 500000, 4600000)
    mask = _geotiff(tmp_path / "m.tif", 500000, 4600000, res_x=10.5, res_y=10.5)
    assert grid_mismatch(image, mask) == ("mask's pixel size 10.5×10.5 (or rotation) is not "
                                          "its image's 10×10")


def test_an_internal_dataset_mask_marks_nodata(tmp_path: Path) -> None:
    # GDAL's internal (per-dataset) mask, as gdal_translate -mask / rasterio write_mask leave it
    data = np.random.default_rng(0).integers(1, 255, (3, 8, 10), dtype=np.uint8)
    mask = np.full((8, 10), 255, np.uint8)
    mask[:, :4] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(tmp_path / "m.tif", "w", driver="GTiff", width=10, height=8, count=3,
                           dtype="uint8") as ds:
            ds.write(data)
            ds.write_mask(mask)
    image, valid = read_image_valid(tmp_path / "m.tif")
    np.testing.assert_array_equal(image, data.transpose(1, 2, 0))
    assert valid is not None and valid.tolist() == (mask > 0).tolist()


def test_a_palette_tiff_is_read_as_its_colours(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    cmap = {0: (10, 20, 30, 255), 1: (200, 100, 50, 255), 2: (1, 2, 3, 255)}
    with rasterio.open(tmp_path / "p.tif", "w", driver="GTiff", width=2, height=2, count=1,
                       dtype="uint8", photometric="palette") as ds:
        ds.write(idx[None])
        ds.write_colormap(1, cmap)
    out = read_image(tmp_path / "p.tif")
    assert out.shape == (2, 2, 3)
    assert out.tolist() == [[list(cmap[int(v)][:3]) for v in row] for row in idx]
    assert read_mask(tmp_path / "p.tif").tolist() == idx.tolist()  # a mask keeps the indices


@pytest.mark.parametrize("name", ["a.png", "a.tif"])
def test_band_zero_is_refused_bands_are_one_based(tmp_path: Path, name: str) -> None:
    from segpipe.data.io import write_image

    write_image(tmp_path / name, np.random.default_rng(0).integers(0, 255, (3, 3, 3), np.uint8))
    with pytest.raises(ImageReadError, match="band 0 requested but the file has 3") as exc:
        read_image(tmp_path / name, bands=[0])
    assert exc.value.kind == "channels" and exc.value.file_bands == 3


def test_band_selection_on_png_keeps_the_requested_order(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", bands=[3, 1]),
                                  arr[:, :, [2, 0]])


def test_a_palette_pngs_transparent_index_is_nodata_with_alpha_nodata(tmp_path: Path) -> None:
    # a map tile: palette PNG whose index 0 is transparent (tRNS chunk)
    idx = np.array([[0, 1, 1], [2, 0, 1]], np.uint8)
    img = Image.frombytes("P", (3, 2), idx.tobytes())
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    img.save(tmp_path / "tile.png", transparency=0)
    image, valid = read_image_valid(tmp_path / "tile.png", alpha_nodata=True)
    assert image.shape == (2, 3, 3)
    assert valid is not None and valid.tolist() == (idx != 0).tolist()
    assert read_image_valid(tmp_path / "tile.png")[1] is None  # without alpha_nodata: data


def test_a_16bit_colour_mask_is_refused(tmp_path: Path) -> None:
    from segpipe.data.io import write_image

    write_image(tmp_path / "m.tif", np.full((4, 4, 3), 1000, np.uint16))
    with pytest.raises(ImageReadError, match="colour mask of dtype uint16") as exc:
        read_mask(tmp_path / "m.tif")
    assert "m.tif" in str(exc.value)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_image_size_follows_every_turning_exif_orientation(tmp_path: Path, orientation) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "a.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "a.jpg").shape[:2] == (40, 24)
    assert image_size(tmp_path / "a.jpg") == (40, 24)


def test_mask_palette_gives_each_index_its_colour(tmp_path: Path) -> None:
    from segpipe.data.io import mask_palette

    img = Image.frombytes("P", (2, 1), bytes([0, 1]))
    img.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    img.save(tmp_path / "m.png")
    palette = mask_palette(tmp_path / "m.png")
    assert palette is not None and palette[:2] == [(10, 20, 30), (40, 50, 60)]
    assert len(palette) == 256


def test_raster_pixel_limit_is_twice_pillows(tmp_path: Path, monkeypatch) -> None:
    from segpipe.data.io import pixel_limit, write_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert pixel_limit() == 200
    write_image(tmp_path / "ok.tif", np.zeros((10, 20, 1), np.uint8))  # 200 pixels: read
    assert read_image(tmp_path / "ok.tif").shape == (10, 20, 1)
    write_image(tmp_path / "big.tif", np.zeros((15, 15, 1), np.uint8))  # 225 > 200
    with pytest.raises(ImageReadError, match="decompression-bomb limit of 200"):
        read_image(tmp_path / "big.tif")


def test_16bit_gray_alpha_png_keeps_precision(tmp_path: Path) -> None:
    """Pillow read it, keeping the high byte: 12-bit data became 0..15, without a word."""
    gray = np.array([[1000, 30000], [65535, 4095]], np.uint16)
    with rasterio.open(tmp_path / "la16.png", "w", driver="PNG", width=2, height=2, count=2,
                       dtype="uint16") as ds:
        ds.write(np.stack([gray, np.full((2, 2), 65535, np.uint16)]))
    out = read_image(tmp_path / "la16.png")
    assert out.dtype == np.uint16 and out[..., 0].tolist() == gray.tolist()
    mask = read_mask(tmp_path / "la16.png")
    assert mask.tolist() == gray.tolist()
