"""Augmentations keep image and mask aligned and masks integer-valued."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from segpipe.data.transforms import (
    IMAGENET_MEAN,
    GridElastic,
    RandomScaleCrop,
    boundary_weight_map,
    build_eval_transform,
    build_train_transform,
    default_mean_std,
    normalize,
    normalize_to_tensor,
    seed_transform,
)

IGNORE = 255


def _blocks(h: int = 64, w: int = 80, channels: int = 3, seed: int = 0):
    """Image whose channel 0 encodes the mask: big blocks, label k -> value (k + 1) / 4."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (-(-h // 16), -(-w // 16)))
    mask = np.kron(coarse, np.ones((16, 16), dtype=int)).astype(np.int32)[:h, :w]
    image = np.zeros((h, w, channels), dtype=np.float32)
    image[:, :, 0] = (mask + 1) / 4.0
    for c in range(1, channels):
        image[:, :, c] = rng.random((h, w)).astype(np.float32)
    return image, mask


def _decode(image: np.ndarray) -> np.ndarray:
    return np.rint(image[:, :, 0] * 4.0).astype(int) - 1


@pytest.mark.parametrize(("preset", "elastic"),
                         [("none", 0.0), ("light", 0.0), ("default", 0.0), ("strong", 0.0),
                          ("default", 6.0)])
