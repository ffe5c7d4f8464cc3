"""Prediction outputs: one writer, one small class per format.

Every output is written to a temporary name in its target folder
(:class:`segpipe.fileio.AtomicFile`), fsynced and renamed when complete, so an interrupted run
or a full disk never leaves a truncated file under a final name, and a rerun can take an
existing output as done; each output stores what it was made from
(:meth:`PredictionWriter.stamp`), so that it is done for its input as it is now only. PNG/JPEG outputs are encoded in memory and written with checked writes
(a short write on a nearly full disk is an error, not a truncated file); GeoTIFFs are read back
after closing to check that every block reached the disk. A full disk raises
:class:`segpipe.fileio.DiskFullError` naming the output.

Formats (``--format``; names relative to the input's path under the output folder):

========== ====================== ====================================================
name       file                   content
========== ====================== ====================================================
mask       ``<stem>.png``         index PNG, uint8 (uint16 above 255 classes)
palette    ``<stem>_palette.png`` paletted PNG in the class colours (RGB above 255 classes)
overlay    ``<stem>_overlay.jpg`` the input blended with the colour mask
geotiff    ``<stem>.tif``         tiled, deflate-compressed index GeoTIFF with the input's
                                  CRS, transform and size, a colour map and nodata
probs      ``<stem>_probs.tif``   probabilities ×255 as uint8, one band per class, named
                                  after it (or one band of max confidence with
                                  ``probs_mode="max"``)
========== ====================== ====================================================

``auto`` means ``geotiff`` for georeferenced rasters and ``mask`` for everything else. Where the
input is nodata, labels are :attr:`PredictConfig.nodata_value` (255, the GeoTIFF nodata), the
palette shows black and probabilities are 0; a ``probs`` file with one band per class then has
an internal nodata mask (no probability value is free to mean nodata), and the ``max`` one has
nodata 0.

Rows arrive in order (:meth:`OutputSink.write_rows`), so large rasters are written window by
window: ``geotiff`` and ``probs`` stream to disk in constant memory; the PNG/JPEG formats keep the
whole image until the end (and refuse rasters above the decompression-bomb limit).
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from segpipe.data.io import (
    OUTPUT_STAMP_KEY,
    RasterInfo,
    RasterWriter,
    input_fingerprint,
    pixel_limit,
    read_output_stamp,
    write_image,
    write_label_png,
)
from segpipe.fileio import TMP_PREFIX, AtomicFile, DiskFullError, disk_full_error

if TYPE_CHECKING:  # annotations only: the checkpoint module loads torch
    from segpipe.predict.checkpoint import PredictConfig

__all__ = [
    "FORMATS",
    "GeoTiffFormat",
    "ImagePrediction",
    "MaskFormat",
    "OutputFormat",
    "OutputInTheWay",
    "OutputMeta",
    "OutputSink",
    "OverlayFormat",
    "PaletteFormat",
    "PredictionWriter",
    "ProbsFormat",
    "RowChunk",
    "UnsafeOutputPath",
    "blend_overlay",
]

log = logging.getLogger(__name__)


class UnsafeOutputPath(ValueError):
    """An output path that would land outside the output folder."""


class OutputInTheWay(ValueError):
    """A file at an output's path that this input's prediction may not take as done or replace:
    one segpipe did not write (ground-truth masks, an image), or another input's output."""


@dataclass
class RowChunk:
    """Consecutive full-width rows of a prediction.

    Attributes:
        labels: (h, W) class indices in the config's mask dtype, nodata already applied.
        probs: (K, h, W) uint8 probabilities ×255 (0 at nodata), when a format needs them.
        display: (h, W, 3) uint8 picture of the input, when a format needs it.
        valid: (h, W) bool, False where the input is nodata; None when all valid.
    """

    labels: np.ndarray
    probs: np.ndarray | None = None
    display: np.ndarray | None = None
    valid: np.ndarray | None = None


#: A whole image's prediction is a chunk of all its rows.
ImagePrediction = RowChunk


@dataclass(frozen=True)
class OutputMeta:
    """What a format needs to know about the image before its rows arrive.

    Attributes:
        source: The input file (for messages).
        height: Rows.
        width: Columns.
        raster: Header of a raster input (CRS, transform), or None.
        stamp: Text the output stores to name what it was made from
            (:meth:`PredictionWriter.stamp`), or None.
        fingerprint: The input's :func:`~segpipe.data.io.input_fingerprint` taken before it
            was read, or None (then taken when the outputs are opened).
    """

    source: Path
    height: int
    width: int
    raster: RasterInfo | None = None
    stamp: str | None = None
    fingerprint: str | None = None


