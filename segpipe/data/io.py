"""Reading and writing raster images and masks.

This is the only module of segpipe that imports Pillow and rasterio. rasterio (with GDAL) is
imported on first use, not with this module: when a TIFF or a 16-bit RGB PNG is read or
written, or a raster is opened by windows (:func:`probe_raster`, :func:`open_raster`,
:class:`RasterWriter`), so runs on PNG/JPEG data never load it. Everything else reads
pixels through :func:`read_image`, :func:`read_mask` and :func:`image_size`, and gets an
:class:`ImageReadError` (a ``ValueError`` that names the file, says what is wrong and how to fix
it) for any file that cannot be used, never a traceback from inside a library.

Conversions applied on read (documented so that nothing happens silently):

* EXIF orientation is applied (``ImageOps.exif_transpose``), so pixels come back the way image
  viewers show them. :func:`image_size` reports the size after that rotation.
* Grayscale images come back with one channel, ``(H, W, 1)``.
* Palette (``P``) images are converted to RGB by :func:`read_image`; :func:`read_mask` keeps
  their palette *indices*, which is how index masks are usually stored (e.g. Pascal VOC).
* Alpha is dropped: RGBA -> RGB, LA -> L (also TIFF bands whose colour interpretation is alpha).
* 16-bit RGB(A) PNGs, which Pillow would truncate to 8 bits, are read with rasterio/GDAL so no
  precision is lost.
* Native dtypes are kept by the readers; :func:`to_float` scales integer images to ``[0, 1]``
  by the dtype's maximum (uint8 / 255, uint16 / 65535, ...). Floats are left unchanged.

Decompression bombs: Pillow refuses images larger than ``2 * PIL.Image.MAX_IMAGE_PIXELS``; the
same limit is applied to rasters read whole with rasterio (see :func:`pixel_limit`).
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TIFF_EXTENSIONS",
    "UNREAD_RASTER_EXTENSIONS",
    "ImageReadError",
    "RasterInfo",
    "RasterReader",
    "RasterWriter",
    "image_size",
    "grid_mismatch",
    "is_image_file",
    "is_jpeg",
    "exif_orientation",
    "mask_palette",
    "open_raster",
    "pixel_limit",
    "probe_raster",
    "read_image",
    "sidecar_georeference",
    "may_have_nodata",
    "read_image_valid",
    "read_image_validities",
    "read_mask",
    "to_float",
    "write_image",
    "write_label_png",
    "OUTPUT_STAMP_KEY",
    "input_fingerprint",
    "read_output_stamp",
    "write_mask",
]


_WARN_LOCK = threading.Lock()


def _open_raster(path: Path, *args: Any, **kwargs: Any) -> Any:
    """``rasterio.open`` without NotGeoreferencedWarning (plain images are normal input).

    ``warnings.catch_warnings`` is not thread-safe, so concurrent opens (the checker's thread
    pool) are serialised around it; only the header parsing happens inside the lock.

    rasterio (and GDAL with it) is imported here, on first use, not with this module: most runs
    read PNG/JPEG only, and every command imports this module.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with _WARN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, *args, **kwargs)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
)
"""File extensions (lower case) that segpipe treats as images."""

TIFF_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff")
"""Extensions read with rasterio first (any band count, GeoTIFF)."""

UNREAD_RASTER_EXTENSIONS: frozenset[str] = frozenset({
    ".vrt", ".jp2", ".j2k", ".img", ".ecw", ".sid", ".hdf", ".nc", ".dem", ".bil", ".rst",
    ".ntf", ".kea", ".grd", ".geotiff", ".gtiff",
})
"""Raster formats GDAL reads and segpipe does not (a folder of them is named, not skipped in
silence): convert them to GeoTIFF (``gdal_translate -of GTiff``)."""

_DEFAULT_HINT = "re-export the file (e.g. as PNG or GeoTIFF) or remove it from the data set"
_ORIENTATION_TAG = 0x0112
_PathLike = str | PathLike[str]


class ImageReadError(ValueError):
    """A file could not be used as an image or mask.

    The message is ``"{path}: {reason}"`` followed by a hint on how to fix it.

    Attributes:
        path: The offending file.
        reason: Plain-language reason, e.g. ``"file is empty (0 bytes)"``.
        hint: Suggested fix.
        kind: ``"channels"`` when the file's bands or channels do not fit the selection or the
            model (the hint names training options; prediction gives its own), else None.
        file_bands: With ``"channels"``, the file's band (channel) count, when known.
    """

    def __init__(
        self, path: _PathLike, reason: str, hint: str | None = None, kind: str | None = None,
        file_bands: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint or _DEFAULT_HINT
        self.kind = kind
        self.file_bands = file_bands
        super().__init__(f"{self.path}: {reason} ({self.hint})")

    def with_hint(self, hint: str) -> ImageReadError:
        """The same error with another fix (e.g. the prediction command's option)."""
        return ImageReadError(self.path, self.reason, hint, self.kind, self.file_bands)


_JPEG_SIGNATURE = b"\xff\xd8\xff"


def is_jpeg(path: str | os.PathLike[str]) -> bool:
    """Whether a file is a JPEG, by its first bytes (the name's suffix when it cannot be read).

    Args:
        path: File.

    Returns:
        True for JPEG data (``.jpg`` or not).
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(3) == _JPEG_SIGNATURE
    except OSError:
        return Path(path).suffix.lower() in {".jpg", ".jpeg", ".jpe", ".jfif"}


def is_image_file(path: _PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive).

    Args:
        path: File name or path.

    Returns:
        True for image extensions; hidden files (starting with ``.``) are never images.
    """
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def pixel_limit() -> int | None:
    """The largest ``H * W`` that is read whole (decompression-bomb guard).

    Returns:
        ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's own error threshold), or None when the
        guard is disabled (``PIL.Image.MAX_IMAGE_PIXELS = None``).
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(2 * limit)


def _bomb_reason(width: int | None, height: int | None, pixels: int | None = None) -> str:
    limit = pixel_limit()
    size = f"{width}×{height}" if width and height else f"{pixels}"
    return (
        f"image of {size} pixels exceeds the decompression-bomb limit of {limit} pixels"
    )


_BOMB_HINT = (
    "if the file is trusted, raise the limit: SEGPIPE_MAX_IMAGE_PIXELS=N (or none) in the "
    "environment, PIL.Image.MAX_IMAGE_PIXELS in Python; or cut the image into tiles"
)


def _limit_from_environment() -> None:
    """``SEGPIPE_MAX_IMAGE_PIXELS`` (a number, or ``none``) sets Pillow's decompression-bomb
    limit, which the command line cannot otherwise reach."""
    value = os.environ.get("SEGPIPE_MAX_IMAGE_PIXELS", "").strip()
    if not value:
        return
    if value.lower() in ("none", "off", "0"):
        Image.MAX_IMAGE_PIXELS = None
        return
    try:
        Image.MAX_IMAGE_PIXELS = int(float(value))
    except ValueError:
        warnings.warn(f"SEGPIPE_MAX_IMAGE_PIXELS must be a number of pixels or none, got "
                      f"{value!r}; Pillow's default limit stays", stacklevel=2)


_limit_from_environment()


def _check_file(path: Path) -> None:
    """Raise ImageReadError for missing, non-regular or empty files."""
    if not path.exists():
        if path.is_symlink():
            raise ImageReadError(path, f"a link that leads to no file (to {os.readlink(path)}: "
                                 "missing, or a loop of links)",
                                 "point the link at the file, or remove it")
        raise ImageReadError(path, "file not found", "check the path and the data root")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file", "point to an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(
            path, "file is empty (0 bytes)", "re-export or re-download the file"
        )


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) of a PNG from its IHDR chunk, or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24], head[25]


def _needs_gdal_png(path: Path) -> bool:
    """True for 16-bit grey+alpha, RGB and RGBA PNGs, which Pillow truncates to 8 bits."""
    header = _png_header(path)
    return header is not None and header[2] == 16 and header[3] in (2, 4, 6)


def _unchecked_header_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from the header without Pillow's bomb check (only to word the error)."""
    header = _png_header(path)
    if header is not None:
        return header[0], header[1]
    try:
        Image.init()
        with open(path, "rb") as fh:
            prefix = fh.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                if accept is not None and not accept(prefix):
                    continue
                fh.seek(0)
                try:
                    im = factory(fh, str(path))
                except Exception:  # noqa: BLE001 - any failure just means "not this format"
                    continue
                return im.size
    except Exception:  # noqa: BLE001
        return None
    return None


def _open_pillow(path: Path) -> Image.Image:
    """Image.open with plain-language errors (header only, no pixel decode)."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        size = _unchecked_header_size(path)
        if size is not None:
            reason = _bomb_reason(size[0], size[1])
        else:
            reason = f"{_bomb_reason(None, None, None)} ({exc})"
        raise ImageReadError(path, reason, _BOMB_HINT) from None
    except UnidentifiedImageError:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:  # a VRT, ERDAS .img, JPEG 2000...
            raise ImageReadError(
                path,
                f"segpipe does not read {path.suffix or 'extension-less'} files (it reads "
                f"{', '.join(IMAGE_EXTENSIONS)}; rasters as GeoTIFF)",
                f"convert it, e.g. gdal_translate -of GTiff -co TILED=YES {path.name} "
                f"{path.stem}.tif for a raster GDAL reads",
            ) from None
        kind = _signature(path)
        if kind is not None:  # an image's first bytes, but no readable header: cut short?
            raise ImageReadError(
                path, f"truncated or corrupt image data (it starts as a {kind} file, but its "
                "header cannot be read)", "copy or export the file again") from None
        raise ImageReadError(
            path,
            "not an image Pillow or rasterio can read",
            "check that the file really is an image (not text or HTML saved with an image "
            "extension) and re-export it",
        ) from None
    except PermissionError as exc:
        raise ImageReadError(path, f"no permission to read the file ({exc.strerror})",
                             _NO_PERMISSION_FIX) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from None


_NO_PERMISSION_FIX = ("give the user running segpipe read access to it (e.g. chmod a+r FILE, "
                      "and a+x on its folders)")

#: The Pillow formats of :data:`IMAGE_EXTENSIONS`, whose first bytes tell a damaged image from
#: a file that is no image at all.
_READ_FORMATS = ("TIFF", "PNG", "JPEG", "BMP", "GIF", "WEBP")


def _signature(path: Path) -> str | None:
    """The image format ``path``'s first bytes announce (Pillow's own check of each format
    segpipe reads), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    Image.init()
    for fmt in _READ_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(head):
            return fmt
    return None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) read without decoding pixels where possible."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF: treat as unrotated
        return 1


