"""Augmentations and tensor conversion (the only module of segpipe that imports albumentations).

All pipelines work on float32 ``(H, W, C)`` images in ``[0, 1]`` (any channel count) and integer
``(H, W)`` masks. Image and mask always receive the same geometric transform; masks are always
resampled with nearest-neighbour interpolation, so no new label values appear. Regions created by
padding, zooming out or rotating are filled with 0 in the image and ``mask_fill`` (use the
ignore index) in the mask.

Normalisation is not part of the albumentations pipelines: :func:`normalize` is applied after
augmentation, so colour jitter works on ``[0, 1]`` data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (albumentations dependency; only its interpolation constants are used)
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preset",
    "build_eval_transform",
    "build_train_transform",
    "default_mean_std",
    "normalize",
    "to_tensor_pair",
]

Preset = Literal["none", "light", "default", "strong"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class _HueSaturationValueRGB(A.HueSaturationValue):
    """HueSaturationValue that leaves non-RGB images (C != 3) untouched."""

    def apply(self, img: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float,
              **params: Any) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3:
            return img
        out = super().apply(img, hue_shift, sat_shift, val_shift, **params)
        return out.astype(np.float32, copy=False) if img.dtype == np.float32 else out


def _hw(crop_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if crop_size is None:
        return None
    if isinstance(crop_size, int):
        size = (crop_size, crop_size)
    else:
        size = tuple(int(v) for v in crop_size)
        if len(size) == 1:
            size = (size[0], size[0])
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"crop_size must be a positive int or (height, width), got {crop_size!r}")
    return size[0], size[1]


def build_train_transform(
    preset: Preset = "default",
    crop_size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    vflip: bool = False,
    rotate90: bool = False,
    color: bool = True,
    mask_fill: int = 0,
) -> A.Compose:
    """Training augmentation pipeline.

    Presets:
        * ``"none"``: no augmentation; only what batching needs (pad + random crop to
          ``crop_size`` when given).
        * ``"light"``: flips (``hflip``/``vflip``/``rotate90``), mild brightness/contrast.
        * ``"default"``: random scale in ``scale`` + flips + brightness/contrast and, for
          3-channel images, hue/saturation jitter.
        * ``"strong"``: ``"default"`` + small rotations/translations, stronger colour jitter
          and Gaussian noise.

    With ``crop_size`` the image is randomly rescaled (factor in ``scale``), padded to at least
    ``crop_size`` and randomly cropped to exactly ``crop_size`` (the usual semantic-segmentation
    recipe). Without it, scaling is a size-preserving zoom (affine with ``keep_ratio``), so the
    output keeps the input size. ``rotate90`` on non-square images without ``crop_size`` changes
    the output shape, so use it with square images or a square crop.

    Args:
        preset: Augmentation strength.
        crop_size: Output size, ``int`` for square or ``(height, width)``; None keeps sizes.
        scale: Range of scale factors (``(1.0, 1.0)`` disables scaling).
        hflip: Random horizontal flips.
        vflip: Random vertical flips.
        rotate90: Random multiples of 90° rotations.
        color: Colour jitter (brightness/contrast for any channel count, hue/saturation only
            when C == 3).
        mask_fill: Mask value for padded / out-of-image pixels (the ignore index).

    Returns:
        An ``albumentations.Compose`` taking ``image=float32 HWC, mask=int HW``.
    """
    if preset not in ("none", "light", "default", "strong"):
        raise ValueError(
            f"unknown augmentation preset {preset!r}; use none, light, default or strong"
        )
    size = _hw(crop_size)
    lo, hi = (float(scale[0]), float(scale[1]))
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
    fill_kw = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0.0, "fill_mask": mask_fill}
    ops: list[Any] = []

    if preset in ("default", "strong") and (lo, hi) != (1.0, 1.0):
        if size is not None:
            ops.append(
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
            )
        else:
            ops.append(
                A.Affine(
                    scale=(lo, hi),
                    keep_ratio=True,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                    **fill_kw,
                )
            )
    if preset == "strong":
        ops.append(
            A.Affine(
                rotate=(-15, 15),
                translate_percent=(-0.0625, 0.0625),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=0.5,
                **fill_kw,
            )
        )
    if preset != "none":
        if rotate90:
            ops.append(A.RandomRotate90(p=1.0))
        if hflip:
            ops.append(A.HorizontalFlip(p=0.5))
        if vflip:
            ops.append(A.VerticalFlip(p=0.5))
    if size is not None:
        ops.append(
            A.PadIfNeeded(min_height=size[0], min_width=size[1], position="center", **fill_kw)
        )
        ops.append(A.RandomCrop(height=size[0], width=size[1], p=1.0))
    if color and preset != "none":
        if preset == "light":
            ops.append(A.RandomBrightnessContrast(0.1, 0.1, p=0.5))
        elif preset == "default":
            ops.append(A.RandomBrightnessContrast(0.2, 0.2, p=0.5))
            ops.append(_HueSaturationValueRGB(10, 15, 10, p=0.3))
        else:
            ops.append(A.RandomBrightnessContrast(0.3, 0.3, p=0.8))
            ops.append(_HueSaturationValueRGB(20, 30, 20, p=0.5))
            ops.append(A.GaussNoise(std_range=(0.01, 0.05), p=0.3))
    return A.Compose(ops)


def build_eval_transform(resize: tuple[int, int] | Sequence[int] | None = None) -> A.Compose:
    """Evaluation pipeline: identity, or a resize (bilinear image, nearest mask).

    Eval images are not padded here: the task pads to the network's multiple and crops back.

    Args:
        resize: Optional ``(height, width)``.

    Returns:
        An ``albumentations.Compose``.
    """
    if resize is None:
        return A.Compose([])
    size = _hw(tuple(resize))
    assert size is not None
    return A.Compose(
        [
            A.Resize(
                height=size[0],
                width=size[1],
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            )
        ]
    )


def default_mean_std(in_channels: int) -> tuple[list[float], list[float]]:
    """Default normalisation statistics for ``[0, 1]`` images.

    Args:
        in_channels: Number of channels.

    Returns:
        ImageNet mean/std for 3 channels, otherwise 0.5 / 0.25 per channel.
    """
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * in_channels, [0.25] * in_channels


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
    channels = image.shape[2] if image.ndim == 3 else 1
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    if m.size != channels or s.size != channels:
        raise ValueError(
            f"mean/std have {m.size}/{s.size} values but the image has {channels} channel(s); "
            "set data.mean and data.std to one value per channel (or leave them unset)"
        )
    if np.any(s == 0):
        raise ValueError("std must not contain zeros")
    return ((image.astype(np.float32, copy=False) - m) / s).astype(np.float32, copy=False)


def to_tensor_pair(
    image: np.ndarray, mask: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert an (H, W, C) image and (H, W) mask to tensors.

    Args:
        image: (H, W, C) or (H, W) array.
        mask: (H, W) integer array, or None.

    Returns:
        ``(image float32 (C, H, W) contiguous, mask int64 (H, W) or None)``.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    img_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    mask_t = None
    if mask is not None:
        mask_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
    return img_t, mask_t