class _Sink(ABC):
    """One output file being written."""

    @abstractmethod
    def write_rows(self, row0: int, chunk: RowChunk) -> None:
        """Add rows ``[row0, row0 + h)``."""

    @abstractmethod
    def finish(self) -> None:
        """Complete the file (the caller then renames it)."""

    def abort(self) -> None:
        """Release resources after a failure (the caller deletes the file)."""


class _WholeSink(_Sink):
    """Collects rows in memory; the format writes the whole image in :meth:`finish`."""

    def __init__(self, fmt: OutputFormat, path: Path, meta: OutputMeta) -> None:
        self.check_size(fmt, meta)
        self.fmt, self.path, self.meta = fmt, path, meta
        self.labels: np.ndarray | None = None
        self.display: np.ndarray | None = None

    @staticmethod
    def check_size(fmt: OutputFormat, meta: OutputMeta) -> None:
        """Refuse an image above the decompression-bomb limit, before it is predicted."""
        limit = pixel_limit()
        if limit is not None and meta.height * meta.width > limit:
            raise ValueError(
                f"{meta.width}×{meta.height} is too large for the {fmt.name!r} format "
                f"(PNG/JPEG are written whole, limit {limit} pixels); use --format geotiff"
            )

    def write_rows(self, row0: int, chunk: RowChunk) -> None:
        h, w = self.meta.height, self.meta.width
        r1 = row0 + chunk.labels.shape[0]
        if self.labels is None:
            self.labels = np.empty((h, w), dtype=chunk.labels.dtype)
        self.labels[row0:r1] = chunk.labels
        if self.fmt.needs_display and chunk.display is not None:
            if self.display is None:
                self.display = np.zeros((h, w, 3), dtype=np.uint8)
            self.display[row0:r1] = chunk.display

    def finish(self) -> None:
        if self.labels is None:
            raise ValueError(f"{self.meta.source}: no rows were predicted")
        self.fmt.write_whole(self.path, RowChunk(self.labels, None, self.display),
                             stamp=self.meta.stamp)


class _OverlaySink(_WholeSink):
    """Blends rows into the overlay picture as they arrive: 3 bytes a pixel until the JPEG is
    encoded, where collecting the labels and the input picture and blending them whole in
    float32 at the end took about 48 (1.7 GB more for a 6000² raster)."""

    def __init__(self, fmt: OverlayFormat, path: Path, meta: OutputMeta) -> None:
        super().__init__(fmt, path, meta)
        self.overlay: np.ndarray | None = None

    def write_rows(self, row0: int, chunk: RowChunk) -> None:
        fmt = self.fmt
        assert isinstance(fmt, OverlayFormat)
        if self.overlay is None:
            self.overlay = np.zeros((self.meta.height, self.meta.width, 3), dtype=np.uint8)
        rows = chunk.labels.shape[0]
        self.overlay[row0:row0 + rows] = fmt.blend(chunk.display, chunk.labels)

    def finish(self) -> None:
        if self.overlay is None:
            raise ValueError(f"{self.meta.source}: no rows were predicted")
        assert isinstance(self.fmt, OverlayFormat)
        self.fmt.write_picture(self.path, self.overlay, self.meta.stamp)