def _decode_pillow(path: Path) -> Image.Image:
    """Open, fully decode and EXIF-transpose an image with Pillow."""
    img = _open_pillow(path)
    with img:
        _refuse_pillow_stack(img, path)
        try:
            img.load()
            out = ImageOps.exif_transpose(img)  # a decoded copy, independent of the file
        except Image.DecompressionBombError:
            raise ImageReadError(path, _bomb_reason(*img.size), _BOMB_HINT) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
            raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from None
    return out


def _pillow_to_array(img: Image.Image, path: Path, *, as_mask: bool) -> np.ndarray:
    """Convert a decoded Pillow image to an array (H, W, C) for images, (H, W[, 3]) for masks."""
    mode = img.mode
    try:
        if mode == "1":
            # Bilevel: 0/255 for images, 0/1 for masks.
            arr = np.asarray(img, dtype=np.uint8)
            if not as_mask:
                arr = arr * np.uint8(255)
        elif mode == "P" or mode == "PA":
            if as_mask:
                arr = np.asarray(img.convert("P") if mode == "PA" else img)
            else:
                arr = np.asarray(img.convert("RGB"))
        elif mode in ("L", "RGB", "F", "I") or mode.startswith("I;16"):
            arr = np.asarray(img)
        elif mode == "LA":
            arr = np.asarray(img.getchannel("L"))
        elif mode in ("RGBA", "RGBa", "RGBX"):
            arr = np.asarray(img.convert("RGB"))
        else:  # CMYK, YCbCr, LAB, HSV, ...
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ImageReadError(
            path, f"unsupported image mode {mode!r} ({exc})", "re-export as RGB or grayscale"
        ) from None
    arr = np.array(arr)  # own, writable copy
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        # 16-bit grayscale opened as 32-bit "I" by some Pillow versions.
        header = _png_header(path)
        if header is not None and header[2] == 16:
            arr = arr.astype(np.uint16)
    if not as_mask and arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _data_indexes(ds: Any, path: Path, bands: Sequence[int] | None,
                  channels: int | None) -> tuple[list[int], bool]:
    """The 1-based bands to read, and whether an alpha-tagged band is among them as data.

    ``bands`` when given; else every band but those tagged alpha, unless ``channels`` (what
    the model takes) is the file's whole band count: then the alpha-tagged band is data, as
    in a 4-band RGB + near-infrared uint8 GeoTIFF that GDAL's defaults tag RGBA.
    """
    from rasterio.enums import ColorInterp

    if bands is not None:
        return _check_bands(path, bands, ds.count), False
    interps = list(ds.colorinterp or [])
    alpha = [i + 1 for i in range(ds.count)
             if i < len(interps) and interps[i] == ColorInterp.alpha and ds.count > 1]
    if alpha and channels == ds.count:
        return list(range(1, ds.count + 1)), True
    return [i for i in range(1, ds.count + 1) if i not in alpha], False


def _unread_alpha(ds: Any, indexes: Sequence[int]) -> list[int]:
    """The 1-based alpha-tagged bands not read as data: the file's transparency mask. GDAL
    applies an alpha band as the mask of the others only in 2- and 4-band files, so the alpha
    band ``gdalwarp -dstalpha`` adds to a 4-band scene would otherwise mark nothing."""
    from rasterio.enums import ColorInterp, MaskFlags

    if any(MaskFlags.alpha in ds.mask_flag_enums[i - 1] for i in indexes):
        return []  # GDAL's masks of the bands read are the alpha band already
    interps = list(ds.colorinterp or [])
    return [i + 1 for i, interp in enumerate(interps[: ds.count])
            if interp == ColorInterp.alpha and ds.count > 1 and i + 1 not in indexes]


def _has_mask(ds: Any, indexes: Sequence[int], alpha_as_data: bool) -> bool:
    """Whether any of the bands read has nodata (a nodata value, an internal mask or an alpha
    band; with ``alpha_as_data`` the alpha-tagged band is data, and only nodata values count)."""
    from rasterio.enums import MaskFlags

    flags = [ds.mask_flag_enums[i - 1] for i in indexes]
    if alpha_as_data:  # the "alpha" band is data: its zeros are no nodata
        return any(MaskFlags.nodata in f for f in flags)
    return bool(_unread_alpha(ds, indexes)) or any(
        list(f) != [MaskFlags.all_valid] for f in flags)