def test_image_and_mask_stay_aligned(preset: str, elastic: float) -> None:
    t = build_train_transform(preset, crop_size=48, scale=(0.75, 1.5), hflip=True, vflip=True,
                              rotate90=True, color=False, mask_fill=IGNORE, elastic=elastic)
    t.set_random_seed(0)
    image, mask = _blocks()
    for _ in range(6):
        out = t(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == (48, 48, 3) and img.dtype == np.float32
        assert m.shape == (48, 48)
        assert np.issubdtype(m.dtype, np.integer)
        assert set(np.unique(m).tolist()) <= {0, 1, 2, IGNORE}
        valid = m != IGNORE
        # Padded pixels: image 0 where the mask is the fill value (with "strong", rotated
        # borders are blended by the bilinear image resampling, so only check the others).
        if preset != "strong" and not elastic:
            assert np.all(img[~valid, 0] == 0)
        # Everywhere else the mask still matches the image it came with (bilinear image
        # resampling blurs only the block edges).
        agree = (_decode(img)[valid] == m[valid]).mean() if valid.any() else 1.0
        assert agree > 0.85


def _rescale_pad_crop(img, oy, ox, sh, sw, size, fill, interpolation):
    """What RandomScaleCrop replaces: resize the whole image, pad centred, crop."""
    ch, cw = size
    scaled = cv2.resize(img, (sw, sh), interpolation=interpolation)
    if img.ndim == 3 and scaled.ndim == 2:
        scaled = scaled[:, :, None]
    top, left = max(0, ch - sh) // 2, max(0, cw - sw) // 2
    pad = [(top, max(0, ch - sh) - top), (left, max(0, cw - sw) - left)] + [(0, 0)] * (img.ndim - 2)
    padded = np.pad(scaled, pad, constant_values=fill)
    y0, x0 = top - oy, left - ox
    assert 0 <= y0 <= padded.shape[0] - ch and 0 <= x0 <= padded.shape[1] - cw
    return padded[y0 : y0 + ch, x0 : x0 + cw]


def _draw(t: RandomScaleCrop, image, mask):
    params = t.get_params_dependent_on_data({"shape": image.shape}, {"mask": mask})
    return params, t.apply(image, **params), t.apply_to_mask(mask, **params)


@pytest.mark.parametrize("channels", [1, 3, 6])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_random_scale_crop_equals_rescale_pad_crop(channels: int, dtype) -> None:
    """Each draw equals resizing the whole frame, centre padding and cropping at its offset,
    up to a sub-pixel shift of the resampling grid."""
    h, w, size = 60, 80, (48, 40)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.stack([yy + xx + 20 * c for c in range(channels)], -1)  # one level per pixel
    image = ramp.astype(dtype) if dtype is np.uint8 else (ramp / 255).astype(dtype)
    mask = ((yy // 12 + xx // 16) % 5).astype(np.int32)
    t = RandomScaleCrop(size, scale=(0.3, 2.5), fill_mask=IGNORE)
    t.set_random_seed(1)
    factors, offsets = [], set()
    for _ in range(60):
        params, out_img, out_mask = _draw(t, image, mask)
        (oy, ox), (sh, sw) = params["origin"], params["scaled_shape"]
        assert out_img.shape == (*size, channels) and out_img.dtype == dtype
        assert out_mask.shape == size and out_mask.dtype == np.int32
        ref_img = _rescale_pad_crop(image, oy, ox, sh, sw, size, 0, cv2.INTER_LINEAR)
        ref_mask = _rescale_pad_crop(mask, oy, ox, sh, sw, size, IGNORE, cv2.INTER_NEAREST_EXACT)
        # The padding is exact.
        pad = ref_mask == IGNORE
        assert np.array_equal(out_mask == IGNORE, pad)
        assert np.all(out_img[pad] == 0)
        # Inside, a shift of under half a rescaled pixel moves the ramp by < 1 / factor levels
        # (per axis), plus rounding.
        factor = sh / h
        tol = (1.0 + 1.0 / factor) * (1 if dtype is np.uint8 else 1 / 255)
        assert np.abs(out_img.astype(np.float64) - ref_img).max() <= tol
        # The same shift may move a label boundary by one pixel (per axis), never more.
        near = np.pad(ref_mask, 1, mode="edge")
        neighbours = [near[1 + dy : 1 + dy + size[0], 1 + dx : 1 + dx + size[1]]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        off = out_mask != ref_mask
        assert np.all(np.any([n[off] == out_mask[off] for n in neighbours], axis=0))
        factors.append(factor)
        offsets.add((oy, ox))
    assert min(factors) < 0.5 and max(factors) > 2.2  # the whole range is drawn
    assert len(offsets) > 40


def test_random_scale_crop_without_scaling_is_a_pad_and_crop() -> None:
    image, mask = _blocks(40, 30)
    t = RandomScaleCrop((32, 32), fill_mask=IGNORE)
    t.set_random_seed(0)
    for _ in range(10):
        params, out_img, out_mask = _draw(t, image, mask)
        oy, ox = params["origin"]
        ref_img = _rescale_pad_crop(image, oy, ox, 40, 30, (32, 32), 0, cv2.INTER_LINEAR)
        ref_mask = _rescale_pad_crop(mask, oy, ox, 40, 30, (32, 32), IGNORE, cv2.INTER_NEAREST)
        np.testing.assert_array_equal(out_img, ref_img)
        np.testing.assert_array_equal(out_mask, ref_mask)


def test_random_scale_crop_far_into_the_padding() -> None:
    """A tiny image zoomed out: most of the crop is padding, the image is pasted whole."""
    image, mask = np.full((5, 7, 3), 200, np.uint8), np.ones((5, 7), np.int32)
    t = RandomScaleCrop((32, 32), scale=(0.5, 0.5), fill_mask=IGNORE)
    t.set_random_seed(0)
    params, out_img, out_mask = _draw(t, image, mask)
    assert params["scaled_shape"] == (2, 3)
    assert (out_mask == 1).sum() == 6 and (out_mask == IGNORE).sum() == 32 * 32 - 6
    assert np.all(out_img[out_mask == 1] == 200) and np.all(out_img[out_mask == IGNORE] == 0)


def _focus_draws(t: RandomScaleCrop, image, mask, n: int) -> list[np.ndarray]:
    return [_draw(t, image, mask)[2] for _ in range(n)]


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.3, 2.5)])
def test_focused_crops_hold_the_focus_pixel(scale) -> None:
    """With focus_p 1 every crop holds the one pixel of the focus class: its centre on the
    rescaled grid lies inside the crop, whatever the factor (also zoomed out, where the whole
    rescaled image is pasted into padding)."""
    h, w, size = 120, 160, (24, 32)
    image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.int32)
    for r, c in ((0, 0), (119, 159), (7, 150), (60, 80)):
        mask[:] = 0
        mask[r, c] = 4
        t = RandomScaleCrop(size, scale=scale, fill_mask=IGNORE, focus_classes=(4,), focus_p=1.0)
        t.set_random_seed(3)
        offsets = set()
        for _ in range(40):
            params, _, out_mask = _draw(t, image, mask)
            (oy, ox), (sh, sw) = params["origin"], params["scaled_shape"]
            y, x = oy + int((r + 0.5) * sh / h), ox + int((c + 0.5) * sw / w)
            assert 0 <= y < size[0] and 0 <= x < size[1], (r, c, params)
            offsets.add((oy, ox))
            if scale == (1.0, 1.0):  # no resampling: the pixel itself is in the crop
                assert (out_mask == 4).sum() == 1
        if (r, c) not in ((0, 0), (119, 159)):  # a corner pixel at factor 1 has one crop
            assert len(offsets) > 10