class _RasterSink(_Sink):
    """Streams rows to a tiled TIFF."""

    def __init__(self, writer: RasterWriter, bands: Any, masked: bool = False) -> None:
        self.writer = writer
        self.bands = bands
        self.masked = masked  # nodata goes to the file's dataset mask (no nodata value fits)

    def write_rows(self, row0: int, chunk: RowChunk) -> None:
        self.writer.write_rows(row0, self.bands(chunk),
                               valid=chunk.valid if self.masked else None)

    def finish(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close(check=False)
        except Exception:  # noqa: BLE001 - the file is deleted anyway
            pass


class OutputFormat(ABC):
    """One output format.

    Args:
        config: The model's prediction settings (palette, nodata value).
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    needs_probs: ClassVar[bool] = False
    needs_display: ClassVar[bool] = False

    def __init__(self, config: PredictConfig, **options: Any) -> None:
        self.config = config

    def filename(self, rel: Path) -> Path:
        """Output path relative to the output folder for an input at ``rel``."""
        return rel.parent / f"{rel.stem}{self.suffix}"

    def open(self, path: Path, meta: OutputMeta) -> _Sink:
        """Start writing ``path``; by default the image is collected and written whole."""
        return _WholeSink(self, path, meta)

    def write_whole(self, path: Path, pred: RowChunk, stamp: str | None = None) -> None:
        """Write a whole image (formats that cannot stream), with ``stamp`` stored in it.

        ``path`` is a temporary name that does not end in the format's extension (and does not
        exist yet): pass the format explicitly to the writer.
        """
        raise NotImplementedError


class MaskFormat(OutputFormat):
    """Single-channel index PNG (uint8, uint16 above 255 classes)."""

    name = "mask"
    suffix = ".png"

    def write_whole(self, path: Path, pred: RowChunk, stamp: str | None = None) -> None:
        write_label_png(path, pred.labels.astype(self.config.mask_dtype, copy=False), stamp=stamp)


class PaletteFormat(OutputFormat):
    """Paletted PNG in the class colours (an RGB PNG when labels need 16 bits)."""

    name = "palette"
    suffix = "_palette.png"

    def write_whole(self, path: Path, pred: RowChunk, stamp: str | None = None) -> None:
        lut = self.config.palette()
        if self.config.mask_dtype == np.uint8:
            write_label_png(path, pred.labels.astype(np.uint8, copy=False), palette=lut.tolist(),
                            transparent=self.config.nodata_value,  # nodata apart from black
                            stamp=stamp)
        else:
            write_image(path, lut[pred.labels], suffix=".png", stamp=stamp)


def blend_overlay(
    display: np.ndarray,
    labels: np.ndarray,
    lut: np.ndarray,
    alpha: float = 0.5,
    nodata: int | None = None,
) -> np.ndarray:
    """The input picture blended with the colour mask.

    Args:
        display: (H, W, 3) uint8 picture.
        labels: (H, W) labels.
        lut: (L, 3) uint8 colour per label.
        alpha: Weight of the mask colour.
        nodata: Label left unblended (the input shows through).

    Returns:
        (H, W, 3) uint8, blended 256 rows at a time (float32 temporaries of a whole large
        image took 24 bytes a pixel).
    """
    out = np.empty((*labels.shape, 3), dtype=np.uint8)
    for r0 in range(0, labels.shape[0], 256):
        rows = slice(r0, r0 + 256)
        part = (display[rows].astype(np.float32) * (1.0 - alpha)
                + lut[labels[rows]] * np.float32(alpha))
        if nodata is not None:
            keep = labels[rows] == nodata
            part[keep] = display[rows][keep]
        out[rows] = np.clip(part + 0.5, 0, 255)
    return out


#: The longest side a JPEG (the overlay) can have: libjpeg's limit.
JPEG_MAX_SIDE = 65500


class OverlayFormat(OutputFormat):
    """JPEG of the input blended with the colour mask, for people to look at.

    Args:
        config: Prediction settings.
        overlay_alpha: Weight of the mask colours (0..1).
    """

    name = "overlay"
    suffix = "_overlay.jpg"
    needs_display = True

    def __init__(self, config: PredictConfig, overlay_alpha: float = 0.5, **options: Any) -> None:
        super().__init__(config)
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ValueError(f"overlay alpha must be in [0, 1], got {overlay_alpha}")
        self.alpha = float(overlay_alpha)

    def open(self, path: Path, meta: OutputMeta) -> _Sink:
        """Refuse an image JPEG cannot hold before it is predicted (Pillow would fail only
        once the whole image is predicted and blended, taking the other outputs with it)."""
        if max(meta.width, meta.height) > JPEG_MAX_SIDE:
            raise ValueError(
                f"{meta.width}×{meta.height} is too large for the 'overlay' format (a JPEG, "
                f"at most {JPEG_MAX_SIDE} pixels a side): leave overlay out of --format for "
                "this image, and its other outputs are written"
            )
        return _OverlaySink(self, path, meta)

    def blend(self, display: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
        """(h, W, 3) uint8 overlay of rows: ``display`` (black when None) blended with the
        colours of ``labels``."""
        if display is None:
            display = np.zeros((*labels.shape, 3), dtype=np.uint8)
        return blend_overlay(display, labels, self.config.palette(), self.alpha,
                             self.config.nodata_value)

    def write_picture(self, path: Path, overlay: np.ndarray, stamp: str | None = None) -> None:
        """Write the blended (H, W, 3) uint8 picture as the JPEG."""
        write_image(path, overlay, suffix=Path(self.suffix).suffix, stamp=stamp)

    def write_whole(self, path: Path, pred: RowChunk, stamp: str | None = None) -> None:
        self.write_picture(path, self.blend(pred.display, pred.labels), stamp)


def _georef(meta: OutputMeta, fmt: str, warn: bool = True) -> dict[str, Any]:
    if meta.raster is not None and meta.raster.georeferenced:
        raster = meta.raster
        gcps, rpcs = getattr(raster, "gcps", None), getattr(raster, "rpcs", None)
        if gcps is not None:  # GCPs replace a geotransform (GDAL warns when both are set)
            return {"gcps": gcps, "rpcs": rpcs}
        return {"crs": raster.crs, "transform": raster.transform, "rpcs": rpcs}
    if warn:
        log.warning(
            "%s is not georeferenced: its %s output is a plain TIFF without CRS", meta.source, fmt
        )
    return {}


def _stamp_tags(meta: OutputMeta) -> dict[str, str] | None:
    return None if meta.stamp is None else {OUTPUT_STAMP_KEY: meta.stamp}


class GeoTiffFormat(OutputFormat):
    """Index GeoTIFF with the input's CRS/transform/size, colour map and nodata, by windows."""

    name = "geotiff"
    suffix = ".tif"

    def open(self, path: Path, meta: OutputMeta) -> _Sink:
        cfg = self.config
        lut = cfg.palette()
        colormap = {i: (*lut[i].tolist(), 255) for i in range(min(cfg.num_classes, len(lut)))}
        colormap[cfg.nodata_value] = (0, 0, 0, 0)
        writer = RasterWriter(
            path, width=meta.width, height=meta.height, count=1, dtype=cfg.mask_dtype,
            nodata=cfg.nodata_value, colormap=colormap, descriptions=["class"],
            tags=_stamp_tags(meta), overviews="nearest", **_georef(meta, self.name),
        )
        return _RasterSink(writer, lambda chunk: chunk.labels)