def _band_masks(ds: Any, indexes: Sequence[int], window: Any = None,
                every: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """GDAL's validity of the bands read, band by band (no (C, h, w) mask array): valid where
    any band is (the dataset-mask rule), and with ``every`` also where every band is; in both,
    invalid where an alpha band not read as data is 0."""
    valid: np.ndarray | None = None
    all_valid: np.ndarray | None = None
    for index in indexes:
        band_valid = ds.read_masks(index, window=window) > 0
        if valid is None:
            valid, all_valid = band_valid, band_valid.copy() if every else None
        else:
            np.logical_or(valid, band_valid, out=valid)
            if all_valid is not None:
                np.logical_and(all_valid, band_valid, out=all_valid)
    assert valid is not None
    for alpha in _unread_alpha(ds, indexes):
        opaque = ds.read(alpha, window=window) > 0
        np.logical_and(valid, opaque, out=valid)
        if all_valid is not None:
            np.logical_and(all_valid, opaque, out=all_valid)
    return valid, all_valid


def _read_rasterio(
    path: Path, bands: Sequence[int] | None, *, as_mask: bool, channels: int | None = None,
    validity: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    """Read a whole raster with rasterio as ``((H, W, C), validity, every band's validity)``:
    the validity (H, W) bool (as :meth:`RasterReader.read` decides it) only when asked for and
    some pixel is nodata, else None; the third, in a float raster with pixels that are nodata
    in some of the bands read only, where every band read holds data, else None. None if
    rasterio cannot open the file."""
    from rasterio.enums import ColorInterp
    from rasterio.errors import RasterioError, RasterioIOError

    try:
        ds = _open_raster(path)
    except (RasterioIOError, RasterioError):
        return None
    with ds:
        _refuse_stack(ds, path)
        limit = pixel_limit()
        if limit is not None and ds.width * ds.height > limit:
            raise ImageReadError(path, _bomb_reason(ds.width, ds.height), _BOMB_HINT)
        indexes, alpha_as_data = _data_indexes(ds, path, bands, channels)
        valid = every = None
        try:
            data = ds.read(indexes)
            if validity and _has_mask(ds, indexes, alpha_as_data):
                valid, every = _band_masks(ds, indexes, every=data.dtype.kind == "f")
                every = None if every is None or np.array_equal(every, valid) else every
                valid = None if valid.all() else valid
        except (RasterioIOError, RasterioError) as exc:
            raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from None
        except MemoryError:
            raise ImageReadError(
                path, f"not enough memory to read {ds.width}×{ds.height}×{len(indexes)}",
                "cut the image into tiles",
            ) from None
        if (
            not as_mask
            and bands is None
            and len(indexes) == 1
            and ds.colorinterp
            and ds.colorinterp[0] == ColorInterp.palette
        ):
            try:
                cmap = ds.colormap(1)
                lut = np.zeros((max(256, max(cmap) + 1), 3), dtype=np.uint8)
                for k, rgba in cmap.items():
                    lut[k] = rgba[:3]
                data = np.moveaxis(lut[data[0]], -1, 0)
            except ValueError:
                pass
    return np.ascontiguousarray(np.moveaxis(data, 0, -1)), valid, every


def _check_bands(path: Path, bands: Sequence[int], count: int) -> list[int]:
    """Validate a 1-based band selection against a band count."""
    out: list[int] = []
    for b in bands:
        if isinstance(b, bool) or int(b) != b or not 1 <= int(b) <= count:
            raise ImageReadError(
                path,
                f"band {b} requested but the file has {count} band(s) (bands are 1-based)",
                f"set data.bands to values between 1 and {count}", kind="channels",
                file_bands=count,
            )
        out.append(int(b))
    if not out:
        raise ImageReadError(path, "empty band selection", "set data.bands to null or a list")
    return out


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTENSIONS


_STACK_HINT = ("save each page as its own file (Pillow's ImageSequence.Iterator reads them one "
               "by one), a mask file beside each image file")


def _stack_error(path: Path, pages: int, what: str = "pages") -> ImageReadError:
    """A file that holds several images (a multi-page TIFF, an animated GIF): segpipe reads
    one image per file, and reading the first alone would drop the others silently."""
    return ImageReadError(
        path, f"the file holds {pages} {what} (an image stack); segpipe reads one image per "
        "file and would use the first alone", _STACK_HINT)


def _refuse_stack(ds: Any, path: Path) -> None:
    """Refuse a multi-page TIFF that GDAL opened (its pages are subdatasets; a GeoTIFF's
    overviews and internal mask are not), and complex-valued bands (SAR's single-look complex
    data: numpy would keep the real part alone, with a warning)."""
    pages = len(ds.subdatasets or ())
    if pages > 1:
        raise _stack_error(path, pages)
    if any(str(t).startswith("complex") for t in ds.dtypes):
        raise ImageReadError(
            path, f"its bands hold complex values ({', '.join(sorted(set(ds.dtypes)))}, "
            "as SAR's single-look complex data do); segpipe reads real-valued images",
            "convert them to amplitude first: np.abs(dataset.read()) written with rasterio, or "
            "gdal_calc.py -A IN --calc 'absolute(A)' --type Float32 --outfile OUT")


def _refuse_pillow_stack(img: Image.Image, path: Path) -> None:
    """Refuse a multi-page TIFF or an animated GIF/WebP/PNG read with Pillow (a camera's MPO
    JPEG, whose second frame is a preview, is read as its first image)."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1 and img.format in ("TIFF", "GIF", "WEBP", "PNG"):
        raise _stack_error(path, frames, "pages" if img.format == "TIFF" else "frames")


def read_image(
    path: _PathLike, bands: Sequence[int] | None = None, channels: int | None = None
) -> np.ndarray:
    """Read an image as an (H, W, C) array in its native dtype.

    ``.tif``/``.tiff`` files (any band count, GeoTIFF) are read with rasterio, falling back to
    Pillow when rasterio cannot open them; everything else with Pillow (16-bit RGB PNGs with
    rasterio, see the module docstring). The whole file is decoded, so truncated files fail here.

    Args:
        path: Image file.
        bands: Optional 1-based band/channel selection, e.g. ``[4, 3, 2]``.
        channels: The channels the model takes, if known: a raster band tagged alpha is kept
            as data when the model takes all of the file's bands (see :func:`_data_indexes`).

    Returns:
        Array of shape (H, W, C), dtype as stored (uint8, uint16, float32, ...).

    Raises:
        ImageReadError: Missing, empty, truncated, non-image or too large files, bad ``bands``.
    """
    return _read_image(Path(path), bands, channels, validity=False)[0]


def read_image_valid(
    path: _PathLike, bands: Sequence[int] | None = None, channels: int | None = None,
    alpha_nodata: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_image` with the image's validity, read in the same pass: which pixels hold
    data, from a raster's declared nodata, internal mask or alpha band, as ``segpipe predict``
    reads them (:meth:`RasterReader.read`).

    Args:
        path: Image file.
        bands: 1-based band selection, as for :func:`read_image`.
        channels: The channels the model takes, if known.
        alpha_nodata: Also take the transparent pixels (alpha 0) of a PNG/WebP with an alpha
            channel as nodata, as GDAL reads a raster's alpha band (for a georeferenced map
            tile, whose transparent collar holds no data); else its alpha is dropped.

    Returns:
        ``(image, validity)``: the image as :func:`read_image` gives it, and (H, W) bool, True
        where the pixel holds data, or None when every pixel does (and for every file that
        is not a raster with a nodata declaration, nor, with ``alpha_nodata``, an image with
        transparent pixels).

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    return _read_image(Path(path), bands, channels, validity=True, alpha_nodata=alpha_nodata)[:2]


def read_image_validities(
    path: _PathLike, bands: Sequence[int] | None = None, channels: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`read_image_valid`, and where every band read holds data.

    A float raster's pixel that is nodata in some of the bands read only is valid (GDAL's
    rule, which ``segpipe predict`` follows), but holds the nodata value (a sentinel such as
    -9999) in those bands: band statistics leave such pixels out, and the data check warns
    of them.

    Args:
        path: Image file.
        bands: 1-based band selection, as for :func:`read_image`.
        channels: The channels the model takes, if known.

    Returns:
        ``(image, validity, every band's validity)``: the first two as
        :func:`read_image_valid` gives them; the third (H, W) bool, True where every band
        read holds data, only in a float raster with pixels that are nodata in some bands
        only, else None.

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    return _read_image(Path(path), bands, channels, validity=True)


def may_have_nodata(path: _PathLike) -> bool:
    """Whether :func:`read_image_valid` may find nodata in ``path`` (without ``alpha_nodata``):
    a raster rasterio reads (a TIFF, a 16-bit colour PNG), not a plain image."""
    p = Path(path)
    return _is_tiff(p) or _needs_gdal_png(p)


def _read_image(p: Path, bands: Sequence[int] | None, channels: int | None,
                validity: bool, alpha_nodata: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    _check_file(p)
    if may_have_nodata(p):
        read = _read_rasterio(p, bands, as_mask=False, channels=channels, validity=validity)
        if read is not None:
            return read
    img = _decode_pillow(p)
    valid = None
    if validity and alpha_nodata and (img.mode in ("RGBA", "LA", "PA")
                                      or "transparency" in img.info):
        # an alpha channel, or a palette's transparent index (tRNS) as map tiles have it
        alpha = img if img.mode in ("RGBA", "LA", "PA") else img.convert("RGBA")
        opaque = np.asarray(alpha.getchannel("A")) > 0
        valid = None if opaque.all() else opaque
    arr = _pillow_to_array(img, p, as_mask=False)
    if bands is not None:
        idx = _check_bands(p, bands, arr.shape[2])
        arr = np.ascontiguousarray(arr[:, :, [i - 1 for i in idx]])
    return arr, valid, None


def read_mask(path: _PathLike, colours: bool = False) -> np.ndarray:
    """Read a segmentation mask.

    Single-channel masks (index masks, including palette PNGs, whose palette *indices* are the
    labels) come back as (H, W) int64. RGB masks (colour-coded classes) come back as (H, W, 3)
    uint8; alpha is dropped. Float masks must hold whole numbers.

    Args:
        path: Mask file.
        colours: Read a palette image as the colours its palette gives (for
            ``data.mask_colors``): tools that save colour masks as palette PNGs give each file
            its own palette order, so the indices mean other classes in each file.

    Returns:
        (H, W) int64 array of raw label values, or (H, W, 3) uint8 array of colours.

    Raises:
        ImageReadError: Unreadable files (as :func:`read_image`), masks with an unsupported band
            count, or float masks with fractional values.
    """
    p = Path(path)
    _check_file(p)
    arr: np.ndarray | None = None
    if _is_tiff(p) or _needs_gdal_png(p):
        read = _read_rasterio(p, None, as_mask=not colours)
        if read is not None:
            arr = read[0][:, :, 0] if read[0].shape[2] == 1 else read[0]
    if arr is None:
        img = _decode_pillow(p)
        if colours and img.mode in ("P", "PA"):
            img = img.convert("RGB")
        arr = _pillow_to_array(img, p, as_mask=True)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] in (3, 4):
            if arr.dtype != np.uint8:
                raise ImageReadError(
                    p,
                    f"colour mask of dtype {arr.dtype} (expected 8-bit RGB)",
                    "save colour-coded masks as 8-bit RGB PNG, or index masks as one band",
                )
            return np.ascontiguousarray(arr[:, :, :3])
        else:
            raise ImageReadError(
                p,
                f"mask has {arr.shape[2]} bands; expected 1 (class indices) or 3 (RGB colours)",
                "save the mask as a single-band index image",
            )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ImageReadError(
                p,
                "mask holds non-integer values",
                "save masks as integer class indices (e.g. uint8 PNG)",
            )
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise ImageReadError(p, f"unsupported mask dtype {arr.dtype}", "save as uint8 PNG")
    return arr.astype(np.int64)


def mask_palette(path: _PathLike) -> list[tuple[int, int, int]] | None:
    """The RGB palette of a palette (``P``) image, index by index, from its header; None for
    any other image (and files Pillow cannot open)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "PA"):
                return None
            flat = img.getpalette("RGB") or []
    except (OSError, ValueError, SyntaxError):
        return None
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat) - 2, 3)]  # type: ignore[misc]