def test_focus_p_is_the_fraction_of_focused_crops_and_classes_are_drawn_evenly() -> None:
    """A third of the crops go to the focus classes; a class of one pixel beside one of half
    the image is drawn as often (a pixel drawn among all theirs would almost never be it)."""
    h, w = 400, 400
    image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.int32)
    mask[200, 300] = 7  # a uniform 32x32 crop holds it 0.7 % of the time
    t = RandomScaleCrop((32, 32), fill_mask=IGNORE, focus_classes=(7,), focus_p=0.33)
    t.set_random_seed(0)
    held = np.mean([(m == 7).any() for m in _focus_draws(t, image, mask, 600)])
    assert 0.27 < held < 0.40, held
    mask[:200] = 5
    t = RandomScaleCrop((32, 32), fill_mask=IGNORE, focus_classes=(5, 7), focus_p=1.0)
    t.set_random_seed(0)
    held = np.mean([(m == 7).any() for m in _focus_draws(t, image, mask, 400)])
    assert 0.4 < held < 0.6, held


def test_focus_off_or_absent_draws_the_plain_crops() -> None:
    """focus_p 0 draws exactly the crops of no focus (seeded runs reproduce), and a mask
    without any focus class is cropped as usual, without error."""
    image, mask = _blocks(60, 80)
    plain = RandomScaleCrop((32, 32), scale=(0.5, 2.0), fill_mask=IGNORE)
    off = RandomScaleCrop((32, 32), scale=(0.5, 2.0), fill_mask=IGNORE, focus_classes=(1,),
                          focus_p=0.0)
    plain.set_random_seed(5)
    off.set_random_seed(5)
    for a, b in zip(_focus_draws(plain, image, mask, 20), _focus_draws(off, image, mask, 20)):
        np.testing.assert_array_equal(a, b)
    absent = RandomScaleCrop((32, 32), scale=(0.5, 2.0), fill_mask=IGNORE, focus_classes=(9,),
                             focus_p=1.0)
    absent.set_random_seed(5)
    assert all(m.shape == (32, 32) for m in _focus_draws(absent, image, mask, 20))


def test_build_train_transform_passes_the_focus_to_its_crop() -> None:
    image, mask = np.zeros((200, 200, 3), np.uint8), np.zeros((200, 200), np.uint8)
    mask[150:153, 20:23] = 2
    t = build_train_transform("default", crop_size=24, scale=(1.0, 1.0), mask_fill=IGNORE,
                              focus_classes=(2,), focus_p=1.0)
    seed_transform(t, 0)
    assert all((t(image=image, mask=mask)["mask"] == 2).any() for _ in range(20))


def test_without_an_ignore_index_padding_mirrors_image_and_mask() -> None:
    """With no ignore index the padding was labelled class 0 (a real class: membrane, road,
    background), 12.6 % of the training labels at the folder config's crop and scale on 256²
    images; now image and mask are both mirrored there, so each padded pixel keeps the label of
    the pixel it shows."""
    image, mask = _blocks(20, 28)
    mask = mask + 1  # no 0 in the data: any 0 below would be invented
    t = RandomScaleCrop((32, 40), scale=(0.5, 1.0), fill_mask=None)
    t.set_random_seed(0)
    for _ in range(20):
        params, out_img, out_mask = _draw(t, image, mask)
        assert out_img.shape == (32, 40, 3) and out_mask.shape == (32, 40)
        assert out_mask.min() >= 1  # no invented label
        # image and mask agree (bilinear resampling blurs only the block edges)
        assert (_decode(out_img) + 1 == out_mask).mean() > 0.85
        h, w = params["scaled_shape"]
        if h < 32 and w < 40:  # padded on all sides: the border rows mirror the inner ones
            top = (32 - h) // 2
            np.testing.assert_array_equal(out_mask[top - 1], out_mask[top + 1])
    # The strong preset's rotations and shifts mirror too, as does zooming out without a crop.
    for kw in ({"preset": "strong", "crop_size": 24}, {"preset": "default", "crop_size": None}):
        t = build_train_transform(**kw, mask_fill=None, color=False, hflip=False)
        for seed in range(20):
            seed_transform(t, seed)
            out = t(image=image, mask=mask)
            assert out["mask"].min() >= 1, kw