class ProbsFormat(OutputFormat):
    """Class probabilities ×255 as a uint8 (Geo)TIFF, by windows.

    Args:
        config: Prediction settings.
        probs_mode: ``classes`` (one band per class) or ``max`` (one band: the winning class's
            probability, i.e. the confidence; 0 = nodata).
    """

    name = "probs"
    suffix = "_probs.tif"
    needs_probs = True

    def __init__(self, config: PredictConfig, probs_mode: str = "classes", **options: Any) -> None:
        super().__init__(config)
        if probs_mode not in ("classes", "max"):
            raise ValueError(f"probs mode must be 'classes' or 'max', got {probs_mode!r}")
        self.mode = probs_mode

    def open(self, path: Path, meta: OutputMeta) -> _Sink:
        # A class's probability can be 0 anywhere, so in ``classes`` mode nodata pixels go to the
        # file's dataset mask (present only where the input has nodata); the winning class's
        # probability is at least 1/K, so in ``max`` mode 0 is free to be the nodata value.
        classes = self.mode == "classes"
        names = self.config.class_names
        writer = RasterWriter(
            path, width=meta.width, height=meta.height,
            count=self.config.num_classes if classes else 1, dtype=np.uint8,
            nodata=None if classes else 0,
            descriptions=list(names) if classes else ["confidence"],
            tags=_stamp_tags(meta), **_georef(meta, self.name, warn=False),
        )

        def bands(chunk: RowChunk) -> np.ndarray:
            if chunk.probs is None:
                raise ValueError("the probs format needs probabilities")
            if self.mode == "max":
                return chunk.probs.max(axis=0, keepdims=True)
            return chunk.probs

        return _RasterSink(writer, bands, masked=classes)


#: Format name -> class.
FORMATS: dict[str, type[OutputFormat]] = {
    cls.name: cls for cls in (MaskFormat, PaletteFormat, OverlayFormat, GeoTiffFormat, ProbsFormat)
}