def image_size(path: _PathLike) -> tuple[int, int]:
    """(H, W) of an image or mask from its header, without decoding pixels.

    EXIF orientation is taken into account so the size matches :func:`read_image`.

    Args:
        path: Image or mask file.

    Returns:
        ``(height, width)``.

    Raises:
        ImageReadError: Missing, empty or unreadable files, decompression bombs.
    """
    p = Path(path)
    _check_file(p)
    if _is_tiff(p) or _needs_gdal_png(p):
        from rasterio.errors import RasterioError, RasterioIOError

        try:
            with _open_raster(p) as ds:
                _refuse_stack(ds, p)
                return int(ds.height), int(ds.width)
        except (RasterioIOError, RasterioError):
            pass
    img = _open_pillow(p)
    with img:
        _refuse_pillow_stack(img, p)
        width, height = img.size
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
    return int(height), int(width)


def exif_orientation(path: _PathLike) -> int:
    """The EXIF orientation of an image file (1..8; 1 for none, or a file Pillow does not
    open): above 1, :func:`read_image` returns the pixels turned as viewers show them."""
    p = Path(path)
    if _is_tiff(p) or _needs_gdal_png(p):  # read by rasterio, as stored
        return 1
    try:
        with Image.open(p) as img:
            return _orientation(img)
    except Exception:  # noqa: BLE001 - unreadable: the readers report it
        return 1


def to_float(image: np.ndarray) -> np.ndarray:
    """Scale an image to float32.

    uint8 is divided by 255, uint16 by 65535 (so 16-bit data is scaled to ``[0, 1]``), other
    integer types by their dtype's maximum, booleans become 0/1; floats are returned as float32
    unchanged (no rescaling: float rasters are assumed to be in a meaningful unit already).

    Args:
        image: Array of any shape.

    Returns:
        float32 array of the same shape.
    """
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        return (image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)).astype(
            np.float32
        )
    return image.astype(np.float32, copy=False)


def _save_pillow(
    img: Image.Image, path: Path, format: str | None = None, ext: str | None = None, **params: Any
) -> None:
    """Encode ``img`` in memory, then write the bytes to ``path`` with checked writes.

    Pillow's C encoders write straight to a file's descriptor and ignore the count of a short
    ``write()`` (what a nearly full disk returns), which can leave a truncated file that looks
    complete. Encoded into a buffer and written with :func:`segpipe.fileio.write_file_bytes`,
    every write's count is checked: a full disk raises ``OSError`` (``ENOSPC``) and the partial
    file is deleted.
    """
    from io import BytesIO

    from segpipe.fileio import write_file_bytes

    if format is None:
        ext = (ext or path.suffix).lower()
        format = Image.registered_extensions().get(ext)
        if format is None:
            raise ValueError(f"unknown file extension: {ext}")
    buf = BytesIO()
    img.save(buf, format=format, **params)
    write_file_bytes(path, buf.getbuffer())


def _gdal_reason(exc: BaseException) -> str:
    """rasterio's error text, with GDAL's own cause in place of "See previous exception for
    details." (a previous exception the user never sees)."""
    text = str(exc).strip()
    marker = "See previous exception for details."
    if marker not in text:
        return text
    head = text.replace(marker, "").strip().rstrip(".")
    cause = exc.__cause__ or exc.__context__
    cause_text = str(cause).strip() if cause is not None else ""
    return f"{head}: {cause_text}" if cause_text else head


def _raster_write_error(path: Path, exc: BaseException) -> BaseException:
    """``exc`` as a :class:`~segpipe.fileio.DiskFullError` when the disk is full, else itself.

    GDAL reports a failed write as ``Write error at scanline N`` without the errno, so with
    almost no space left (:func:`segpipe.fileio.low_on_space`) a full disk is assumed.
    """
    from segpipe.fileio import DiskFullError, is_disk_full, low_on_space

    if isinstance(exc, DiskFullError):
        return exc
    if is_disk_full(exc) or low_on_space(path):
        return DiskFullError(path)
    return exc


@contextlib.contextmanager
def _raster_writes(path: Path) -> Iterator[None]:
    """Raise a rasterio write error inside as :func:`_raster_write_error` names it."""
    from rasterio.errors import RasterioError

    try:
        yield
    except RasterioError as exc:
        err = _raster_write_error(path, exc)
        if err is exc:
            raise
        raise err from exc


