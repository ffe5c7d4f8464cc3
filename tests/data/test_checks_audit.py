"""Pre-flight data check (segpipe.data.checks): cases the mutation audit found untested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segpipe.data import check_samples, class_pixel_counts, scan_folder
from segpipe.data.io import read_mask, write_image, write_mask
from tests.data.synthetic import make_folder_dataset


def _folder(root: Path, **kw) -> Path:
    args = dict(n_train=3, n_val=0, n_test=0, size=(24, 32), num_classes=3, seed=1)
    args.update(kw)
    return make_folder_dataset(root, **args)


def _kinds(problems) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.kind, []).append(p.path.name)
    return out


@pytest.mark.parametrize("decode", [False, True])
def test_a_mask_of_the_images_height_but_not_its_width_is_a_size_mismatch(
        tmp_path: Path, decode: bool) -> None:
    root = _folder(tmp_path / "ds")
    mask = sorted((root / "train" / "masks").glob("*.png"))[0]
    write_mask(mask, np.zeros((24, 30), np.uint8))  # image is 24×32 (H×W)
    problems = check_samples(scan_folder(root), num_classes=3, decode_images=decode)
    assert [(p.kind, p.path.name, p.message) for p in problems] == [
        ("size_mismatch", mask.name, "mask is 30×24 but image img_000.png is 32×24 (W×H)")]


def test_pixel_counts_go_on_past_an_unreadable_raster_image(tmp_path: Path) -> None:
    """The check reports the image; counting its mask's pixels must not stop on it."""
    root = _folder(tmp_path / "ds", image_ext=".tif")
    images = sorted((root / "train" / "images").glob("*.tif"))
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    scan = scan_folder(root)
    rows = class_pixel_counts(scan["train"], 3, per_image=True)
    assert rows.shape == (3, 3) and rows.sum() == 3 * 24 * 32
    problems = check_samples(scan, num_classes=3, decode_images=True)
    assert _kinds(problems) == {"unreadable_image": [images[0].name]}


def test_an_unreadable_image_does_not_hide_its_masks_problems(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    image = sorted((root / "train" / "images").glob("*.png"))[0]
    image.write_bytes(b"")
    mask = root / "train" / "masks" / f"{image.stem}.png"
    labels = read_mask(mask)
    labels[0, 0] = 7
    write_mask(mask, labels)
    problems = check_samples(scan_folder(root), num_classes=3, decode_images=True)
    assert _kinds(problems) == {"unreadable_image": [image.name], "bad_labels": [mask.name]}


def test_more_channels_than_in_channels_is_a_channel_mismatch(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", channels=5, image_ext=".tif")
    problems = check_samples(scan_folder(root), num_classes=3, decode_images=True,
                             in_channels=3)
    assert {p.kind for p in problems} == {"channel_mismatch"} and len(problems) == 3
    assert "pick 3 bands with data.bands (e.g. data.bands: [1, 2, 3])" in problems[0].fix
    assert check_samples(scan_folder(root), num_classes=3, decode_images=True,
                         in_channels=5) == []


def test_a_class_only_in_val_is_absent_from_training(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", n_val=2)
    for mask in (root / "train" / "masks").glob("*.png"):  # no class 2 in train
        labels = read_mask(mask)
        labels[labels == 2] = 1
        write_mask(mask, labels)
    for mask in (root / "val" / "masks").glob("*.png"):
        labels = read_mask(mask)
        labels[:4] = 2
        write_mask(mask, labels)
    problems = check_samples(scan_folder(root), num_classes=3,
                             class_names=["bg", "road", "car"])
    assert [(p.kind, p.split) for p in problems] == [("absent_classes", "train")]
    assert "car" in problems[0].message


def test_8_and_16_bit_images_together_are_warned_about(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", image_ext=".tif")
    image = sorted((root / "train" / "images").glob("*.tif"))[0]
    write_image(image, np.full((24, 32, 3), 4000, np.uint16))
    problems = check_samples(scan_folder(root), num_classes=3, decode_images=True)
    assert [(p.kind, p.path.name) for p in problems] == [("mixed_dtypes", image.name)]
    assert problems[0].message == "uint16 where most images are uint8"


def test_the_ignore_index_in_a_mask_with_mask_values_is_not_unlisted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", num_classes=2)
    for mask in (root / "train" / "masks").glob("*.png"):
        labels = read_mask(mask) * 10  # raw values 0 / 10
        labels[0, :] = 255  # void border
        write_mask(mask, labels)
    problems = check_samples(scan_folder(root), num_classes=2, ignore_index=255,
                             mask_values={0: 0, 10: 1})
    assert problems == []
    write_mask(mask, np.where(read_mask(mask) == 10, 11, read_mask(mask)))  # a typo
    problems = check_samples(scan_folder(root), num_classes=2, ignore_index=255,
                             mask_values={0: 0, 10: 1})
    assert [(p.kind, p.values) for p in problems] == [("unlisted_labels", (11,))]


def _nodata_tile(path: Path, full_rows: int, partial_rows: int) -> None:
    """Float32 3-band tile (8×12) with nodata -9999: ``full_rows`` nodata in every band, then
    ``partial_rows`` nodata in band 1 only."""
    import rasterio

    data = np.random.default_rng(0).random((3, 8, 12)).astype(np.float32)
    data[:, :full_rows] = -9999.0
    data[0, full_rows:full_rows + partial_rows] = -9999.0
    with rasterio.open(path, "w", driver="GTiff", width=12, height=8, count=3, dtype="float32",
                       nodata=-9999.0) as ds:
        ds.write(data)


def test_partial_nodata_counts_only_pixels_nodata_in_some_bands(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    _nodata_tile(root / "train" / "images" / "t.tif", full_rows=2, partial_rows=3)
    write_mask(root / "train" / "masks" / "t.png", np.tile([0, 1], (8, 6)).astype(np.uint8))
    problems = check_samples(scan_folder(root), num_classes=2, ignore_index=255,
                             decode_images=True)
    assert [(p.kind, p.message) for p in problems] == [
        ("partial_nodata", "36 pixel(s) nodata in only some of the bands read")]