class OutputSink:
    """All outputs of one input, written row by row, committed together.

    Use as a context manager: on success every file is completed, fsynced and renamed into place;
    on an exception every temporary file is deleted and nothing appears under a final name. A
    full disk raises :class:`~segpipe.fileio.DiskFullError` naming the output being written.
    """

    def __init__(self, targets: list[tuple[OutputFormat, Path]], meta: OutputMeta,
                 before_commit: Callable[[], None] | None = None,
                 stamps: Sequence[str | None] | None = None) -> None:
        self._targets = targets
        self.meta = meta
        self._stamps = list(stamps) if stamps is not None else [None] * len(targets)
        self._before_commit = before_commit
        self._files: list[AtomicFile] = []
        self._sinks: list[_Sink] = []
        self._current: Path | None = None  # the output being written, for error messages

    def __enter__(self) -> OutputSink:
        try:
            for (fmt, target), stamp in zip(self._targets, self._stamps):
                self._current = target
                # The writer creates the file (PNG/JPEG once encoded, GDAL when it opens it), so
                # a temporary file exists only while bytes are written; its name ends in
                # ".partial", so that no "*.png" glob takes it for an output.
                out = AtomicFile(target, suffix=f"{target.suffix}.partial", create=False)
                self._files.append(out)
                self._sinks.append(fmt.open(out.path, replace(self.meta, stamp=stamp)))
        except BaseException as exc:
            self._fail(exc)
        return self

    def write_rows(self, row0: int, chunk: RowChunk) -> None:
        """Hand rows ``[row0, row0 + h)`` to every format (rows must come in order)."""
        for (_fmt, target), sink in zip(self._targets, self._sinks):
            self._current = target
            sink.write_rows(row0, chunk)

    def _abort(self) -> None:
        for sink in self._sinks:
            sink.abort()
        for out in self._files:
            out.discard()

    def _disk_full(self, exc: BaseException) -> DiskFullError | None:
        return disk_full_error(exc, self._current or self._targets[0][1])

    def _named(self, exc: BaseException) -> BaseException:
        """An OS error that names the hidden temporary file (GDAL's "Attempt to create new
        tiff file '.segpipe-tmp-….partial' failed: Permission denied") as one naming the
        output, with GDAL's reason; any other error as it is."""
        text = str(exc)
        if not isinstance(exc, OSError) or self._current is None or TMP_PREFIX not in text:
            return exc
        reason = getattr(exc, "strerror", None) or text.rsplit(": ", 1)[-1]
        kind = PermissionError if isinstance(exc, PermissionError) or "ermission" in text else OSError
        return kind(f"cannot write {self._current}: {reason}")

    def _translated(self, exc: BaseException) -> BaseException:
        """``exc`` as the user should read it: a full disk as DiskFullError naming the output,
        an error naming the temporary file as one naming the output, else itself."""
        full = self._disk_full(exc)
        return full if full is not None else self._named(exc)

    def _fail(self, exc: BaseException) -> None:
        """Delete every temporary file and raise ``exc`` (see :meth:`_translated`)."""
        self._abort()
        translated = self._translated(exc)
        if translated is not exc:
            raise translated from exc
        raise exc

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None:
            self._abort()
            translated = self._translated(exc)
            if translated is not exc:
                raise translated from exc
            return False
        try:
            for (_fmt, target), sink in zip(self._targets, self._sinks):
                self._current = target
                sink.finish()
        except BaseException as err:
            self._fail(err)
        if self._before_commit is not None:
            self._before_commit()
        for i, ((_fmt, target), out) in enumerate(zip(self._targets, self._files)):
            self._current = target
            try:
                out.commit()  # deletes its temporary file and names the target on failure
            except BaseException as err:
                for rest in self._files[i + 1:]:
                    rest.discard()
                named = self._named(err)  # a folder in the output's place: named as the output
                if named is not err:
                    raise named from err
                raise
        return False


