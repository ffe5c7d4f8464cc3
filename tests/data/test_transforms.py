"""Augmentations keep image and mask aligned and masks integer-valued."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.data.transforms import (
    IMAGENET_MEAN,
    build_eval_transform,
    build_train_transform,
    default_mean_std,
    normalize,
    to_tensor_pair,
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


@pytest.mark.parametrize("preset", ["none", "light", "default", "strong"])
def test_image_and_mask_stay_aligned(preset: str) -> None:
    t = build_train_transform(preset, crop_size=48, scale=(0.75, 1.5), hflip=True, vflip=True,
                              rotate90=True, color=False, mask_fill=IGNORE)
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
        if preset != "strong":
            assert np.all(img[~valid, 0] == 0)
        # Everywhere else the mask still matches the image it came with (bilinear image
        # resampling blurs only the block edges).
        agree = (_decode(img)[valid] == m[valid]).mean() if valid.any() else 1.0
        assert agree > 0.85


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


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="preset"):
        build_train_transform("extreme")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        build_train_transform(scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(crop_size=0)


def test_normalize_and_tensors() -> None:
    image = np.ones((4, 5, 3), np.float32) * 0.5
    mean, std = default_mean_std(3)
    assert mean == list(IMAGENET_MEAN)
    out = normalize(image, mean, std)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx((0.5 - 0.485) / 0.229)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(image, [0.5], [0.25])
    img_t, mask_t = to_tensor_pair(out, np.zeros((4, 5), np.int32))
    assert img_t.shape == (3, 4, 5) and img_t.dtype == torch.float32 and img_t.is_contiguous()
    assert mask_t is not None and mask_t.dtype == torch.int64 and mask_t.shape == (4, 5)
    assert to_tensor_pair(out, None)[1] is None
    assert default_mean_std(1) == ([0.5], [0.25])
    assert default_mean_std(4) == ([0.5] * 4, [0.25] * 4)
