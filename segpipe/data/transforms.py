"""Augmentations and tensor conversion (the only module of segpipe that imports albumentations).

All pipelines work on ``(H, W, C)`` images, uint8 or float32 in ``[0, 1]`` (any channel count),
and integer ``(H, W)`` masks. Image and mask always receive the same geometric transform; masks
are always resampled with nearest-neighbour interpolation, so no new label values appear.
Regions created by padding, zooming out or rotating are filled with 0 in the image and
``mask_fill`` (use the ignore index) in the mask; without an ignore index (``mask_fill=None``)
image and mask are mirrored there instead, so no invented pixel is labelled as a class.
:func:`seed_transform` seeds a pipeline (per sample, for reproducible augmentation).

Normalisation is not part of the albumentations pipelines: :func:`normalize_to_tensor` scales,
normalises and converts to a tensor after augmentation, so colour jitter works on the image's
own value range.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (albumentations dependency)
import numpy as np  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GridElastic",
    "Preset",
    "RandomScaleCrop",
    "boundary_weight_map",
    "build_eval_transform",
    "build_train_transform",
    "default_mean_std",
    "normalize",
    "normalize_to_tensor",
    "normalize_uint8_batch",
    "seed_transform",
]

Preset = Literal["none", "light", "default", "strong"]

# The default normalisation is the data spec's, normalisation itself segpipe.data.normalization
# (prediction imports it without albumentations); both re-exported here for existing imports.
from segpipe.data.normalization import (  # noqa: E402
    normalize,
    normalize_to_tensor,
    normalize_uint8_batch,
)
from segpipe.data.spec import IMAGENET_MEAN, IMAGENET_STD, default_mean_std  # noqa: E402
from segpipe.errors import ConfigError  # noqa: E402


class _HueSaturationValueRGB(A.HueSaturationValue):
    """HueSaturationValue that leaves non-RGB images (C != 3) untouched."""

    def apply(self, img: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float,
              **params: Any) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3:
            return img
        out = super().apply(img, hue_shift, sat_shift, val_shift, **params)
        return out.astype(np.float32, copy=False) if img.dtype == np.float32 else out


class RandomScaleCrop(A.DualTransform):
    """Random rescale, centre padding up to ``size`` and a random ``size`` crop, resampling only the crop.

    The random geometry of ``RandomScale(scale) -> PadIfNeeded(size, position="center") ->
    RandomCrop(size)``: a factor drawn uniformly from ``scale``, the image resized to
    ``int(H * factor) x int(W * factor)``, padded (centred) where that is smaller than the crop
    and cropped at a uniformly drawn offset. Those three transforms resample the whole image
    (four times its pixels at factor 2) and then throw most of it away; this one resizes just
    the source window under the crop (plus a margin for the interpolation) with the same factor
    and pastes it into the output. The result equals theirs up to a sub-pixel shift (the
    window's origin lands on a fractional position of the rescaled grid), which is irrelevant
    as augmentation and identical for image and mask. Its cost follows the size of the crop, not
    of the rescaled image, which matters in the loading process that shares the CPU with
    training (figures in the README's Speed section; ``scripts/bench_train.py`` measures the
    loading path as a whole).

    Images are resized bilinearly, masks by nearest neighbour on the same grid (so image and
    mask stay aligned); pixels outside the rescaled image get 0 (image) and ``fill_mask`` (mask),
    or, with ``fill_mask=None``, both are mirrored at the rescaled image's borders (cv2's
    ``BORDER_REFLECT_101``, the U-Net paper's overlap-tile padding), so that no pixel gets a
    label the data does not give it.

    With ``focus_classes``, a fraction ``focus_p`` of the crops is placed so that it holds a
    pixel of one of those classes (nnU-Net's foreground oversampling): one of the listed classes
    present in the mask is drawn uniformly, then one of its pixels, and the crop's offset
    uniformly among those that contain it. Masks holding none of the classes are cropped as
    usual. The scale factor is drawn as without focus, so the crops' sizes keep their
    distribution.

    Args:
        size: Output ``(height, width)``.
        scale: ``(min, max)`` rescale factor; ``(1, 1)`` is a plain pad-and-random-crop.
        fill_mask: Mask value of padded pixels (the ignore index), or None to mirror.
        focus_classes: Classes (mask values) that focused crops are placed on.
        focus_p: Fraction of the crops placed on one of ``focus_classes``; 0 disables it.
        p: Probability of applying (1 for a fixed output size).
    """

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float] = (1.0, 1.0),
        fill_mask: int | None = None,
        focus_classes: Sequence[int] = (),
        focus_p: float = 0.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.fill_mask = fill_mask
        self.focus_classes = tuple(int(c) for c in focus_classes)
        self.focus_p = float(focus_p) if self.focus_classes else 0.0

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "scale", "fill_mask", "focus_classes", "focus_p")

    def _focus_pixel(self, mask: np.ndarray | None) -> tuple[int, int] | None:
        """A ``(row, col)`` of one of the focus classes present in ``mask``, or None."""
        if mask is None:
            return None
        labels = (mask if mask.ndim == 2 else mask[..., 0]).ravel()
        present = [where for c in self.focus_classes if (where := np.flatnonzero(labels == c)).size]
        if not present:
            return None
        where = present[self.py_random.randrange(len(present))]
        row, col = divmod(int(where[self.py_random.randrange(where.size)]), mask.shape[1])
        return row, col

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        factor = self.py_random.uniform(*self.scale)
        sh, sw = max(1, int(height * factor)), max(1, int(width * factor))  # RandomScale's size
        ch, cw = self.size
        # PadIfNeeded(position="center"), then RandomCrop's offset over the padded size.
        pad_top, pad_left = max(0, ch - sh) // 2, max(0, cw - sw) // 2
        span_y, span_x = max(sh, ch) - ch, max(sw, cw) - cw  # the offsets run 0..span
        y0 = int((span_y + 1) * self.py_random.random())
        x0 = int((span_x + 1) * self.py_random.random())
        if self.focus_p and self.py_random.random() < self.focus_p:
            pixel = self._focus_pixel(data.get("mask"))
            if pixel is not None:
                # The pixel's centre on the padded, rescaled grid; any offset whose crop holds it.
                py = pad_top + min(sh - 1, int((pixel[0] + 0.5) * sh / height))
                px = pad_left + min(sw - 1, int((pixel[1] + 0.5) * sw / width))
                y0 = self.py_random.randint(max(0, py - ch + 1), min(span_y, py))
                x0 = self.py_random.randint(max(0, px - cw + 1), min(span_x, px))
        oy, ox = pad_top - y0, pad_left - x0  # the rescaled image's origin in the output
        return {
            "origin": (oy, ox),
            "scaled_shape": (sh, sw),
            "rows": _scaled_window(oy, sh, ch, height),
            "cols": _scaled_window(ox, sw, cw, width),
        }

    def _mirror(self, block: np.ndarray, rows: _Window, cols: _Window) -> np.ndarray:
        """The output with ``block`` (the rescaled image's pixels under the crop) mirrored
        into the padding. Padding only arises along an axis where the whole rescaled image
        lies inside the crop, so the block's edges there are the image's own."""
        ch, cw = self.size
        pad = [(rows.out_start, ch - rows.out_start - rows.count),
               (cols.out_start, cw - cols.out_start - cols.count)]
        pad += [(0, 0)] * (block.ndim - 2)
        return np.pad(block, pad, mode="reflect") if any(a or b for a, b in pad) else block

    def _resample(self, img: np.ndarray, rows: _Window, cols: _Window, interpolation: int,
                  fill: float) -> np.ndarray:
        block = None
        if rows.count and cols.count:
            src = img[rows.src_start : rows.src_stop, cols.src_start : cols.src_stop]
            scaled = cv2.resize(src, (0, 0), fx=cols.factor, fy=rows.factor,
                                interpolation=interpolation)
            if scaled.ndim < src.ndim:  # cv2 drops a trailing channel axis of 1
                scaled = scaled[..., None]
            block = scaled[rows.start : rows.start + rows.count,
                           cols.start : cols.start + cols.count]
            if self.fill_mask is None:
                return np.ascontiguousarray(self._mirror(block, rows, cols))
        out = np.full((*self.size, *img.shape[2:]), fill, dtype=img.dtype)
        if block is not None:
            out[rows.out_start : rows.out_start + rows.count,
                cols.out_start : cols.out_start + cols.count] = block
        return out

    def apply(self, img: np.ndarray, rows: _Window, cols: _Window, **params: Any) -> np.ndarray:
        return self._resample(img, rows, cols, cv2.INTER_LINEAR, 0)

    def apply_to_mask(self, mask: np.ndarray, rows: _Window, cols: _Window,
                      **params: Any) -> np.ndarray:
        # Nearest neighbour by index (cv2's nearest modes map by the ratio of the rounded sizes,
        # which drifts from the image's grid across a small window): the source pixel whose
        # centre is nearest to each pasted pixel's position on the image's grid.
        if self.fill_mask is None and rows.count and cols.count:
            block = mask.take(rows.nearest(), axis=0).take(cols.nearest(), axis=1)
            return np.ascontiguousarray(self._mirror(block, rows, cols))
        out = np.full(self.size, 0 if self.fill_mask is None else self.fill_mask,
                      dtype=mask.dtype)
        if rows.count and cols.count:
            out[rows.out_start : rows.out_start + rows.count,
                cols.out_start : cols.out_start + cols.count] = (
                mask.take(rows.nearest(), axis=0).take(cols.nearest(), axis=1))
        return out


class _Window(NamedTuple):
    """One axis of :class:`RandomScaleCrop`: which source pixels to resize, what to paste where."""

    factor: float  # rescaled size / source size
    src_start: int  # source window [src_start, src_stop)
    src_stop: int
    start: int  # first pasted index in the resized window
    out_start: int  # where it goes in the output
    count: int  # how many pixels are pasted (0: the crop lies wholly in the padding)

    def nearest(self) -> np.ndarray:
        """Source index nearest to each pasted pixel (cv2.resize's grid for the window)."""
        resized = self.start + np.arange(self.count)
        index = self.src_start + np.floor((resized + 0.5) / self.factor).astype(np.intp)
        return np.minimum(index, self.src_stop - 1)


def _scaled_window(origin: int, scaled: int, out: int, source: int) -> _Window:
    """Along one axis: the rescaled image (``scaled`` px) starts at ``origin`` in the output."""
    factor = scaled / source
    first, stop = max(0, origin), min(out, origin + scaled)  # output pixels showing the image
    if stop <= first:
        return _Window(factor, 0, 0, 0, 0, 0)
    s0, s1 = first - origin, stop - origin  # the same, in rescaled coordinates
    # A margin of at least one rescaled pixel on each side feeds the interpolation; at the
    # source's edges cv2.resize replicates the border exactly as it does for the whole image.
    src_start = max(0, int(np.floor((s0 - 1) / factor)) - 1)
    src_stop = min(source, int(np.ceil((s1 + 1) / factor)) + 1)
    start = int(round(s0 - src_start * factor))
    resized = int(round((src_stop - src_start) * factor))  # the size cv2.resize makes
    count = min(s1 - s0, resized - start)
    return _Window(factor, src_start, src_stop, start, first, count)


class _RelativeGaussNoise(A.ImageOnlyTransform):
    """Gaussian noise whose std is a fraction of each band's own std in the image, for images
    that fill only part of their dtype's range (``color_relative``): albumentations'
    ``GaussNoise`` takes a fraction of the dtype's maximum, which on 12-bit data stored as
    16-bit was 7-9 times the data's own spread.

    Args:
        std_range: ``(low, high)`` fractions of each band's std, drawn once per image.
        p: Probability of applying.
    """

    def __init__(self, std_range: tuple[float, float], p: float = 0.5) -> None:
        super().__init__(p=p)
        self.std_range = (float(std_range[0]), float(std_range[1]))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std_range",)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        fraction = self.random_generator.uniform(*self.std_range)
        std = img.reshape(img.shape[0] * img.shape[1], -1).std(axis=0) * fraction  # (C,)
        noise = self.random_generator.standard_normal(img.shape).astype(np.float32) * std
        if img.dtype == np.uint8:  # no colour-relative image is, but keep the dtype's range
            return np.clip(img + noise, 0, 255).astype(np.uint8)
        return (img + noise).astype(img.dtype, copy=False)


class GridElastic(A.DualTransform):
    """Smooth elastic deformation from random displacements on a coarse grid (the U-Net paper's).

    Ronneberger et al. (2015) train on 30 EM slices with "random displacement vectors on a coarse
    3 by 3 grid ... sampled from a Gaussian distribution with 10 pixels standard deviation", the
    per-pixel displacements interpolated bicubically. This is that, stated in pixels of the image
    it is applied to (so put it after the crop). albumentations' ``ElasticTransform`` smooths
    per-pixel noise normalised by its maximum, so its displacement in pixels depends on the image
    size and ``sigma`` in a way no config can state; hence this small transform.

    The image is resampled bilinearly (``cv2.remap``, any channel count and dtype cv2 remaps);
    the mask takes, for each pixel, the label of the source pixel nearest to the same displaced
    position, so no new label values appear. Both reflect at the border (no fill, nothing
    ignored), as the paper's overlap-tile input does.

    Args:
        std: Standard deviation of the grid displacements in pixels (0 disables).
        grid: Grid points per side (3 in the paper).
        p: Probability of applying.
    """

    def __init__(self, std: float = 10.0, grid: int = 3, p: float = 1.0) -> None:
        super().__init__(p=p)
        if std < 0 or grid < 2:
            raise ConfigError(f"GridElastic needs std >= 0 and grid >= 2, got std={std}, grid={grid}")
        self.std = float(std)
        self.grid = int(grid)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std", "grid")

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        coarse = self.random_generator.normal(0.0, self.std, size=(2, self.grid, self.grid))
        dy, dx = (cv2.resize(c.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
                  for c in coarse)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        return {"map_y": rows + dy, "map_x": cols + dx}

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
              **params: Any) -> np.ndarray:
        out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        return out[..., None] if out.ndim < img.ndim else out  # cv2 drops a channel axis of 1

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
                      **params: Any) -> np.ndarray:
        rows = _reflect101(np.rint(map_y).astype(np.intp), mask.shape[0])
        cols = _reflect101(np.rint(map_x).astype(np.intp), mask.shape[1])
        return mask[rows, cols]


def _reflect101(index: np.ndarray, size: int) -> np.ndarray:
    """Indices folded into ``[0, size)`` as cv2's ``BORDER_REFLECT_101`` does (``-1 -> 1``)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def seed_transform(transform: A.BaseCompose | A.BasicTransform, seed: int) -> None:
    """Seed a pipeline so that its transforms draw from one stream.

    albumentations' ``set_random_seed`` gives every transform its own generator seeded with the
    same value, so their first draws are equal: with a seed set per sample, "flip?" (p=0.5)
    came out the same as "brightness/contrast?" (p=0.5) and as a scale factor in the lower half
    of its range, for every sample. Here one numpy and one Python generator, seeded with
    ``seed``, are handed to the pipeline with albumentations' public ``set_random_state``, which
    passes the same two generators down to every transform (nested Composes included), so each
    draw is a fresh number and the augmentations are independent. It runs once per training
    sample, so it is kept cheap: it creates two generators for the whole pipeline, where
    ``set_random_seed`` creates two per transform (figures in the README's Speed section; the
    loading path as a whole is measured by ``scripts/bench_train.py``).

    Args:
        transform: A Compose (nested ones included) or a single transform.
        seed: Any int (reduced modulo 2**32).
    """
    seed = int(seed) % (2**32)
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


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
        raise ConfigError(f"crop_size must be a positive int or (height, width), got {crop_size!r}")
    return size[0], size[1]


def build_train_transform(
    preset: Preset = "default",
    crop_size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    vflip: bool = False,
    rotate90: bool = False,
    color: bool = True,
    mask_fill: int | None = None,
    color_relative: bool = False,
    elastic: float = 0.0,
    channel_gain: tuple[float, float] | None = None,
    focus_classes: Sequence[int] = (),
    focus_p: float = 0.0,
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
        mask_fill: Mask value for padded / out-of-image pixels (the ignore index; the image
            gets 0 there), or None (no ignore index) to mirror image and mask at their borders
            instead (``BORDER_REFLECT_101``): a fill value would label invented pixels as a
            class.
        color_relative: Shift brightness by a fraction of the image's mean instead of the
            dtype's maximum, add ``strong``'s noise as a fraction of each band's std instead
            of the dtype's maximum, and leave hue and saturation alone. For images whose values fill
            only part of ``[0, 1]`` (12/16-bit scans, reflectance rasters scaled by 1/65535), a
            shift of 0.2 of the maximum would be many times the data's own spread, and their
            bands are no RGB photo's.
        elastic: Standard deviation in pixels of a smooth elastic deformation of the crop
            (:class:`GridElastic`, the U-Net paper's 3x3 grid; it used 10), applied to every
            sample unless the preset is ``"none"``; 0 disables it.
        channel_gain: ``(low, high)``: each channel multiplied by its own factor, uniform in
            the range (albumentations' ``MultiplicativeNoise`` per channel, not per pixel), on
            every sample unless the preset is ``"none"``; None disables it. Values are clipped
            to the dtype's range as albumentations does (the dataset runs a float image with
            values beyond ``[0, 1]`` through these pixel transforms scaled per band into
            ``[0, 0.5]``).
        focus_classes: With ``crop_size``: classes that a fraction ``focus_p`` of the crops is
            placed on (:class:`RandomScaleCrop`), for classes too rare or small for uniform
            crops to show often.
        focus_p: That fraction, in ``[0, 1]``; 0 disables it.

    Returns:
        An ``albumentations.Compose`` taking ``image=float32 HWC, mask=int HW``.
    """
    if preset not in ("none", "light", "default", "strong"):
        raise ConfigError(
            f"unknown augmentation preset {preset!r}; use none, light, default or strong"
        )
    size = _hw(crop_size)
    lo, hi = (float(scale[0]), float(scale[1]))
    if not 0 < lo <= hi:
        raise ConfigError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
    fill_kw: dict[str, Any] = (
        {"border_mode": cv2.BORDER_REFLECT_101} if mask_fill is None
        else {"border_mode": cv2.BORDER_CONSTANT, "fill": 0.0, "fill_mask": mask_fill})
    ops: list[Any] = []

    scaled = preset in ("default", "strong") and (lo, hi) != (1.0, 1.0)
    if scaled and size is None:
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
    if preset != "none" and rotate90:
        ops.append(A.RandomRotate90(p=1.0))
    if size is not None:
        # Rescale + pad + crop in one resampling of just the crop; flips after it are cheaper
        # on the crop and, the crop offset being uniform, give the same distribution.
        ops.append(RandomScaleCrop(size, (lo, hi) if scaled else (1.0, 1.0), mask_fill,
                                   focus_classes=focus_classes, focus_p=focus_p))
    if preset != "none" and elastic > 0:
        ops.append(GridElastic(std=elastic))
    if preset != "none":
        if hflip:
            ops.append(A.HorizontalFlip(p=0.5))
        if vflip:
            ops.append(A.VerticalFlip(p=0.5))
    if channel_gain is not None and preset != "none":
        ops.append(A.MultiplicativeNoise(multiplier=tuple(channel_gain), per_channel=True,
                                         elementwise=False, p=1.0))
    if color and preset != "none":
        # An 8-bit RGB photo's jitter: brightness by the dtype's maximum, and hue and
        # saturation, which on 3 bands picked from a 16-bit product mixed the bands and
        # shifted them by several std.
        photo = not color_relative
        if preset == "light":
            ops.append(A.RandomBrightnessContrast(0.1, 0.1, brightness_by_max=photo, p=0.5))
        elif preset == "default":
            ops.append(A.RandomBrightnessContrast(0.2, 0.2, brightness_by_max=photo, p=0.5))
            if photo:
                ops.append(_HueSaturationValueRGB(10, 15, 10, p=0.3))
        else:
            ops.append(A.RandomBrightnessContrast(0.3, 0.3, brightness_by_max=photo, p=0.8))
            if photo:
                ops.append(_HueSaturationValueRGB(20, 30, 20, p=0.5))
            ops.append(_RelativeGaussNoise((0.05, 0.25), p=0.3) if color_relative
                       else A.GaussNoise(std_range=(0.01, 0.05), p=0.3))
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


def boundary_weight_map(
    labels: np.ndarray, object_class: int, w0: float = 10.0, sigma: float = 5.0
) -> np.ndarray:
    """The U-Net paper's border weights: thin gaps between touching objects weigh more.

    Objects are the 4-connected regions of ``object_class`` (cells, for ISBI's membranes).
    Every other pixel gets ``1 + w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))``, with ``d1`` and
    ``d2`` its distances to the nearest and the second-nearest object (Ronneberger et al. 2015,
    eq. 2, with ``w0 = 10`` and ``sigma = 5`` px); object pixels get 1. The class-balancing part
    of the paper's map is the loss's ``class_weights``, which multiply these weights. Distances
    are measured in a window of ``4 * sigma`` around each object (beyond it the term is below
    ``w0 * 3.4e-4``), so the cost grows with the objects' area, not with their number times
    the image's.

    Args:
        labels: (H, W) integer class indices (after augmentation: distances are in the
            network's pixels).
        object_class: The class whose connected regions are the objects.
        w0: Weight of the border term.
        sigma: Its width in pixels.

    Returns:
        (H, W) float32 weights, >= 1.
    """
    objects = np.ascontiguousarray(labels == object_class, dtype=np.uint8)
    count, regions, stats, _ = cv2.connectedComponentsWithStats(objects, connectivity=4)
    height, width = objects.shape
    weights = np.ones((height, width), np.float32)
    if count < 3:  # background + fewer than two objects: no gap between objects
        return weights
    reach = int(np.ceil(4 * sigma))
    d1 = np.full((height, width), np.inf, np.float32)
    d2 = np.full((height, width), np.inf, np.float32)
    for region in range(1, count):
        x, y, w, h = (int(v) for v in stats[region, :4])
        y0, y1 = max(0, y - reach), min(height, y + h + reach)
        x0, x1 = max(0, x - reach), min(width, x + w + reach)
        outside = np.ascontiguousarray(regions[y0:y1, x0:x1] != region, dtype=np.uint8)
        dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        near1, near2 = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]  # views: updated in place
        np.minimum(near2, np.maximum(near1, dist), out=near2)
        np.minimum(near1, dist, out=near1)
    gap = d1 + d2  # inf where a second object is out of reach: the term is 0 there
    border = np.exp(-(gap * gap) / np.float32(2 * sigma * sigma)) * np.float32(w0)
    weights += np.where(objects.astype(bool), np.float32(0), border)
    return weights