def test_seeded_augmentations_are_independent_and_reproducible() -> None:
    """Per-sample seeds must not tie the transforms' random choices to one another."""
    t = build_train_transform("default", crop_size=32, mask_fill=IGNORE)
    traced = A.Compose(list(t.transforms), save_applied_params=True)
    image, mask = _blocks(40, 40)
    flips, jitters, zoom_ins = [], [], []
    for seed in range(400):
        seed_transform(traced, seed)
        applied = dict(traced(image=image, mask=mask)["applied_transforms"])
        flips.append("HorizontalFlip" in applied)
        jitters.append("RandomBrightnessContrast" in applied)
        zoom_ins.append(applied["RandomScaleCrop"]["scaled_shape"][0] > 50)  # factor > 1.25
    flips, jitters, zoom_ins = map(np.array, (flips, jitters, zoom_ins))
    # Each happens about half the time, and independently (same-seeded generators made all
    # three the same coin: agreement 1.0).
    for a, b in ((flips, jitters), (flips, zoom_ins), (jitters, zoom_ins)):
        assert 0.4 < a.mean() < 0.6 and 0.4 < (a == b).mean() < 0.6
    seed_transform(traced, 7)
    first = traced(image=image, mask=mask)
    seed_transform(traced, 7)
    again = traced(image=image, mask=mask)
    assert np.array_equal(first["image"], again["image"])
    assert np.array_equal(first["mask"], again["mask"])


def test_seed_transform_reaches_nested_composes() -> None:
    """Nested Composes (OneOf, ...) and a bare transform draw from the one seeded stream."""
    inner = A.OneOf([A.HorizontalFlip(), A.VerticalFlip()])
    t = A.Compose([A.RandomBrightnessContrast(), A.Compose([inner])])
    seed_transform(t, 3)
    members = [t, t.transforms[0], t.transforms[1], inner, *inner.transforms]
    assert len({id(m.random_generator) for m in members}) == 1
    assert len({id(m.py_random) for m in members}) == 1
    single = A.HorizontalFlip()
    seed_transform(single, 3)
    assert single.py_random.random() == t.py_random.random()


@pytest.mark.parametrize("preset", ["light", "default", "strong"])
def test_uint8_masks_stay_uint8_with_padding_labelled(preset: str) -> None:
    """Cached labels reach the pipeline as uint8 (ignore index <= 255): padding must be labelled."""
    t = build_train_transform(preset, crop_size=48, scale=(0.5, 0.6), rotate90=True,
                              mask_fill=IGNORE)
    seed_transform(t, 0)
    image, mask = _blocks(40, 40)
    for _ in range(5):
        out = t(image=image, mask=mask.astype(np.uint8))
        assert out["mask"].dtype == np.uint8 and out["mask"].shape == (48, 48)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 1, 2, IGNORE}
        assert (out["mask"] == IGNORE).any()  # zoomed out below the crop size: padded


def test_mask_labels_never_interpolated() -> None:
    t = build_train_transform("strong", crop_size=(40, 56), scale=(0.5, 2.0), rotate90=False,
                              mask_fill=IGNORE)
    t.set_random_seed(1)
    image, mask = _blocks(channels=3)
    mask = mask * 3  # labels 0, 3, 6: interpolation would create 1, 2, 4, 5
    for _ in range(8):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (40, 56, 3)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 3, 6, IGNORE}


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_any_channel_count_with_colour(channels: int) -> None:
    t = build_train_transform("strong", crop_size=32, color=True)
    t.set_random_seed(2)
    image, mask = _blocks(channels=channels)
    for _ in range(4):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (32, 32, channels)
        assert out["image"].dtype == np.float32


def test_colour_jitter_rgb_only_changes_pixels_not_labels() -> None:
    t = build_train_transform("default", crop_size=None, scale=(1.0, 1.0), hflip=False,
                              color=True)
    t.set_random_seed(3)
    image, mask = _blocks(channels=3)
    changed = False
    for _ in range(10):
        out = t(image=image, mask=mask)
        np.testing.assert_array_equal(out["mask"], mask)
        changed |= not np.allclose(out["image"], image)
    assert changed


