"""Augmentation behaviour found untested by a mutation audit: padding labels of the affine
transforms, flag wiring and preset contents."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.data.transforms import build_train_transform, seed_transform

IGNORE = 255


@pytest.mark.parametrize("preset,scale", [("default", (0.5, 0.5)), ("strong", (1.0, 1.0))])
def test_affine_padding_is_labelled_ignore_index_in_the_mask(preset: str, scale) -> None:
    """Without a crop, zooming out (default) and rotating (strong) expose pixels outside the
    image: the image gets 0 there and the mask the ignore index (never class 0), and every
    zeroed image pixel is an ignored mask pixel."""
    image = np.full((48, 48, 3), 0.8, dtype=np.float32)
    mask = np.ones((48, 48), dtype=np.uint8)
    seen_padding = False
    for seed in range(12):
        t = build_train_transform(preset, crop_size=None, scale=scale, hflip=False,
                                  color=False, mask_fill=IGNORE)
        seed_transform(t, seed)
        out = t(image=image, mask=mask)
        m = out["mask"]
        assert set(np.unique(m).tolist()) <= {1, IGNORE}, np.unique(m)
        padded = out["image"].max(axis=2) == 0
        if padded.any():
            seen_padding = True
            assert (m[padded] == IGNORE).all()
    assert seen_padding


def test_hflip_flag_alone_flips_and_vflip_alone_does_not_mirror_horizontally() -> None:
    """``hflip=True`` (vflip off) mirrors some samples left-right, and ``hflip=False``
    never does."""
    image = np.zeros((8, 8, 1), dtype=np.float32)
    image[:, :4] = 1.0
    mask = (image[:, :, 0] > 0).astype(np.uint8)

    def flips(hflip: bool) -> int:
        n = 0
        for seed in range(16):
            t = build_train_transform("light", hflip=hflip, vflip=False, color=False)
            seed_transform(t, seed)
            out = t(image=image, mask=mask)
            assert np.array_equal(out["mask"], (out["image"][:, :, 0] > 0.5).astype(np.uint8))
            n += int(out["mask"][0, 7] == 1)
        return n

    assert flips(True) > 0
    assert flips(False) == 0


def test_preset_none_changes_no_pixel_value() -> None:
    """The ``none`` preset only crops: colour jitter (``color=True``) is not applied, so the
    image's values are the input's."""
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32), dtype=np.uint8)
    for seed in range(10):
        t = build_train_transform("none", crop_size=None, color=True)
        seed_transform(t, seed)
        assert np.array_equal(t(image=image, mask=mask)["image"], image)


def test_color_relative_leaves_hue_and_saturation_alone() -> None:
    """With ``color_relative`` (the default preset) no hue/saturation jitter is applied:
    the ratios between the bands of a pixel are kept (brightness/contrast act on all bands
    alike, up to clipping)."""
    image = np.zeros((16, 16, 3), dtype=np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 0.30, 0.20, 0.10
    mask = np.zeros((16, 16), dtype=np.uint8)
    for seed in range(40):
        t = build_train_transform("default", scale=(1.0, 1.0), hflip=False, color=True,
                                  color_relative=True)
        seed_transform(t, seed)
        out = t(image=image, mask=mask)["image"]
        assert out.shape == image.shape
        # a hue/saturation shift changes the order or spread of the bands; brightness and
        # contrast shift all bands by the same affine map
        d01 = out[..., 0] - out[..., 1]
        d12 = out[..., 1] - out[..., 2]
        np.testing.assert_allclose(d01, d12, atol=1e-4)


def test_grid_elastic_mask_takes_the_nearest_source_pixel_of_the_image_sample() -> None:
    """GridElastic's mask label at each pixel is that of the source pixel nearest to the
    position the image was sampled from: on coordinate ramps the mask's source coordinate is
    within half a pixel (plus cv2's 1/32 interpolation step) of the bilinear image value."""
    from segpipe.data.transforms import GridElastic

    h, w = 40, 48
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([cols, rows], axis=2).astype(np.float32)
    mask = (rows * 100 + cols).astype(np.int32)
    for seed in range(4):
        t = GridElastic(std=4.0)
        seed_transform(t, seed)
        out = t(image=image, mask=mask)
        m, img = out["mask"], out["image"]
        assert np.abs(m % 100 - img[..., 0]).max() <= 0.5 + 1 / 32 + 1e-4
        assert np.abs(m // 100 - img[..., 1]).max() <= 0.5 + 1 / 32 + 1e-4


def test_random_crop_reaches_every_offset_including_the_last() -> None:
    """A plain random crop (scale 1) draws every offset, the last one included, so the last
    rows and columns of an image are trained on too; image and mask share the offset."""
    h, w = 20, 24
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows, cols, cols], axis=2).astype(np.float32) / 32.0
    mask = (rows * 100 + cols).astype(np.int32)
    offsets = set()
    for seed in range(60):
        t = build_train_transform("none", crop_size=(h - 2, w - 2), scale=(1.0, 1.0))
        seed_transform(t, seed)
        out = t(image=image, mask=mask)
        y0, x0 = divmod(int(out["mask"][0, 0]), 100)
        assert np.allclose(out["image"][0, 0, :2] * 32.0, (y0, x0))
        offsets.add((y0, x0))
    assert {y for y, _ in offsets} == {0, 1, 2}
    assert {x for _, x in offsets} == {0, 1, 2}


def test_crop_padding_without_ignore_index_is_reflect101_of_image_and_mask() -> None:
    """Without an ignore index, a crop larger than the image pads image and mask by mirroring
    without repeating the edge pixel (cv2's BORDER_REFLECT_101, numpy's ``reflect``), the
    documented overlap-tile padding."""
    from segpipe.data.transforms import RandomScaleCrop

    rows, cols = np.mgrid[0:6, 0:5]
    mask = (rows * 10 + cols).astype(np.int32)
    image = np.repeat((mask / 100.0).astype(np.float32)[..., None], 3, axis=2)
    t = RandomScaleCrop((10, 9), scale=(1.0, 1.0), fill_mask=None)
    seed_transform(t, 0)
    out = t(image=image, mask=mask)
    expected = np.pad(mask, ((2, 2), (2, 2)), mode="reflect")
    assert np.array_equal(out["mask"], expected)
    np.testing.assert_allclose(out["image"][..., 0], expected / 100.0, atol=1e-6)