def _check_tiff_complete(path: Path, width: int, height: int, count: int) -> None:
    """Reopen a TIFF just written and make sure every block of it is on disk.

    GDAL raises for a block it fails to write during ``write()``, but not for a failure while it
    closes the file (flushing cached blocks, writing the directory): ``close()`` returns normally
    and leaves a file that does not open, or whose missing blocks read back as zeros. This opens
    the file and checks each block's offset and size against the file's size from the TIFF
    directory (microseconds per block; GDAL writes every block, SPARSE_OK is off).

    Raises:
        DiskFullError: The file is incomplete and the disk is (nearly) full.
        OSError: The file is incomplete (``EIO``).
    """
    from rasterio.errors import RasterioError

    problem = ""
    try:
        with _open_raster(path) as ds:
            if (ds.width, ds.height, ds.count) != (width, height, count):
                problem = (f"it holds {ds.count}×{ds.height}×{ds.width}, "
                           f"not {count}×{height}×{width}")
            else:
                size = path.stat().st_size
                interleave = getattr(ds.interleaving, "name", "")
                bands = range(1, count + 1) if interleave.lower() == "band" else (1,)
                for band in bands:
                    for (row, col), _ in ds.block_windows(band):
                        offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                        nbytes = ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
                        if not offset or not nbytes or int(offset) + int(nbytes) > size:
                            problem = f"block ({row}, {col}) of band {band} is missing"
                            break
                    if problem:
                        break
    except (RasterioError, OSError) as exc:
        problem = f"it cannot be read back ({exc})"
    if problem:
        import errno

        err = OSError(errno.EIO, f"{path} is incomplete after writing: {problem}")
        raise _raster_write_error(path, err) from None


def write_image(path: _PathLike, image: np.ndarray, *, suffix: str | None = None,
                stamp: str | None = None) -> Path:
    """Write an image: Pillow for PNG/JPEG/WebP/BMP/GIF, rasterio for TIFF.

    Pillow formats are encoded in memory and written with checked writes, so a full disk raises
    instead of leaving a truncated file; a TIFF is read back to check it is complete. The write
    is not atomic by itself: for that, write to :func:`segpipe.fileio.atomic_path`.

    Args:
        path: Output file; the extension picks the format. Parent folders are created.
        image: (H, W) or (H, W, C). For Pillow formats: uint8 with 1, 3 or 4 channels, or
            uint16 with 1 channel (PNG). TIFF accepts any band count and dtype.
        suffix: Extension that picks the format instead of ``path``'s (e.g. ``".jpg"`` for a
            temporary file name).
        stamp: Text stored in the file under :data:`OUTPUT_STAMP_KEY` (a PNG text chunk, a
            JPEG comment, a TIFF tag), read back by :func:`read_output_stamp`; None: none.

    Returns:
        The written path.

    Raises:
        ValueError: For arrays the chosen format cannot hold.
        OSError: The write failed (:class:`~segpipe.fileio.DiskFullError` for a full disk, or
            ``ENOSPC`` from a Pillow format); no partial file is left.
    """
    p = Path(path)
    ext = (suffix or p.suffix).lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    if ext in TIFF_EXTENSIONS:
        from rasterio.errors import RasterioError

        data = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
        try:
            with _open_raster(
                p,
                "w",
                driver="GTiff",
                width=data.shape[2],
                height=data.shape[1],
                count=data.shape[0],
                dtype=data.dtype,
                compress="lzw",
            ) as ds:
                ds.write(data)
                if stamp is not None:
                    ds.update_tags(**{OUTPUT_STAMP_KEY: stamp})
            _check_tiff_complete(p, data.shape[2], data.shape[1], data.shape[0])
        except (RasterioError, OSError) as exc:
            p.unlink(missing_ok=True)
            err = _raster_write_error(p, exc)
            if err is exc:
                raise
            raise err from exc
        return p
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    params = _stamp_params(stamp, ext)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        _save_pillow(Image.fromarray(arr), p, ext=ext, **params)
        return p
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or arr.shape[2] in (3, 4)):
        raise ValueError(
            f"{p}: cannot write a {arr.dtype} array of shape {arr.shape} as {ext}; "
            "use uint8 with 1, 3 or 4 channels, or write a .tif"
        )
    if ext == ".webp":
        params["lossless"] = True
    _save_pillow(Image.fromarray(arr), p, ext=ext, **params)
    return p


#: The key under which :func:`write_image`, :func:`write_label_png` and :class:`RasterWriter`
#: store a stamp (``segpipe predict``: which input and format an output was made from).
OUTPUT_STAMP_KEY = "segpipe_output"


def _stamp_params(stamp: str | None, ext: str) -> dict[str, Any]:
    """Pillow save options that store ``stamp``: a PNG text chunk (before the image data, so
    that opening the file reads it), a JPEG comment; none for other formats."""
    if stamp is None:
        return {}
    if ext == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(OUTPUT_STAMP_KEY, stamp)
        return {"pnginfo": info}
    if ext in (".jpg", ".jpeg"):
        return {"comment": f"{OUTPUT_STAMP_KEY}={stamp}".encode()}
    return {}