def test_no_crop_keeps_size() -> None:
    t = build_train_transform("default", crop_size=None, scale=(0.5, 2.0), mask_fill=IGNORE)
    t.set_random_seed(4)
    image, mask = _blocks(50, 70)
    for _ in range(4):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (50, 70, 3) and out["mask"].shape == (50, 70)


def test_eval_transform_identity_and_resize() -> None:
    image, mask = _blocks(32, 40)
    out = build_eval_transform()(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)
    out = build_eval_transform((20, 30))(image=image, mask=mask * 5)
    assert out["image"].shape == (20, 30, 3) and out["mask"].shape == (20, 30)
    assert set(np.unique(out["mask"]).tolist()) <= {0, 5, 10}


def test_grid_elastic_warps_image_and_mask_alike() -> None:
    image, mask = _blocks(96, 96)
    t = A.Compose([GridElastic(std=8.0)])
    seed_transform(t, 3)
    out = t(image=image, mask=mask)
    img, m = out["image"], out["mask"]
    assert img.shape == image.shape and img.dtype == np.float32
    assert m.shape == mask.shape and m.dtype == mask.dtype
    assert set(np.unique(m).tolist()) <= {0, 1, 2}  # nearest source labels, reflected borders
    assert (m != mask).mean() > 0.02  # it moved something
    assert (_decode(img) == m).mean() > 0.95  # and image and mask moved together
    # Other channels are resampled by the same displacement field.
    params = t.transforms[0].get_params_dependent_on_data({"shape": image.shape}, {})
    one = t.transforms[0].apply(image[:, :, 1:2], **params)
    assert one.shape == (96, 96, 1)


def test_grid_elastic_without_displacement_is_identity() -> None:
    image, mask = _blocks(40, 56, channels=7)
    for dtype in (np.float32, np.uint16):
        img = (image * 1000).astype(dtype)
        out = A.Compose([GridElastic(std=0.0)])(image=img, mask=mask)
        np.testing.assert_array_equal(out["image"], img)
        np.testing.assert_array_equal(out["mask"], mask)


def test_grid_elastic_mask_border_is_cv2s_reflect101() -> None:
    # The mask's nearest-neighbour lookup folds indices as cv2.remap's BORDER_REFLECT_101 does
    # for the image, so labels and pixels agree beyond the border too.
    t = GridElastic(std=0.0)
    rows, cols = np.mgrid[0:5, 0:7].astype(np.float32)
    label = np.arange(35, dtype=np.int32).reshape(5, 7)
    for dy, dx in ((-3, -9), (4, 8), (-11, 13)):
        got = t.apply_to_mask(label, map_x=cols + dx, map_y=rows + dy)
        want = cv2.remap(label.astype(np.float32), cols + dx, rows + dy, cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_REFLECT_101)
        np.testing.assert_array_equal(got, want.astype(np.int32))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="preset"):
        build_train_transform("extreme")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        build_train_transform(scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(crop_size=0)
    with pytest.raises(ValueError, match="std >= 0"):
        GridElastic(std=-1.0)


@pytest.mark.parametrize(
    ("dtype", "unit"),
    [(np.uint8, 255.0), (np.uint16, 65535.0), (np.int16, 32767.0), (np.float32, 1.0),
     (np.bool_, 1.0)],
)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_normalize_to_tensor_equals_the_separate_steps(dtype, unit, channels) -> None:
    rng = np.random.default_rng(channels)
    raw = rng.integers(0, 2 if dtype is np.bool_ else 200, (6, 7, channels)).astype(dtype)
    mean, std = rng.uniform(0.1, 0.9, channels).tolist(), rng.uniform(0.1, 0.5, channels).tolist()
    expected = normalize(raw.astype(np.float32) / np.float32(unit), mean, std).transpose(2, 0, 1)
    out = normalize_to_tensor(raw, mean, std)
    assert out.dtype == torch.float32 and out.shape == (channels, 6, 7)
    assert out.permute(1, 2, 0).is_contiguous()  # (H, W, C) memory: channels-last
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize_to_tensor(raw, mean + [0.5], std + [0.5])
    with pytest.raises(ValueError, match="zeros"):
        normalize_to_tensor(raw, mean, [0.0] * channels)


def test_normalize_to_tensor_of_a_2d_image() -> None:
    out = normalize_to_tensor(np.full((2, 3), 255, np.uint8), [0.5], [0.25])
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out.numpy(), 2.0, rtol=1e-6)


