"""segpipe.data.normalization: many-band images, single uint8 images and stats checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.data.normalization import normalize, normalize_to_tensor, normalize_uint8_batch
from segpipe.errors import ConfigError


def test_many_band_float_images_are_normalised_without_touching_the_input() -> None:
    """More bands than one affine pass handles: the caller's float32 image stays as it was,
    and the result is ``(image - mean) / std`` per band."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (4, 5, 6)).astype(np.float32)
    before = image.copy()
    mean, std = rng.uniform(0.2, 0.6, 6).tolist(), rng.uniform(0.1, 0.4, 6).tolist()
    out = normalize_to_tensor(image, mean, std)
    np.testing.assert_array_equal(image, before)
    assert out.shape == (6, 4, 5)
    np.testing.assert_allclose(out.numpy(), normalize(before, mean, std).transpose(2, 0, 1),
                               rtol=1e-5, atol=1e-5)


def test_a_single_uint8_image_is_normalised_like_at_loading_time() -> None:
    """normalize_uint8_batch accepts one (C, H, W) image, as the collate's mixed batches use."""
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = normalize_uint8_batch(torch.from_numpy(hwc).permute(2, 0, 1), mean, std)
    assert out.shape == (3, 5, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalize_to_tensor(hwc, mean, std), rtol=0, atol=1e-5)


def test_a_std_of_the_wrong_length_is_a_config_error() -> None:
    """A std list of the wrong length (mean right) names the options, not a numpy error."""
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ConfigError, match="one value per channel"):
        normalize_to_tensor(image, [0.5, 0.5, 0.5], [0.2, 0.2])