def read_output_stamp(path: _PathLike) -> str | None:
    """The stamp a file was written with (see :data:`OUTPUT_STAMP_KEY`), or None when it has
    none (another program's file). Reads the header only, with Pillow's format readers called
    directly: no decompression-bomb check (a finished output is not decoded) and any file name
    Python opens.

    Raises:
        OSError: The file cannot be read or its header is damaged (a copy cut short).
    """
    from PIL import JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    p = Path(path)
    ext = p.suffix.lower()
    reader = (TiffImagePlugin.TiffImageFile if ext in TIFF_EXTENSIONS
              else JpegImagePlugin.JpegImageFile if ext in (".jpg", ".jpeg")
              else PngImagePlugin.PngImageFile if ext == ".png" else None)
    if reader is None:
        return None
    with open(p, "rb") as fh:
        try:
            img = reader(fh)
        except (SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
            raise OSError(f"damaged header ({exc})") from None
        if ext in TIFF_EXTENSIONS:  # GDAL's metadata tag: <Item name="key">value</Item>
            xml = img.tag_v2.get(42112)
            found = re.search(rf'<Item name="{OUTPUT_STAMP_KEY}">(.*?)</Item>', str(xml or ""),
                              re.S)
            # GDAL escapes a value twice: once as metadata, once as XML
            return html.unescape(html.unescape(found.group(1))) if found else None
        if ext in (".jpg", ".jpeg"):
            comment = img.info.get("comment", b"")
            text = comment.decode(errors="replace") if isinstance(comment, bytes) else ""
            head = f"{OUTPUT_STAMP_KEY}="
            return text[len(head):] if text.startswith(head) else None
        value = img.info.get(OUTPUT_STAMP_KEY)
        return value if isinstance(value, str) else None


def input_fingerprint(path: _PathLike) -> str:
    """What an input is, for telling a changed one from the one an output was made from: its
    size, modification time and the hash of its last MiB
    (:func:`~segpipe.fileio.file_fingerprint`), and the size and time of the georeference files
    beside it (a world file, ``.aux.xml``). An edit in place changes the time (a copy with
    ``cp -p`` or ``rsync -a`` keeps it; a plain ``cp`` makes the outputs again).

    Raises:
        OSError: The input cannot be read.
    """
    from segpipe.fileio import file_fingerprint

    p = Path(path)
    parts = [file_fingerprint(p), str(p.stat().st_mtime_ns)]
    for side in _sidecars(p):
        try:
            st = side.stat()
        except OSError:
            continue
        parts.append(f"{side.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def write_mask(
    path: _PathLike, mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None
) -> Path:
    """Write an index mask (PNG or TIFF), optionally with a colour palette.

    Args:
        path: Output file (``.png`` recommended, ``.tif`` also works).
        mask: (H, W) integer class indices (or (H, W, 3) uint8 colours).
        palette: Optional list of RGB colours, one per class; the PNG is then written as a
            palette image whose *indices* are the labels (viewers show the colours).

    Returns:
        The written path.
    """
    p = Path(path)
    arr = np.asarray(mask)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        if arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        elif arr.size and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
    if palette is not None and arr.ndim == 2 and arr.dtype == np.uint8 and not _is_tiff(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        flat: list[int] = []
        for color in palette:
            flat.extend(int(c) for c in list(color)[:3])
        flat += [0] * (768 - len(flat))
        pimg = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        pimg.putpalette(flat[:768])
        _save_pillow(pimg, p)
        return p
    return write_image(p, arr)


# --------------------------------------------------------------------------------------------
# Windowed raster I/O (GeoTIFFs of any size in constant memory)
# --------------------------------------------------------------------------------------------

#: GDAL block cache used while reading/writing by windows (MB). GDAL's default is 5% of RAM,
#: which would make peak memory grow with the raster; segpipe reads whole rows of tiles itself.
RASTER_CACHE_MB = 32


_CACHE_LIMITED = False


def _limit_gdal_cache() -> None:
    """Cap GDAL's block cache at :data:`RASTER_CACHE_MB`, once per process.

    Left alone when the ``GDAL_CACHEMAX`` environment variable is set, when an enclosing
    ``rasterio.Env`` sets it, or when the cache is already smaller. GDAL's block cache is one
    per process (``GDAL_CACHEMAX`` cannot be thread-local), so the cap is set process-wide with
    ``rasterio.env.set_gdal_config`` rather than in a ``rasterio.Env`` block: an Env would
    change the same global setting anyway, put it back at every exit (between two windowed
    reads, and racing with other threads' Envs), and would have to nest in the order that
    readers and writers, which live for a whole prediction, are opened and closed.
    """
    global _CACHE_LIMITED
    if _CACHE_LIMITED:
        return
    import os

    import rasterio.env

    if rasterio.env.hasenv() and any(k.upper() == "GDAL_CACHEMAX" for k in rasterio.env.getenv()):
        return  # the caller's own rasterio.Env decides; look again after it exits
    _CACHE_LIMITED = True
    if "GDAL_CACHEMAX" in os.environ:
        return
    limit = RASTER_CACHE_MB * 1024 * 1024
    current = rasterio.env.get_gdal_config("GDAL_CACHEMAX")  # GDAL's effective size, in bytes
    try:
        smaller = current is not None and int(current) <= limit
    except (TypeError, ValueError):  # e.g. "10%" set through set_gdal_config: the user's choice
        return
    if not smaller:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", limit)


class RasterInfo:
    """Size and georeference of a raster, as read from its header.

    ``crs`` and ``transform`` are rasterio objects that callers pass back to
    :class:`RasterWriter` unchanged (no other module needs to understand them).

    Attributes:
        path: The file.
        width: Columns.
        height: Rows.
        count: Bands in the file.
        dtype: Numpy dtype name of the first band.
        crs: Coordinate reference system, or None.
        transform: Affine pixel -> CRS transform (identity when not georeferenced).
        nodata: Nodata value of the first band, or None.
        gcps: ``(ground control points, their CRS)`` of a GCP-georeferenced file, or None.
        rpcs: Rational polynomial coefficients (a satellite scene's camera model), or None.
        georeferenced: Whether the file has a CRS or a non-identity transform, GCPs or RPCs.
    """

    def __init__(self, ds: Any, path: Path) -> None:
        self.path = path
        self.width = int(ds.width)
        self.height = int(ds.height)
        self.count = int(ds.count)
        self.dtype = str(ds.dtypes[0]) if ds.count else "uint8"
        self.crs = ds.crs
        self.transform = ds.transform
        self.nodata = ds.nodata
        has_gcps = bool(ds.gcps[0]) if ds.gcps else False
        self.gcps = ds.gcps if has_gcps else None
        self.rpcs = ds.rpcs
        self.georeferenced = bool(
            ds.crs is not None or not ds.transform.is_identity or has_gcps
            or self.rpcs is not None
        )

    def __repr__(self) -> str:
        return (
            f"RasterInfo({self.path.name}: {self.width}×{self.height}×{self.count} {self.dtype}, "
            f"crs={self.crs}, nodata={self.nodata})"
        )


def probe_raster(path: _PathLike) -> RasterInfo | None:
    """Header of a TIFF that rasterio can read by windows; None for anything else.

    Args:
        path: Image file.

    Returns:
        :class:`RasterInfo` for ``.tif``/``.tiff`` files rasterio opens, else None (PNG, JPEG,
        TIFFs only Pillow reads: read those whole with :func:`read_image`).

    Raises:
        ImageReadError: Missing or empty files.
    """
    p = Path(path)
    _check_file(p)
    if not _is_tiff(p):
        return None
    from rasterio.errors import RasterioError, RasterioIOError

    try:
        with _open_raster(p) as ds:
            if ds.count < 1:
                return None
            _refuse_stack(ds, p)
            return RasterInfo(ds, p)
    except (RasterioIOError, RasterioError):
        return None


def _sidecars(path: Path) -> Iterator[Path]:
    """Files GDAL reads a plain image's georeference from: its world file (``a.pgw`` or
    ``a.pngw`` beside ``a.png``, ``a.jgw`` beside ``a.jpg``, ``a.wld``; either case) and its
    ``a.png.aux.xml``."""
    ext = path.suffix[1:]
    if not ext:
        return
    for suffix in (f"{ext[0]}{ext[-1]}w", f"{ext}w", "wld"):
        for cased in (suffix.lower(), suffix.upper()):
            yield path.with_suffix(f".{cased}")
    yield path.with_name(f"{path.name}.aux.xml")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name cannot be a file: an image named with 247 bytes
    or more has no room for ``.aux.xml`` beside it ("File name too long" failed predict)."""
    try:
        return path.is_file()
    except OSError:
        return False


def sidecar_georeference(path: _PathLike) -> RasterInfo | None:
    """The georeference a PNG/JPEG (any image but a TIFF) has from the files beside it, as
    GDAL reads them: a world file's pixel grid (``a.pgw``, ``a.jgw``, ``a.wld``) and the CRS
    of a ``a.png.aux.xml``. Orthophotos and map tiles come so.

    Args:
        path: An image file that :func:`probe_raster` does not take (not a TIFF).

    Returns:
        :class:`RasterInfo` with the grid (its ``crs`` None unless an ``.aux.xml`` gives one),
        or None when no such file is beside it or GDAL finds no georeference in them.
    """
    p = Path(path)
    if _is_tiff(p) or not any(_is_file(side) for side in _sidecars(p)):
        return None
    from rasterio.errors import RasterioError, RasterioIOError

    try:
        with _open_raster(p) as ds:
            info = RasterInfo(ds, p)
    except (RasterioIOError, RasterioError):
        return None
    return info if info.georeferenced else None


def grid_mismatch(image: _PathLike, mask: _PathLike) -> str | None:
    """How a georeferenced mask's pixel grid differs from its georeferenced image's, or None.

    Pairs are matched by name and compared by size; a mask rasterised over another extent, at
    another resolution or in another CRS has the image's size all the same, and its labels
    would be trained on pixels they do not cover. Only files that both carry a CRS (for the
    CRS) or both a transform (for the grid) are compared: a plain PNG mask beside a GeoTIFF
    image is fine. A PNG or JPEG with a world file (:func:`sidecar_georeference`) carries
    them as a GeoTIFF does.

    Returns:
        A reason (``"mask is offset from its image by +20 columns and -3 rows"``), or None.
    """
    try:  # a GeoTIFF, or a PNG/JPEG with a world file
        a = probe_raster(image) or sidecar_georeference(image)
        b = ((probe_raster(mask) or sidecar_georeference(mask))
             if a is not None and a.georeferenced else None)
    except ImageReadError:
        return None
    if a is None or b is None:
        return None
    if a.crs is not None and b.crs is not None and a.crs != b.crs:
        return f"mask's CRS {b.crs.to_string()} is not its image's {a.crs.to_string()}"
    ta, tb = a.transform, b.transform
    if ta.is_identity or tb.is_identity:
        return None
    if not np.allclose([tb.a, tb.b, tb.d, tb.e], [ta.a, ta.b, ta.d, ta.e], rtol=1e-6, atol=0):
        if np.allclose([abs(tb.a), abs(tb.e)], [abs(ta.a), abs(ta.e)], rtol=1e-6, atol=0):
            return ("mask's grid is flipped or rotated against its image's (transforms "
                    f"{tuple(tb)[:6]} and {tuple(ta)[:6]})")
        return (f"mask's pixel size {abs(tb.a):g}×{abs(tb.e):g} (or rotation) is not its "
                f"image's {abs(ta.a):g}×{abs(ta.e):g}")
    col, row = ~ta @ (tb.c, tb.f)  # the mask's top-left corner in the image's pixels
    if abs(col) > 0.01 or abs(row) > 0.01:
        return f"mask is offset from its image by {col:+.3g} columns and {row:+.3g} rows"
    return None


class RasterReader:
    """Read a raster by windows of rows/columns, with its validity (nodata) mask.

    Band selection and conversions follow :func:`read_image`: 1-based ``bands``; without a
    selection, alpha bands are dropped and a single palette band is expanded to RGB.

    Args:
        path: A file :func:`probe_raster` accepted.
        bands: Optional 1-based band selection.
        channels: The channels the model takes, if known (see :func:`_data_indexes`).

    Raises:
        ImageReadError: Unreadable files, bad band selections.
    """

    def __init__(
        self, path: _PathLike, bands: Sequence[int] | None = None, channels: int | None = None
    ) -> None:
        from rasterio.enums import ColorInterp
        from rasterio.errors import RasterioError, RasterioIOError

        self.path = Path(path)
        _check_file(self.path)
        _limit_gdal_cache()
        try:
            self._ds = _open_raster(self.path)
        except (RasterioIOError, RasterioError) as exc:
            raise ImageReadError(self.path, f"not a raster rasterio can read ({exc})") from None
        ds = self._ds
        try:
            _refuse_stack(ds, self.path)
            self.info = RasterInfo(ds, self.path)
            self._lut: np.ndarray | None = None
            self.indexes, alpha_as_data = _data_indexes(ds, self.path, bands, channels)
            if bands is None:
                interps = list(ds.colorinterp or [])
                if len(self.indexes) == 1 and interps and interps[0] == ColorInterp.palette:
                    try:
                        cmap = ds.colormap(1)
                        lut = np.zeros((max(256, max(cmap) + 1), 3), dtype=np.uint8)
                        for k, rgba in cmap.items():
                            lut[k] = rgba[:3]
                        self._lut = lut
                    except ValueError:
                        pass
            self.has_mask = _has_mask(ds, self.indexes, alpha_as_data)
            self._warned_partial = False  # float pixels nodata in some bands only
        except BaseException:
            self.close()
            raise

    @property
    def width(self) -> int:
        """Columns."""
        return self.info.width

    @property
    def height(self) -> int:
        """Rows."""
        return self.info.height

    @property
    def channels(self) -> int:
        """Channels returned by :meth:`read` (3 for an expanded palette band)."""
        return 3 if self._lut is not None else len(self.indexes)

    def read(
        self, row0: int, row1: int, col0: int = 0, col1: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels and validity of rows ``[row0, row1)`` and columns ``[col0, col1)``.

        Args:
            row0: First row.
            row1: End row (exclusive).
            col0: First column.
            col1: End column (exclusive); the raster's width when None.

        Returns:
            ``(pixels (h, w, C) native dtype, valid (h, w) bool or None when every pixel is
            valid)``. ``pixels`` is a band-planar view (no copy). A pixel is valid when any
            selected band is valid (GDAL's dataset mask semantics: nodata value, internal mask
            or alpha band), since one band may hold the nodata value (say 0) as a real value,
            and, in float rasters, no selected band is NaN or infinite (a NaN would spread
            through the network to every pixel near it). A float raster with pixels that are
            nodata in some bands only is warned about once: those bands' values (a sentinel
            such as -9999) enter the network as they are.

        Raises:
            ImageReadError: Truncated or corrupt data inside the window.
        """
        from rasterio.errors import RasterioError, RasterioIOError
        from rasterio.windows import Window

        col1 = self.width if col1 is None else col1
        window = Window(col0, row0, col1 - col0, row1 - row0)
        try:
            data = self._ds.read(self.indexes, window=window)
            valid = None
            if self.has_mask:
                partial = data.dtype.kind == "f" and not self._warned_partial
                valid, every = _band_masks(self._ds, self.indexes, window, every=partial)
                if every is not None and not np.array_equal(valid, every):
                    self._warned_partial = True
                    warnings.warn(
                        f"{self.path}: some pixels are nodata ({self.info.nodata}) in only some "
                        "of the bands read; they are predicted from all bands, those values "
                        "included. If the value is a sentinel (such as -9999), set every band of "
                        "such pixels to it, or to NaN, to have them written as nodata",
                        stacklevel=2)
                if valid is not None and valid.all():
                    valid = None
        except (RasterioIOError, RasterioError) as exc:
            raise ImageReadError(
                self.path, f"truncated or corrupt image data in rows {row0}-{row1} "
                f"({_gdal_reason(exc)})"
            ) from None
        if self._lut is not None:
            return self._lut[data[0]], valid
        if data.dtype.kind == "f":  # NaN/inf that no nodata tag declares: no pixel either
            finite = np.isfinite(data).all(axis=0)
            if not finite.all():
                valid = finite if valid is None else valid & finite
        return np.moveaxis(data, 0, -1), valid

    def close(self) -> None:
        """Close the file (idempotent)."""
        ds = getattr(self, "_ds", None)
        if ds is not None:
            ds.close()
            self._ds = None

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_raster(
    path: _PathLike, bands: Sequence[int] | None = None, channels: int | None = None
) -> RasterReader:
    """Open a raster for windowed reading (see :class:`RasterReader`)."""
    return RasterReader(path, bands, channels)


#: :class:`RasterWriter` builds overviews for rasters wider or taller than this (px).
OVERVIEW_MIN_SIZE = 2048


class RasterWriter:
    """Write a tiled, compressed (Geo)TIFF by windows or by consecutive rows.

    Rows given to :meth:`write_rows` are buffered to whole rows of blocks, so every compressed
    block is written once, complete (no rewritten blocks, no growing GDAL cache).

    Write errors on a (nearly) full disk raise :class:`~segpipe.fileio.DiskFullError`, and
    :meth:`close` reads the file's block table back, because GDAL does not report a failure while
    it closes the file (see :func:`_check_tiff_complete`).

    Args:
        path: Output ``.tif`` (usually a temporary name, see :func:`segpipe.fileio.atomic_path`).
        width: Columns.
        height: Rows.
        count: Bands.
        dtype: Numpy dtype of the data.
        crs: CRS to copy (from :class:`RasterInfo`), or None for a plain TIFF.
        transform: Affine transform to copy, or None.
        gcps: ``(ground control points, CRS)`` to copy (:attr:`RasterInfo.gcps`), or None.
        rpcs: RPCs to copy (:attr:`RasterInfo.rpcs`), or None.
        nodata: Nodata value, or None.
        colormap: Optional ``{value: (r, g, b[, a])}`` for single-band uint8/uint16 rasters.
        blocksize: Tile size (multiple of 16).
        compress: GDAL compression (``deflate``, ``lzw``, ...).
        descriptions: One name per band (GDAL band descriptions, e.g. class names), or None.
        tags: Dataset metadata to store (e.g. ``{OUTPUT_STAMP_KEY: stamp}``), or None.
        overviews: GDAL resampling of the internal overviews (``nearest`` for labels) built
            when the file is closed, for a raster wider or taller than
            :data:`OVERVIEW_MIN_SIZE` (halving down to one block: GIS viewers draw such a
            raster zoomed out from them, not from every pixel); None: none.

    Rows given with a validity array (:meth:`write_rows`'s ``valid``) that marks any pixel
    invalid give the file an internal per-dataset mask (GDAL's nodata mask, which QGIS and
    rasterio's ``masked=True`` read), for bands where no nodata value can be set apart (every
    value a probability); rows written before are marked valid in it. A file whose rows are all
    valid gets no mask.
    """

    def __init__(
        self,
        path: _PathLike,
        *,
        width: int,
        height: int,
        count: int,
        dtype: Any,
        crs: Any = None,
        transform: Any = None,
        gcps: Any = None,
        rpcs: Any = None,
        nodata: float | None = None,
        colormap: dict[int, Sequence[int]] | None = None,
        blocksize: int = 256,
        compress: str = "deflate",
        descriptions: Sequence[str] | None = None,
        tags: dict[str, str] | None = None,
        overviews: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.width, self.height, self.count = int(width), int(height), int(count)
        self.dtype = np.dtype(dtype)
        self.blocksize = int(blocksize)
        self.overviews = overviews
        kwargs: dict[str, Any] = {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": self.dtype.name,
            "tiled": True,
            "blockxsize": self.blocksize,
            "blockysize": self.blocksize,
            "compress": compress,
            "BIGTIFF": "IF_SAFER",
        }
        if crs is not None:
            kwargs["crs"] = crs
        if transform is not None:
            kwargs["transform"] = transform
        if nodata is not None:
            kwargs["nodata"] = nodata
        _limit_gdal_cache()
        with _raster_writes(self.path):
            self._ds = _open_raster(self.path, "w", **kwargs)
        try:
            if gcps is not None:  # georeferenced by control points or a camera model only
                self._ds.gcps = gcps
            if rpcs is not None:
                self._ds.rpcs = rpcs
            if colormap is not None:
                self._ds.write_colormap(
                    1, {int(k): tuple(int(c) for c in (list(v) + [255])[:4])
                        for k, v in colormap.items()}
                )
            for band, text in enumerate(descriptions or (), start=1):
                self._ds.set_band_description(band, str(text))
            if tags:
                self._ds.update_tags(**tags)
        except BaseException:
            self._ds.close()
            raise
        self._buf: list[np.ndarray] = []
        self._vbuf: list[np.ndarray | None] = []
        self._buf_row0 = 0
        self._next_row = 0
        self._masked = False  # an internal dataset mask has been started

    def write_window(
        self, data: np.ndarray, row0: int, col0: int = 0, valid: np.ndarray | None = None
    ) -> None:
        """Write ``data`` ((h, w) or (count, h, w)) at ``(row0, col0)``.

        Args:
            data: The pixels.
            row0: Top row.
            col0: Left column.
            valid: (h, w) bool, False where the pixel is nodata; None when all are valid (see
                the class docstring on the mask). A window written without it after the mask
                has started is marked valid.

        Raises:
            DiskFullError: The disk is (nearly) full.
            RasterioError: Another write failure.
        """
        from rasterio.windows import Window

        arr = np.asarray(data)
        if arr.ndim == 2:
            arr = arr[None]
        window = Window(col0, row0, arr.shape[2], arr.shape[1])
        with _raster_writes(self.path):
            self._ds.write(arr.astype(self.dtype, copy=False), window=window)
            if valid is not None and not self._masked and not valid.all():
                self._start_mask(row0)
            if self._masked:
                mask = (np.full(arr.shape[1:], 255, np.uint8) if valid is None
                        else np.where(valid, np.uint8(255), np.uint8(0)))
                self._ds.write_mask(mask, window=window)

    def _start_mask(self, rows_done: int) -> None:
        """Create the dataset mask and mark the ``rows_done`` full rows written so far valid."""
        from rasterio.windows import Window

        self._masked = True
        for r0 in range(0, rows_done, self.blocksize):
            h = min(self.blocksize, rows_done - r0)
            self._ds.write_mask(np.full((h, self.width), 255, np.uint8),
                                window=Window(0, r0, self.width, h))

    def write_rows(self, row0: int, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write full-width rows starting at ``row0``; calls must follow each other row by row.

        Args:
            row0: First row of ``data`` (the row after the previous call's last row).
            data: (h, width) or (count, h, width).
            valid: (h, width) bool, False at nodata pixels, or None when all are valid.
        """
        arr = np.asarray(data)
        if arr.ndim == 2:
            arr = arr[None]
        if row0 != self._next_row:
            raise ValueError(
                f"rows must be written in order: expected row {self._next_row}, got {row0}"
            )
        if arr.shape[2] != self.width or arr.shape[0] != self.count:
            raise ValueError(
                f"expected ({self.count}, h, {self.width}) rows, got {tuple(arr.shape)}"
            )
        if valid is not None and valid.shape != arr.shape[1:]:
            raise ValueError(f"valid must be {arr.shape[1:]}, got {valid.shape}")
        self._buf.append(arr.astype(self.dtype, copy=False))
        self._vbuf.append(None if valid is None or valid.all() else valid)
        self._next_row += arr.shape[1]
        end = self._next_row
        aligned = end if end >= self.height else (end // self.blocksize) * self.blocksize
        if aligned > self._buf_row0:
            block, vblock = self._buffered()
            n = aligned - self._buf_row0
            self.write_window(block[:, :n], self._buf_row0,
                              valid=None if vblock is None else vblock[:n])
            rest = block[:, n:]
            self._buf = [np.ascontiguousarray(rest)] if rest.shape[1] else []
            self._vbuf = ([None if vblock is None else np.ascontiguousarray(vblock[n:])]
                          if rest.shape[1] else [])
            self._buf_row0 = aligned

    def _buffered(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The buffered rows as one (count, h, width) block, and their validity or None."""
        block = np.concatenate(self._buf, axis=1) if len(self._buf) > 1 else self._buf[0]
        if all(v is None for v in self._vbuf):
            return block, None
        vblock = np.concatenate([
            np.ones(b.shape[1:], bool) if v is None else v for b, v in zip(self._buf, self._vbuf)
        ])
        return block, vblock

    def close(self, check: bool = True) -> None:
        """Flush buffered rows and close the file (idempotent).

        Args:
            check: Read the block table back to make sure the file is complete (GDAL does not
                report write errors while closing); False when the file is discarded anyway.

        Raises:
            DiskFullError: The file is incomplete and the disk is (nearly) full.
            OSError: The file is incomplete for another reason.
        """
        ds = getattr(self, "_ds", None)
        if ds is None:
            return
        try:
            if self._buf:
                block, vblock = self._buffered()
                self.write_window(block, self._buf_row0, valid=vblock)
                self._buf, self._vbuf = [], []
            if check and self.overviews:
                self._build_overviews()
        finally:
            ds.close()
            self._ds = None
        if check:
            _check_tiff_complete(self.path, self.width, self.height, self.count)

    def _build_overviews(self) -> None:
        """Internal overviews at 2, 4, 8, ... until one block holds the raster (none for one
        up to :data:`OVERVIEW_MIN_SIZE`)."""
        from rasterio.enums import Resampling

        size = max(self.width, self.height)
        if size <= OVERVIEW_MIN_SIZE:
            return
        factors = [2 ** k for k in range(1, 32) if size / 2 ** (k - 1) > self.blocksize]
        with _raster_writes(self.path):
            self._ds.build_overviews(factors, Resampling[self.overviews])
            self._ds.update_tags(ns="rio_overview", resampling=self.overviews)

    def __enter__(self) -> RasterWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_label_png(
    path: _PathLike,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]] | None = None,
    compress_level: int = 1,
    transparent: int | None = None,
    stamp: str | None = None,
) -> Path:
    """Write a label image as PNG, quickly (prediction outputs).

    Unlike :func:`write_mask`, the dtype is kept as given (a uint16 image stays 16-bit whatever
    its values) and zlib's fastest level is the default: masks compress well at any level, and
    level 6 costs as much as a small network's forward pass.

    Args:
        path: Output ``.png``.
        labels: (H, W) uint8 or uint16.
        palette: Optional RGB colour per label (uint8 labels only): a paletted PNG.
        compress_level: zlib level 0-9.
        transparent: With a palette, the label drawn transparent (nodata), or None.
        stamp: Text stored in a text chunk (:func:`read_output_stamp`), or None.

    Returns:
        The written path.

    Raises:
        ValueError: For other shapes or dtypes.
        OSError: The write failed (``ENOSPC`` for a full disk, also on a short write); no partial
            file is left (see :func:`write_image`).
    """
    p = Path(path)
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"{p}: expected (H, W) uint8 or uint16 labels, got {arr.dtype} {arr.shape}"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        if arr.dtype != np.uint8:
            raise ValueError(f"{p}: a palette needs uint8 labels (got {arr.dtype})")
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
        flat = [int(c) for color in palette for c in list(color)[:3]][:768]
        img.putpalette(flat + [0] * (768 - len(flat)))
    else:
        img = Image.fromarray(np.ascontiguousarray(arr))
    params: dict[str, Any] = _stamp_params(stamp, ".png")
    if palette is not None and transparent is not None and 0 <= transparent <= 255:
        params["transparency"] = bytes([255] * int(transparent) + [0])  # tRNS: alpha per entry
    _save_pillow(img, p, format="PNG", compress_level=int(compress_level), **params)
    return p