def test_normalize_and_tensors() -> None:
    image = np.ones((4, 5, 3), np.float32) * 0.5
    mean, std = default_mean_std(3)
    assert mean == list(IMAGENET_MEAN)
    out = normalize(image, mean, std)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx((0.5 - 0.485) / 0.229)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(image, [0.5], [0.25])
    assert default_mean_std(1) == ([0.5], [0.25])
    assert default_mean_std(4) == ([0.5] * 4, [0.25] * 4)


def test_channel_gain_scales_each_channel_by_one_factor() -> None:
    image = np.random.default_rng(0).uniform(0.1, 0.4, (16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.int64)
    t = build_train_transform("light", hflip=False, color=False, channel_gain=(0.5, 2.0))
    t.set_random_seed(0)
    ratios = []
    for _ in range(20):
        out = t(image=image, mask=mask)["image"]
        gain = out / image  # one factor per channel, the same at every pixel
        np.testing.assert_allclose(gain, np.broadcast_to(gain[:1, :1], gain.shape), rtol=1e-5)
        ratios.append(gain[0, 0])
    ratios = np.array(ratios)
    assert ratios.min() >= 0.5 - 1e-6 and ratios.max() <= 2.0 + 1e-6
    assert ratios.std(axis=0).min() > 0.2  # drawn per sample
    assert not np.allclose(ratios[:, 0], ratios[:, 1])  # and per channel


def _brute_force_border_weights(labels: np.ndarray, object_class: int, w0: float,
                                sigma: float) -> np.ndarray:
    """The U-Net paper's eq. 2 border term computed the slow way: every pixel's exact Euclidean
    distance to every pixel of every object, objects found by a flood fill of our own."""
    h, w = labels.shape
    region = np.zeros((h, w), int)
    count = 0
    for y0 in range(h):
        for x0 in range(w):
            if labels[y0, x0] != object_class or region[y0, x0]:
                continue
            count += 1
            stack = [(y0, x0)]
            region[y0, x0] = count
            while stack:
                y, x = stack.pop()
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # 4-connected
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and labels[yy, xx] == object_class \
                            and not region[yy, xx]:
                        region[yy, xx] = count
                        stack.append((yy, xx))
    ys, xs = np.mgrid[:h, :w]
    dists = []
    for k in range(1, count + 1):
        py, px = np.nonzero(region == k)
        d = np.sqrt((ys[..., None] - py) ** 2 + (xs[..., None] - px) ** 2).min(-1)
        dists.append(d)
    out = np.ones((h, w))
    if count >= 2:
        d = np.sort(np.stack(dists), axis=0)
        border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
        out += np.where(labels == object_class, 0.0, border)
    return out


def test_boundary_weights_are_the_unet_papers_in_a_two_pixel_gap() -> None:
    labels = np.zeros((8, 22), np.int64)  # class 0: membrane, class 1: cells
    labels[:, :10] = 1
    labels[:, 12:] = 1  # two cells, a gap of columns 10 and 11
    weights = boundary_weight_map(labels, object_class=1, w0=10.0, sigma=5.0)
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    # Column 10 is 1 px from the left cell and 2 px from the right one.
    np.testing.assert_allclose(weights[:, 10], 1 + 10 * np.exp(-9 / 50), rtol=1e-5)
    np.testing.assert_allclose(weights[:, 11], 1 + 10 * np.exp(-9 / 50), rtol=1e-5)
    assert (weights[labels == 1] == 1).all()
    # One object only: no gap between two, all weights 1.
    assert (boundary_weight_map(labels * 0 + (np.arange(22) < 10), 1) == 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundary_weights_equal_a_brute_force_computation(seed: int) -> None:
    # Random blobs of class 1 (cells) in class 0, with a few ignored pixels (class 255).
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 7)) < 0.5
    labels = np.kron(coarse, np.ones((5, 5), int)).astype(np.int64)
    labels[rng.random(labels.shape) < 0.15] = 0  # thin gaps and holes
    labels[0, :3] = 255
    fast = boundary_weight_map(labels, object_class=1, w0=10.0, sigma=3.0)
    slow = _brute_force_border_weights(labels, 1, 10.0, 3.0)
    assert slow.max() > 5  # the blobs do make narrow gaps
    # Equal up to the term cut off beyond 4 sigma of each object (below 10 * exp(-8)).
    np.testing.assert_allclose(fast, slow, atol=10 * np.exp(-8) + 1e-4)
