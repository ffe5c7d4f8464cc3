"""Normalisation of images and batches (scale to [0, 1], then the data spec's mean and std),
without albumentations: what prediction needs of the transforms (the augmentations are
:mod:`segpipe.data.transforms`, which re-exports these functions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from segpipe.errors import ConfigError

__all__ = ["normalize", "normalize_to_tensor", "normalize_uint8_batch"]


def _checked_stats(
    mean: Sequence[float], std: Sequence[float], channels: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """mean and std as arrays, checked against the channel count and for zero std."""
    m = np.asarray(mean, dtype=dtype).reshape(-1)
    s = np.asarray(std, dtype=dtype).reshape(-1)
    if m.size != channels or s.size != channels:
        raise ConfigError(
            f"mean/std have {m.size}/{s.size} values but the image has {channels} channel(s); "
            "set data.mean and data.std to one value per channel (or leave them unset)"
        )
    if np.any(s == 0):
        raise ConfigError("std must not contain zeros")
    return m, s


def _scale_offset(
    mean: Sequence[float], std: Sequence[float], channels: int, unit: float
) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``scale, offset`` with ``(x / unit - mean) / std == x * scale + offset``."""
    m, s = _checked_stats(mean, std, channels, np.float64)
    return (1.0 / (unit * s)).astype(np.float32), (-m / s).astype(np.float32)


def normalize(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """``(image - mean) / std`` per channel.

    Args:
        image: float32 (H, W, C).
        mean: C values.
        std: C values (non-zero).

    Returns:
        float32 (H, W, C).

    Raises:
        ValueError: When the lengths of mean/std do not match the channel count.
    """
    m, s = _checked_stats(mean, std, image.shape[2] if image.ndim == 3 else 1, np.float32)
    return ((image.astype(np.float32, copy=False) - m) / s).astype(np.float32, copy=False)


def normalize_to_tensor(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Scale to ``[0, 1]`` and normalise in one pass, as a (C, H, W) tensor in (H, W, C) memory.

    Equal (up to float rounding) to ``normalize(to_float(image), mean, std)`` transposed to CHW:
    integers are divided by their dtype's maximum (uint8 by 255, uint16 by 65535), booleans are
    0/1 and floats are taken as they are. This runs once per training sample, in the loading
    process that shares the CPU with training, so it is built for speed: one ``cv2.transform``
    (a per-pixel affine map) for up to 4 channels, a multiply-add per plane beyond that (numpy's
    broadcasting over a short trailing axis is much slower). The result keeps the image's
    (H, W, C) memory order, i.e. it is channels-last, so batching it into the channels-last
    batches the network runs on is a plain copy.

    Args:
        image: (H, W, C) or (H, W) array of any numeric or bool dtype.
        mean: C values.
        std: C values (non-zero).

    Returns:
        float32 tensor of shape (C, H, W), a view of (H, W, C)-contiguous memory.

    Raises:
        ValueError: When the lengths of mean/std do not match the channel count.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    unit = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    scale, offset = _scale_offset(mean, std, channels, unit)
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    if channels <= 4:
        affine = np.concatenate([np.diag(scale), offset[:, None]], axis=1)
        out = cv2.transform(pixels, affine).reshape(image.shape)
    else:
        out = pixels if pixels is not image else pixels.copy()
        for c in range(channels):
            out[:, :, c] *= scale[c]
            out[:, :, c] += offset[c]
    return torch.from_numpy(out).permute(2, 0, 1)


def normalize_uint8_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Scale a uint8 batch to ``[0, 1]`` and normalise it, on the batch's device.

    The same map as :func:`normalize_to_tensor` (``x * scale + offset`` with the same float32
    constants), applied to a whole batch where it lives: the data module sends 8-bit batches
    to a GPU as uint8, a quarter of the bytes of float32, and normalises them there. The
    memory format (channels-last) is kept.

    Args:
        images: uint8 tensor (N, C, H, W) or (C, H, W).
        mean: C values.
        std: C values (non-zero).

    Returns:
        float32 tensor of the same shape, device and memory format.

    Raises:
        ValueError: When the lengths of mean/std do not match the channel count.
    """
    scale_t, offset_t = _device_affine(tuple(mean), tuple(std), images.shape[-3], images.device)
    out = images.to(torch.float32)
    return out.mul_(scale_t).add_(offset_t)


@functools.lru_cache(maxsize=32)
def _device_affine(
    mean: tuple[float, ...], std: tuple[float, ...], channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scale_offset` for 8-bit data as (C, 1, 1) float32 tensors on ``device``, made
    once per statistics and device: copying them there for every batch would make the host
    wait for the device at each step."""
    scale, offset = _scale_offset(mean, std, channels, 255.0)
    return tuple(torch.from_numpy(v).to(device).view(-1, 1, 1) for v in (scale, offset))