class PredictionWriter:
    """Writes every requested format of every prediction under one output folder.

    Args:
        output_dir: Output folder; outputs mirror the inputs' relative paths under it.
        formats: Format names from :data:`FORMATS`, or ``auto``.
        config: The model's prediction settings.
        overwrite: Rewrite outputs that already exist (else they count as done).
        probs_mode: ``classes`` or ``max`` (see :class:`ProbsFormat`).
        overlay_alpha: Mask weight of the overlay.

    Each output stores a stamp (:meth:`stamp`): the input it was made from (its path under the
    input folder, that folder, and :func:`~segpipe.data.io.input_fingerprint`) and its format.
    An existing file counts as done only when its stamp names this input, as it is now, and
    this format; one made from an input since changed is made again. A file without a stamp
    (ground-truth masks, an image), one whose header cannot be read, and another input's
    output (another name, or the same name in another input folder) are never taken as done
    nor replaced, ``overwrite`` or not: that input fails with the file named. Outputs of a
    segpipe that wrote no stamps are taken as done in a folder whose settings record it made
    (:attr:`unstamped_outputs`).
    """

    def __init__(
        self,
        output_dir: str | Path,
        formats: Sequence[str],
        config: PredictConfig,
        *,
        overwrite: bool = False,
        probs_mode: str = "classes",
        overlay_alpha: float = 0.5,
    ) -> None:
        names = list(dict.fromkeys(formats)) or ["auto"]
        unknown = [n for n in names if n != "auto" and n not in FORMATS]
        if unknown:
            raise ValueError(
                f"unknown output format(s) {unknown}; choose from auto, {', '.join(FORMATS)}"
            )
        self.output_dir = Path(output_dir)
        self._root = self.output_dir.resolve()
        self.names = names
        self.config = config
        self.overwrite = overwrite
        #: Called once, before the first output is named into place (``segpipe predict``
        #: records its settings there, so a run killed after it leaves them recorded).
        self.before_first_output: Callable[[], None] | None = None
        self._first_lock = threading.Lock()
        #: Whether files without a stamp are outputs of an older segpipe (taken as done unless
        #: ``overwrite``): set by ``segpipe predict`` for a folder it recorded without stamps.
        self.unstamped_outputs = False
        #: The input folder (resolved), recorded in each stamp: set by ``segpipe predict``.
        self.input_root: str | None = None
        options = {"probs_mode": probs_mode, "overlay_alpha": overlay_alpha}
        needed = {"mask", "geotiff"} if "auto" in names else set()
        self.formats = {
            n: FORMATS[n](config, **options) for n in FORMATS if n in names or n in needed
        }

    def resolve(self, georeferenced: bool) -> list[str]:
        """Format names for an input (``auto`` -> geotiff for georeferenced rasters, else mask)."""
        out: list[str] = []
        for n in self.names:
            n = ("geotiff" if georeferenced else "mask") if n == "auto" else n
            if n not in out:
                out.append(n)
        return out

    def all_names(self) -> list[str]:
        """Every format name an input may get (for collision checks)."""
        return list(self.formats)

    def target(self, rel: str | Path, name: str) -> Path:
        """Output file of format ``name`` for the input at relative path ``rel``.

        Raises:
            UnsafeOutputPath: When the path would leave the output folder.
        """
        rel = Path(rel)
        if rel.is_absolute() or ".." in rel.parts:
            raise UnsafeOutputPath(f"input path {rel} is not a safe relative path")
        path = self.output_dir / self.formats[name].filename(rel)
        resolved = path.resolve()
        if not resolved.is_relative_to(self._root) or resolved == self._root:
            raise UnsafeOutputPath(
                f"output {path} would be written outside the output folder {self.output_dir} "
                "(a symbolic link?); remove the link or choose another --output"
            )
        return path

    def stamp(self, rel: str | Path, name: str, fingerprint: str) -> str:
        """What the ``name`` output of the input at ``rel`` under :attr:`input_root` stores to
        say what it was made from: ``{"input", "root", "format", "input_fingerprint"}`` as
        JSON; ``fingerprint`` is :func:`~segpipe.data.io.input_fingerprint`'s."""
        return json.dumps({"input": Path(rel).as_posix(), "root": self.input_root,
                           "format": name, "input_fingerprint": fingerprint}, sort_keys=True)

    def pending(self, rel: str | Path, names: Sequence[str],
                source: str | Path | None = None,
                fingerprint: str | None = None) -> list[str]:
        """The formats of ``names`` still to write for the input ``source`` at ``rel``: those
        whose file is missing or empty (segpipe's outputs are named into place whole, so one of
        0 bytes was damaged outside), made from the input as it was before, or any with
        ``overwrite`` (see the class docstring). ``fingerprint``: the input's
        :func:`~segpipe.data.io.input_fingerprint` when the caller has it.

        Raises:
            OutputInTheWay: A file at an output's path that segpipe did not write, that cannot
                be read, or that is another input's output.
        """
        out: list[str] = []
        for n in names:
            target = self.target(rel, n)
            if not _has_bytes(target):
                out.append(n)
                continue
            if source is None:  # no input to compare with: the file's presence decides
                if self.overwrite:
                    out.append(n)
                continue
            try:
                found = read_output_stamp(target)
            except OSError as exc:
                raise OutputInTheWay(
                    f"{target} is in the way of its {n} output and cannot be read ({exc}): it "
                    "is neither taken as done nor replaced; delete it if it is a damaged earlier "
                    "output, else move it away or choose another --output") from None
            if found is None:
                if not self.unstamped_outputs:
                    raise OutputInTheWay(
                        f"{target} is in the way of its {n} output and does not say segpipe "
                        "predict made it (ground-truth masks? an image? an output of a segpipe "
                        "before 2026-12, which did not say so): it is neither taken as done nor "
                        "replaced; move it away (delete it if it is an earlier prediction), or "
                        "choose another --output")
                if self.overwrite:
                    out.append(n)
                continue
            try:
                made = json.loads(found)
                made_from, made_as = made["input"], made["format"]
            except (ValueError, TypeError, KeyError):
                made_from, made_as, made = None, None, {}
            if (made_from, made_as) != (Path(rel).as_posix(), n):
                raise OutputInTheWay(
                    f"{target}, the name of its {n} output, holds the {made_as} output of "
                    f"{made_from} (made by an earlier run); rename one of the two inputs, or "
                    "choose another --output")
            if fingerprint is None:
                fingerprint = input_fingerprint(source)
            same = made.get("input_fingerprint") == fingerprint
            root = made.get("root")
            if root is not None and root != self.input_root and not same:
                raise OutputInTheWay(
                    f"{target} holds the {n} output of {made_from} in {root}, another input "
                    f"folder than this run's ({self.input_root}): it is neither taken as done "
                    "nor replaced; give each input folder its own --output")
            if self.overwrite or not same:
                out.append(n)  # asked to, or the input was changed since: made again
        return out

    def needs_probs(self, names: Sequence[str]) -> bool:
        """Whether any of the formats needs probabilities."""
        return any(self.formats[n].needs_probs for n in names)

    def needs_display(self, names: Sequence[str]) -> bool:
        """Whether any of the formats needs a picture of the input."""
        return any(self.formats[n].needs_display for n in names)

    def open(self, rel: str | Path, names: Sequence[str], meta: OutputMeta) -> OutputSink:
        """An :class:`OutputSink` for the formats ``names`` of the input at ``rel``, each output
        stamped with what it is made from (:meth:`stamp`): the input as it was before it was
        read (``meta.fingerprint``), else as it is now. An input gone by now gets an empty
        fingerprint: its outputs are still known as segpipe's, and made again by a later run
        (without a stamp they had been refused as another program's, even by --overwrite)."""
        fingerprint = meta.fingerprint
        if fingerprint is None:
            try:
                fingerprint = input_fingerprint(meta.source)
            except OSError:
                fingerprint = ""
        stamps: list[str | None] = [self.stamp(rel, n, fingerprint) for n in names]
        return OutputSink([(self.formats[n], self.target(rel, n)) for n in names], meta,
                          before_commit=self._first_output, stamps=stamps)

    def __getstate__(self) -> dict[str, Any]:
        # Loader processes (spawned ones receive a pickled copy) write no output: no hook, and
        # no lock, which does not pickle.
        return {k: v for k, v in self.__dict__.items()
                if k not in ("before_first_output", "_first_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.before_first_output = None
        self._first_lock = threading.Lock()

    def _first_output(self) -> None:
        """Run :attr:`before_first_output` once (outputs may be committed by several threads:
        each waits until it has run, so none is named into place before it)."""
        with self._first_lock:
            hook, self.before_first_output = self.before_first_output, None
            if hook is not None:
                hook()

    def write(
        self,
        rel: str | Path,
        names: Sequence[str],
        pred: RowChunk,
        source: Path,
        raster: RasterInfo | None = None,
        fingerprint: str | None = None,
    ) -> list[Path]:
        """Write a whole image's prediction in every format of ``names`` (``fingerprint``: the
        input's as it was read, see :class:`OutputMeta`).

        Returns:
            The written files.
        """
        h, w = pred.labels.shape
        meta = OutputMeta(Path(source), h, w, raster, fingerprint=fingerprint)
        with self.open(rel, names, meta) as sink:
            sink.write_rows(0, pred)
        return [self.target(rel, n) for n in names]


def _has_bytes(path: Path) -> bool:
    """Whether ``path`` is a file of at least one byte."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False
