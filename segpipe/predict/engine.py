"""Prediction: the dataset, the module, the writing stage and the loop that runs them.

* :class:`PredictInputs` yields one record per input file. Files whose outputs all exist are
  ``skipped`` without being read; unreadable files become ``failed`` records (path and reason)
  instead of exceptions; ordinary images are decoded and normalised (in DataLoader workers);
  rasters that rasterio reads by windows are only probed, their pixels are read later.
* :class:`PredictModule` predicts a batch of records: images of equal size are stacked into one
  forward pass (optionally tiled, optionally with flip TTA); each raster is predicted by a
  sliding window over blocks read from disk by windows, and its finished rows are written strip
  by strip through the writer, so memory does not grow with the raster's height, and with its
  width only by the tile-overlap rows (see :func:`~segpipe.predict.tiling.sliding_window_blocks`).
* :class:`WritingCallback` writes the images' predictions, counts written / skipped / failed
  files, drives the progress bar and gathers the counts over processes at the end.
* :class:`InProcessRunner` runs them in this process on one device (the default, ``--devices
  1``): a plain PyTorch loop, so ``segpipe predict`` does not import Lightning (about 3 s).
  Several devices or a strategy run them under a Lightning ``Trainer`` instead
  (:mod:`segpipe.predict.distributed`), with the same hooks in the same order.

A full disk stops the run with :class:`OutputDiskFullError` (the same error for every
remaining file would say nothing new); any other write error fails only its file.

Under DDP, Lightning shards the files with an *unrepeated* distributed sampler (no padding
duplicates), so every file is predicted and written by exactly one process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from segpipe.data.datasets import PredictDataset, adapt_channels, finite_range
from segpipe.data.io import (
    ImageReadError,
    RasterReader,
    input_fingerprint,
    open_raster,
    probe_raster,
    sidecar_georeference,
    to_float,
)
from segpipe.data.normalization import normalize
from segpipe.fileio import DiskFullError, is_disk_full
from segpipe.models.batchnorm import BatchNormAdaptation, BatchNormAdaptError, adapt_batchnorm
from segpipe.predict.checkpoint import PredictConfig
from segpipe.predict.scoring import ProbabilityFn, score_batch
from segpipe.predict.tiling import (
    FinishedBlock,
    TileGrid,
    covering_tiles,
    raster_by_windows,
    same_shape_batches,
    sliding_window_blocks,
    spread_windows,
)
from segpipe.predict.writers import OutputMeta, PredictionWriter, RowChunk

if TYPE_CHECKING:  # annotations only
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from segpipe.tasks.inference import InferenceNet

__all__ = [
    "InProcessRunner",
    "InputFile",
    "ItemResult",
    "OutputDiskFullError",
    "PredictFailed",
    "PredictInputs",
    "PredictModule",
    "PredictOptions",
    "PredictSummary",
    "RasterSource",
    "WritingCallback",
    "collate_records",
    "in_process_device",
    "to_display",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    """One input.

    Attributes:
        path: The image file.
        rel: Its path relative to the input folder (outputs mirror it).
        error: A reason known before reading (e.g. an output-name collision), or None.
    """

    path: Path
    rel: Path
    error: str | None = None


@dataclass(frozen=True)
class PredictOptions:
    """How to predict.

    Attributes:
        tile: Tile size for ordinary images (None: whole images); also the rasters' tile
            when given.
        overlap: Tile overlap fraction.
        raster_tile: Tile size for rasters read by windows when ``tile`` is None.
        tta: Average the probabilities over the symmetries the model was trained with
            (:mod:`segpipe.tta`).
        tta_scales: Multi-scale inference: factors of the evaluation size
            (:func:`segpipe.tta.check_scales`); whole images then come at their native size
            and each view is resized from them. None: the evaluation size alone.
        batch_size: Images, or tiles, per forward pass.
        fail_fast: Stop at the first failed file.
        progress: Show progress bars (rank 0).
        chunk_cols: Most columns of a raster blended at once (the block width of
            :func:`~segpipe.predict.tiling.sliding_window_blocks`; at least one tile).
        bn_adapt: Weight of the input images' BatchNorm statistics, blended with the
            training ones before predicting (:mod:`segpipe.models.batchnorm`); 0: off.
    """

    tile: int | None = None
    overlap: float = 0.25
    raster_tile: int = 512
    tta: bool = False
    tta_scales: list[float] | None = None
    batch_size: int = 4
    fail_fast: bool = False
    progress: bool = True
    chunk_cols: int = 4096
    bn_adapt: float = 0.0


@dataclass
class ItemResult:
    """Outcome of one input (what the predict step returns per file).

    Attributes:
        path: The input file.
        rel: Its relative path.
        status: ``predicted`` (to be written by the callback), ``written``, ``skipped`` or
            ``failed``.
        reason: Why it failed.
        formats: Formats to write.
        prediction: The prediction of a ``predicted`` image.
        raster: The header (:class:`~segpipe.data.io.RasterInfo`) of a georeferenced raster
            predicted whole, as an image, whose outputs keep its georeference; else None.
        fingerprint: The input's fingerprint taken before it was read (its outputs' stamps).
    """

    path: str
    rel: str
    status: str
    reason: str = ""
    formats: list[str] = field(default_factory=list)
    prediction: RowChunk | None = None
    raster: Any = None
    fingerprint: str | None = None


class PredictFailed(RuntimeError):
    """Raised with ``fail_fast`` at the first failed file."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class OutputDiskFullError(RuntimeError):
    """The output folder's disk is full: the run stops (finished outputs are complete).

    Args:
        output_dir: The output folder.
        source: The input whose outputs could not be written.
        cause: The full-disk error (its file is named in the message).

    Attributes:
        output_dir: The output folder.
        source: The input whose outputs could not be written.
        pending: Outcomes of files finished earlier in the same batch, not yet counted (the
            :class:`WritingCallback` counts them when the exception reaches it).
        summary: The counts up to the stop, when the command sets them.
    """

    def __init__(self, output_dir: str | Path, source: str | Path,
                 cause: BaseException | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.source = str(source)
        self.pending: list[ItemResult] = []
        self.summary: PredictSummary | None = None
        quota = isinstance(cause, DiskFullError) and cause.errno != errno.ENOSPC
        what = "disk quota exceeded for" if quota else "no space left on the device of"
        where = f" (writing {cause.path})" if isinstance(cause, DiskFullError) else ""
        super().__init__(
            f"{what} the output folder {self.output_dir}{where}; stopped. The outputs "
            "already there are complete (nothing partial was left); free some space and run "
            "the same command again: it resumes where it stopped."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self.output_dir), self.source))


@dataclass
class PredictSummary:
    """Counts of a prediction run.

    Attributes:
        written: Files whose outputs were written.
        skipped: Files whose outputs already existed.
        failures: ``(path, reason)`` of each failed file.
        rank: Global rank of the process holding this summary (0 prints it).
        stopped_early: The run stopped at the first failure (``fail_fast``).
        interrupted: The run was interrupted (Ctrl-C); files not reached are not counted.
        terminated: The interruption was a SIGTERM.
        seconds: Time in the prediction loop (reading, predicting, writing; the slowest
            process), without loading the checkpoint and starting the Trainer.
        batchnorm_statistics: What ``bn_adapt`` did (None: the training statistics).
    """

    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    rank: int = 0
    stopped_early: bool = False
    interrupted: bool = False
    terminated: bool = False
    seconds: float = 0.0
    batchnorm_statistics: str | None = None

    @property
    def failed(self) -> int:
        """Number of failed files."""
        return len(self.failures)

    def line(self) -> str:
        """``predict: 12 written, 3 skipped (already done), 1 failed``."""
        return (
            f"predict: {self.written} written, {self.skipped} skipped (already done), "
            f"{self.failed} failed"
        )

    def report(self) -> str:
        """The summary line followed by one ``path: reason`` line per failure (and by what
        ``bn_adapt`` did)."""
        bn = ([f"  BatchNorm statistics: {self.batchnorm_statistics}"]
              if self.batchnorm_statistics else [])
        return "\n".join([self.line(), *bn, *(f"  {p}: {r}" for p, r in self.failures)])

    def merge(self, other: PredictSummary) -> None:
        """Add another process's counts."""
        self.written += other.written
        self.skipped += other.skipped
        self.failures.extend(other.failures)


def _on_terminal() -> bool:
    """Whether progress bars (on standard error) go to a terminal, not a pipe or a log file."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _reason(exc: BaseException, config: PredictConfig | None = None) -> str:
    """One line on why a file failed; a channel mismatch names ``--bands``, not training
    options (a finished checkpoint's ``data.in_channels`` cannot change)."""
    if isinstance(exc, ImageReadError):
        hint = (config.channel_hint(file_bands=exc.file_bands)
                if exc.kind == "channels" and config is not None else exc.hint)
        return f"{exc.reason} ({hint})"
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------ data
#: Most windows of one raster that ``--bn_adapt`` reads for its statistics (32 of 512² px:
#: 8 M pixels, the work of predicting a 2900² raster once).
RASTER_STATISTICS_WINDOWS = 32


class PredictInputs(Dataset):
    """One record per input file (see the module docstring).

    Args:
        files: Inputs.
        writer: Decides which outputs are still to write.
        config: Preprocessing.
        resize: Apply ``config.eval_resize`` to ordinary images, TIFFs without georeference
            included (not when tiling), and to georeferenced rasters no larger than
            ``chip_size`` (chips like the ones ``segpipe test`` scores resized; their outputs
            keep the georeference); larger rasters are predicted by windows at native
            resolution, with a warning.
        chip_size: The largest side of a georeferenced raster predicted whole (the raster
            tile).
        native: With ``resize``, hand images over at their native size all the same (and
            decide which TIFFs are images as with the resize): multi-scale inference resizes
            each of its views from them to ``eval_resize`` times its scale.
    """

    def __init__(
        self,
        files: Sequence[InputFile],
        writer: PredictionWriter,
        config: PredictConfig,
        resize: bool = True,
        chip_size: int = 512,
        native: bool = False,
    ) -> None:
        self.files = list(files)
        self.chip_size = int(chip_size)
        #: Rasters that :meth:`images_for_statistics` did not read.
        self.rasters_left_out = 0
        self.writer = writer
        self.config = config
        #: Whether the model takes images resized (``eval_resize``), here or by its views.
        self.resizes = bool(resize and config.eval_resize)
        #: Whether images come at their native size although the model takes them resized.
        self.native = self.resizes and native
        self.images = PredictDataset(
            [f.path for f in self.files], transform=config.eval_transform(resize and not native),
            mean=config.mean,
            std=config.std, bands=config.bands, in_channels=config.in_channels,
        )
        #: Input dtypes unlike the training images' that were warned about (once each).
        self._dtypes_warned: set[str] = set()
        self._resize_warned = False  # eval_resize not applied to a georeferenced raster

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"index", "path", "rel"}`` plus ``status``/``reason`` (skipped, failed), or
        ``kind="raster"``, or ``kind="image"`` with ``image`` float32 (C, h, w) and ``size``
        int64 [H, W]; and ``formats`` (names to write)."""
        f = self.files[index]
        rec: dict[str, Any] = {"index": index, "path": str(f.path), "rel": f.rel.as_posix()}
        if f.error:
            rec.update(status="failed", reason=f.error)
            return rec
        try:
            info = probe_raster(f.path)
            # a PNG/JPEG with a world file is georeferenced too (read whole, as any PNG)
            geo = info if info is not None else sidecar_georeference(f.path)
            names = self.writer.resolve(geo is not None and geo.georeferenced)
            try:  # before it is read: its outputs say what they were made from
                rec["fingerprint"] = input_fingerprint(f.path)
            except OSError:
                rec["fingerprint"] = None
            pending = self.writer.pending(f.rel, names, f.path, rec["fingerprint"])
            if not pending:
                rec["status"] = "skipped"
                return rec
            rec["formats"] = pending
            whole = None
            if not self._by_windows(info):
                # a plain TIFF or a georeferenced chip: at the evaluation size, as the API and
                # test do (a chip's outputs keep its georeference)
                whole = geo if geo is not None and geo.georeferenced else None
                info = None
            elif self.resizes and not self._resize_warned:
                self._resize_warned = True
                log.warning(
                    "the model was evaluated on images resized to %s; georeferenced rasters "
                    "larger than %d pixels, such as %s, are predicted by windows at their "
                    "native resolution instead (not as segpipe test scores them)",
                    self.config.eval_resize, self.chip_size, f.path)
            if info is not None:
                rec["kind"] = "raster"
                self.config.warn_dtype_once(self._dtypes_warned, info.dtype, str(f.path),
                                            lambda: self._sampled_range(f.path),
                                            once="type and loader process")
                return rec
            # a georeferenced PNG (a map tile with a world file): its transparent collar holds
            # no data, as a GeoTIFF's alpha band says
            item = self.images.get(index, unresized=self.writer.needs_display(pending),
                                   alpha_nodata=geo is not None and geo.georeferenced)
            self.config.warn_dtype_once(self._dtypes_warned, item["dtype"], str(f.path),
                                        lambda: item.get("value_range"),
                                        once="type and loader process")
            rec.update(kind="image", image=item["image"], size=item["size"],
                       valid=item.get("valid"), dtype=item["dtype"], raster=whole)
            if "unresized" in item:  # eval_resize: the overlay shows the input as it is
                rec["unresized"] = item["unresized"]
        except Exception as exc:  # noqa: BLE001 - reported with the file, the run goes on
            rec.update(status="failed", reason=_reason(exc, self.config))
        return rec

    def _sampled_range(self, path: Path, side: int = 256) -> tuple[float, float] | None:
        """Finite (min, max) of a float raster's valid pixels in up to five ``side``-pixel
        windows (the centre, then the quarters' centres, until one holds data): a raster is
        not read whole before its windows are predicted, and raw reflectances (0..10000) given
        to a model trained on integer images are to be warned about as for other images."""
        with open_raster(path, self.config.bands, self.config.in_channels) as reader:
            h, w = reader.height, reader.width
            for fy, fx in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
                r0 = min(max(0, int(h * fy) - side // 2), max(0, h - side))
                c0 = min(max(0, int(w * fx) - side // 2), max(0, w - side))
                pixels, valid = reader.read(r0, min(h, r0 + side), c0, min(w, c0 + side))
                found = finite_range(pixels, valid)
                if found is not None:
                    return found
        return None

    def _by_windows(self, info: Any) -> bool:
        """Whether a file is predicted as a raster, by windows at native resolution: a TIFF
        rasterio reads, unless the model takes images resized (``eval_resize``) and the TIFF
        has no georeference or is a chip no larger than ``chip_size`` (then it is an image
        like a PNG, resized as in ``segpipe test``)."""
        return raster_by_windows(info, self.resizes, self.chip_size)

    def images_for_statistics(
        self, tile: int | None, raster_tile: int, raster_windows: int = RASTER_STATISTICS_WINDOWS,
    ) -> Iterator[Tensor]:
        """Every input, normalised as for prediction, for ``--bn_adapt``.

        An ordinary image comes whole, or cut into non-overlapping ``tile`` squares (the last
        row and column of squares flush with the edges) when larger. A raster read by windows
        gives at most ``raster_windows`` of those squares (``tile`` or ``raster_tile``), spread
        evenly over it (:func:`~segpipe.predict.tiling.spread_windows`), each read from the file
        on its own, so memory stays at one window; windows holding any nodata pixel are left
        out, as their fill value is no image statistic. All files count, those whose outputs
        exist too, so a resumed run predicts with the same statistics. Unreadable files are
        left to fail in prediction; rasters that gave no window are counted in
        :attr:`rasters_left_out`.
        """
        self.rasters_left_out = 0
        for index, f in enumerate(self.files):
            if f.error:
                continue
            try:
                if self._by_windows(probe_raster(f.path)):
                    windows = 0
                    for window in self._raster_windows(f.path, tile or raster_tile, raster_windows):
                        windows += 1
                        yield window
                    self.rasters_left_out += windows == 0
                    continue
                image = self.images[index]["image"]
            except Exception:  # noqa: BLE001 - the prediction reports this file's failure
                continue
            if self.native:  # statistics of the plain view, as the network sees it
                from segpipe.tta import resize_view

                image = resize_view(image[None], self.config.eval_resize)[0]
            yield from covering_tiles(image, tile)

    def _raster_windows(self, path: Path, tile: int, most: int) -> Iterator[Tensor]:
        """Normalised (C, h, w) windows of the raster at ``path`` without nodata."""
        with open_raster(path, self.config.bands, self.config.in_channels) as reader:
            source = RasterSource(reader, self.config)
            for row0, row1, col0, col1 in spread_windows(reader.height, reader.width, tile, most):
                pixels, valid = source.window(row0, row1, col0, col1)
                if valid is None or valid.all():
                    yield source.tile((pixels, None), 0, col1 - col0)



def collate_records(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep records as a list: the predict step groups images of equal size itself."""
    return batch


def _display_from_unit(image: np.ndarray, channels: Sequence[int] | None = None) -> np.ndarray:
    """(H, W, C) float [0, 1] -> (H, W, 3) uint8: ``channels`` (0-based; 3, or 1 shown grey),
    by default the first three channels, or the first as grey."""
    if channels is not None:
        image = image[..., list(channels)]
    rgb = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    rgb = np.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=0.0)  # nodata shown black
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: Normalised values shown from black to white in the picture of a non-8-bit input: the
#: training mean +- this many standard deviations.
DISPLAY_STD = 2.5


def _display_stretched(normalised: np.ndarray,
                       channels: Sequence[int] | None = None) -> np.ndarray:
    """(H, W, C) normalised values -> (H, W, 3) uint8, the training mean +- ``DISPLAY_STD``
    standard deviations spread over 0..255: a 16-bit or float input's own [0, 1] scaling
    shows nearly black (12 bits of data in 16) or all white (reflectances x 10000)."""
    return _display_from_unit(normalised / (2 * DISPLAY_STD) + 0.5, channels)


def to_display(image: Tensor, mean: Sequence[float], std: Sequence[float],
               stretch: bool = False, channels: Sequence[int] | None = None) -> np.ndarray:
    """Undo the normalisation of a (C, H, W) image for viewing.

    Args:
        image: Normalised (C, H, W) image.
        mean: Per-channel mean it was normalised with.
        std: Per-channel std.
        stretch: Show the training mean +- ``DISPLAY_STD`` std (for inputs other than 8-bit,
            whose [0, 1] scaling shows badly) instead of the [0, 1] values.
        channels: 0-based channels shown (3, or 1 in grey); None: the first three.

    Returns:
        (H, W, 3) uint8.
    """
    if stretch:
        return _display_stretched(image.float().permute(1, 2, 0).cpu().numpy(), channels)
    m = torch.as_tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    unit = (image.float() * s + m).permute(1, 2, 0).cpu().numpy()
    return _display_from_unit(unit, channels)


class RasterSource:
    """A :class:`~segpipe.predict.tiling.WindowSource` reading a raster by windows.

    Windows stay in the file's dtype; each tile is converted like training data
    (:func:`~segpipe.data.io.to_float`, channel adaptation, normalisation) and nodata pixels
    are set to the mean (0 after normalisation), so they add no signal.

    Args:
        reader: Open raster.
        config: Preprocessing.
    """

    def __init__(self, reader: RasterReader, config: PredictConfig) -> None:
        self.reader = reader
        self.config = config
        self.height, self.width = reader.height, reader.width
        # Fails early (with the file's name) when the band count does not suit the model.
        adapt_channels(
            np.zeros((1, 1, reader.channels), np.float32), config.in_channels, reader.path
        )

    def window(
        self, row0: int, row1: int, col0: int, col1: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(pixels (h, w, C) native dtype, valid (h, w) bool or None)`` of rows
        ``[row0, row1)`` and columns ``[col0, col1)``."""
        return self.reader.read(row0, row1, col0, col1)

    def unit(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels scaled to [0, 1] float32 with the model's channel count: (h, w, C)."""
        return adapt_channels(to_float(pixels), self.config.in_channels, self.reader.path)

    def display(self, pixels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """(h, w, 3) uint8 picture of a window for overlays: 8-bit rasters as they are, others
        stretched over the training mean +- ``DISPLAY_STD`` std; nodata black."""
        unit = self.unit(pixels)
        channels = self.config.display_channels
        if pixels.dtype == np.uint8:
            picture = _display_from_unit(unit, channels)
        else:
            picture = _display_stretched(normalize(unit, self.config.mean, self.config.std),
                                         channels)
        if valid is not None:
            picture[~valid] = 0
        return picture

    def tile(self, window: tuple[np.ndarray, np.ndarray | None], col0: int, col1: int) -> Tensor:
        """Normalised float32 (C, h, col1 - col0) tile; columns count from the window's first."""
        pixels, valid = window
        img = normalize(self.unit(pixels[:, col0:col1]), self.config.mean, self.config.std)
        if valid is not None:
            img[~valid[:, col0:col1]] = 0.0
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class PredictModule(nn.Module):
    """Runs the trained network on :class:`PredictInputs` records.

    A runner (:class:`InProcessRunner`, or Lightning's for several devices) moves it to its
    device, sets :attr:`device`, and calls :meth:`on_predict_start`, :meth:`predict_step` for
    each batch and :meth:`on_predict_end`, in inference mode.

    Args:
        task: Trained network (from :func:`~segpipe.predict.checkpoint.load_predictor`).
        config: Its prediction settings.
        writer: Output writer (rasters are written from the predict step, strip by strip).
        options: Tiling, TTA, batch size.
    """

    def __init__(
        self,
        task: InferenceNet | nn.Module,
        config: PredictConfig,
        writer: PredictionWriter,
        options: PredictOptions,
    ) -> None:
        super().__init__()
        #: Where the network runs; the runner sets it.
        self.device = torch.device("cpu")
        self.task = task
        self.config = config
        self.writer = writer
        self.options = options
        self.prob_fn = ProbabilityFn(task, options.tta, config.symmetries, options.tta_scales)
        #: Set by the callback on the process that shows progress bars.
        self.show_progress = False
        #: What ``options.bn_adapt`` did, once predicting started.
        self.bn_description: str | None = None
        self._bn_adaptation: BatchNormAdaptation | None = None
        if task.channels_last:
            task.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> (N, K, H, W) probabilities."""
        return self.prob_fn(x)

    # ---------------------------------------------------------------- BatchNorm statistics
    def on_predict_start(
        self, inputs: PredictInputs, forward_context: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        """``bn_adapt``: blend the input images' BatchNorm statistics in before predicting.
        Every process estimates them on all the inputs, so all predict alike.

        Args:
            inputs: The data set predicted (all of it, whichever share this process has).
            forward_context: The precision context forward passes run in (autocast).
        """
        self._bn_adaptation = None
        if not self.options.bn_adapt:
            return
        try:
            with forward_context():
                self._bn_adaptation = adapt_batchnorm(
                    self.task.net, self._statistics_batches(inputs), self.options.bn_adapt,
                    forward=self.task,
                )
        except BatchNormAdaptError:
            if not inputs.rasters_left_out:
                raise
            raise BatchNormAdaptError(
                f"--bn_adapt estimates BatchNorm statistics on the inputs' pixels, and none of "
                f"the {inputs.rasters_left_out} raster(s) has a window of "
                f"{self.options.tile or self.options.raster_tile} "
                "px without nodata; use a smaller --tile, or drop the option") from None
        left_out = inputs.rasters_left_out
        self.bn_description = self._bn_adaptation.describe() + (
            f" ({left_out} raster(s) without a window free of nodata left out)"
            if left_out else "")

    def _statistics_batches(self, inputs: PredictInputs) -> Iterator[Tensor]:
        """(N, C, h, w) batches of equal-sized images or tiles, on the device."""
        images = inputs.images_for_statistics(self.options.tile, self.options.raster_tile)
        for batch in same_shape_batches(images, self.options.batch_size):
            yield batch.to(self.device)

    def on_predict_end(self) -> None:
        """Put the training BatchNorm statistics back after ``bn_adapt``."""
        if self._bn_adaptation is not None:
            self._bn_adaptation.restore()

    # ---------------------------------------------------------------- helpers
    def _fail(self, rec: dict[str, Any], exc: BaseException) -> ItemResult:
        log.debug("prediction of %s failed", rec["path"], exc_info=exc)
        return ItemResult(rec["path"], rec["rel"], "failed", _reason(exc, self.config),
                          rec.get("formats", []))

    def _tile_bar(self, total: int, name: str) -> Any:
        if not (self.show_progress and total > 1 and _on_terminal()):
            return None  # in a log file, a second bar's updates only interleave with the first
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"tiles {name}", unit="tile", leave=False, position=1,
                    dynamic_ncols=True)

    def _chunk(
        self,
        probs: Tensor | None,
        labels: Tensor,
        valid: np.ndarray | None,
        display: np.ndarray | None,
    ) -> RowChunk:
        cfg = self.config
        dtype = torch.uint8 if cfg.mask_dtype == np.uint8 else torch.int32
        lab = labels.to("cpu", dtype).numpy().astype(cfg.mask_dtype, copy=False)
        p8 = None
        if probs is not None:
            p8 = (probs * 255.0).round_().clamp_(0, 255).to("cpu", torch.uint8).numpy()
        if valid is not None:
            lab[~valid] = cfg.nodata_value
            if p8 is not None:
                p8[:, ~valid] = 0
        return RowChunk(lab, p8, display, valid)

    # ---------------------------------------------------------------- images
    def _predict_images(self, recs: list[dict[str, Any]]) -> list[ItemResult]:
        """Images of one size, stacked into one batch (or tiled one by one)."""
        opts, cfg = self.options, self.config
        h, w = recs[0]["image"].shape[-2:]
        want_probs = any(self.writer.needs_probs(r["formats"]) for r in recs)
        bar = None
        if opts.tile is not None and (h > opts.tile or w > opts.tile):
            bar = self._tile_bar(
                len(recs) * TileGrid.make(h, w, opts.tile, opts.overlap).num_tiles,
                Path(recs[0]["rel"]).name,
            )
        scored = score_batch(
            [r["image"] for r in recs], [r["size"] for r in recs],
            self.device, self.task, self.prob_fn, num_classes=cfg.num_classes,
            threshold=cfg.positive_threshold, probs=want_probs, tile=opts.tile,
            overlap=opts.overlap, batch_size=opts.batch_size,
            on_tiles=bar.update if bar is not None else None,
            # tta_scales: whole images came at their native size, views scale eval_resize
            base_size=cfg.eval_resize if opts.tile is None else None,
        )
        if bar is not None:
            bar.close()
        out = []
        for j, rec in enumerate(recs):
            names = rec["formats"]
            p, lab = scored.image(j)
            img = scored.x[j]
            need_display = self.writer.needs_display(names)
            if scored.resized and need_display:  # eval_resize: shown at the input's size
                if "unresized" in rec:
                    img = rec["unresized"]  # the input's own pixels, not the network's
                else:
                    img = F.interpolate(img[None].float(), size=scored.sizes[j],
                                        mode="bilinear", align_corners=False)[0]
            display = (to_display(img, cfg.mean, cfg.std, stretch=rec.get("dtype") != "uint8",
                                  channels=cfg.display_channels)
                       if need_display else None)
            valid = rec.get("valid")  # NaN/inf pixels of a float image: written as nodata
            valid = None if valid is None else valid.numpy()
            if display is not None and valid is not None and valid.shape == display.shape[:2]:
                display[~valid] = 0  # nodata black, as a raster's (its colours were shown)
            chunk = self._chunk(p if self.writer.needs_probs(names) else None, lab, valid, display)
            out.append(ItemResult(rec["path"], rec["rel"], "predicted", formats=names,
                                  prediction=chunk, raster=rec.get("raster"),
                                  fingerprint=rec.get("fingerprint")))
        return out

    # ---------------------------------------------------------------- rasters
    def _raster_block(
        self, blk: FinishedBlock, source: RasterSource, need_probs: bool, need_display: bool
    ) -> RowChunk:
        """Labels (and probabilities, picture, validity) of a finished block."""
        pixels, valid = blk.window
        h, w = blk.row1 - blk.row0, blk.col1 - blk.col0  # the window starts at (row0, col0)
        valid = valid[:h, :w] if valid is not None else None
        display = source.display(pixels[:h, :w], valid) if need_display else None
        return self._chunk(blk.probs() if need_probs else None,
                           blk.labels(self.config.positive_threshold), valid, display)

    def _raster_rows(
        self,
        blocks: Iterable[FinishedBlock],
        source: RasterSource,
        need_probs: bool,
        need_display: bool,
    ) -> Iterator[tuple[int, RowChunk]]:
        """Finished full-width rows ``(row0, RowChunk)`` assembled from the blocks of each strip.

        Only the strip's outputs are full width (labels, and uint8 probabilities and picture
        when a format needs them); the float accumulators are the blocks'. Each strip's arrays
        are new (a writer may keep a view of the last rows it was given).
        """
        cfg, width = self.config, source.width
        chunk: RowChunk | None = None
        for blk in blocks:
            part = self._raster_block(blk, source, need_probs, need_display)
            h, c0, c1 = blk.row1 - blk.row0, blk.col0, blk.col1
            if c0 == 0:
                chunk = RowChunk(
                    np.empty((h, width), cfg.mask_dtype),
                    np.empty((cfg.num_classes, h, width), np.uint8) if need_probs else None,
                    np.empty((h, width, 3), np.uint8) if need_display else None,
                )
            assert chunk is not None  # blocks come left to right from column 0
            chunk.labels[:, c0:c1] = part.labels
            if chunk.probs is not None:
                chunk.probs[:, :, c0:c1] = part.probs
            if chunk.display is not None:
                chunk.display[:, c0:c1] = part.display
            if part.valid is not None:
                if chunk.valid is None:
                    chunk.valid = np.ones((h, width), bool)
                chunk.valid[:, c0:c1] = part.valid
            if c1 == width:
                yield blk.row0, chunk
                chunk = None

    @staticmethod
    def _write_rows(sink: Any, row0: int, chunk: RowChunk, align: int = 256) -> None:
        """Hand rows to the sink in pieces ending on multiples of ``align`` (the GeoTIFF block
        height), so that a streaming writer never buffers more than one row of blocks."""
        h = chunk.labels.shape[0]
        cuts = [r - row0 for r in range((row0 // align + 1) * align, row0 + h, align)]
        for a, b in zip([0, *cuts], [*cuts, h]):
            sink.write_rows(row0 + a, RowChunk(
                chunk.labels[a:b],
                chunk.probs[:, a:b] if chunk.probs is not None else None,
                chunk.display[a:b] if chunk.display is not None else None,
                chunk.valid[a:b] if chunk.valid is not None else None,
            ))

    def _predict_raster(self, rec: dict[str, Any]) -> ItemResult:
        """Sliding window over blocks read from disk by windows; finished rows written strip by
        strip."""
        opts, cfg = self.options, self.config
        names = rec["formats"]
        need_probs = self.writer.needs_probs(names)
        need_display = self.writer.needs_display(names)
        tile = opts.tile or opts.raster_tile
        with open_raster(rec["path"], cfg.bands, cfg.in_channels) as reader:
            source = RasterSource(reader, cfg)
            grid = TileGrid.make(reader.height, reader.width, tile, opts.overlap)
            bar = self._tile_bar(grid.num_tiles, Path(rec["rel"]).name)
            meta = OutputMeta(Path(rec["path"]), reader.height, reader.width, reader.info,
                              fingerprint=rec.get("fingerprint"))
            try:
                with self.writer.open(rec["rel"], names, meta) as sink:
                    blocks = sliding_window_blocks(
                        source, self.prob_fn, cfg.num_classes, tile, opts.overlap,
                        opts.batch_size, device=self.device,
                        on_tiles=bar.update if bar is not None else None,
                        block_cols=opts.chunk_cols,
                    )
                    for row0, chunk in self._raster_rows(blocks, source, need_probs, need_display):
                        self._write_rows(sink, row0, chunk)
            finally:
                if bar is not None:
                    bar.close()
        return ItemResult(rec["path"], rec["rel"], "written", formats=names)

    # ---------------------------------------------------------------- step
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[ItemResult]:
        """Predict a batch of records.

        Returns:
            One :class:`ItemResult` per record, in order.
        """
        results: dict[int, ItemResult] = {}
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
        for rec in batch:
            status = rec.get("status")
            if status is not None:
                results[rec["index"]] = ItemResult(
                    rec["path"], rec["rel"], status, rec.get("reason", ""), rec.get("formats", [])
                )
            elif rec["kind"] == "raster":
                try:
                    results[rec["index"]] = self._predict_raster(rec)
                except Exception as exc:  # noqa: BLE001
                    if is_disk_full(exc):  # every further file would fail the same way
                        stop = OutputDiskFullError(self.writer.output_dir, rec["path"], exc)
                        stop.pending = [results[r["index"]] for r in batch if r["index"] in results]
                        raise stop from exc
                    results[rec["index"]] = self._fail(rec, exc)
            else:
                groups[tuple(rec["image"].shape)].append(rec)
        for recs in groups.values():
            try:
                for rec, res in zip(recs, self._predict_images(recs)):
                    results[rec["index"]] = res
            except Exception as exc:  # noqa: BLE001
                for rec in recs:
                    results[rec["index"]] = self._fail(rec, exc)
        return [results[rec["index"]] for rec in batch]


# ------------------------------------------------------------------------------ writing
class WritingCallback:
    """Writes predicted images, counts outcomes, shows progress, gathers counts over ranks.

    The runner calls :meth:`on_predict_start` before the module's, :meth:`write_on_batch_end`
    after each predict step, :meth:`on_predict_end` before the module's, and
    :meth:`on_exception` when the run stops on an exception (Ctrl-C included).

    With ``write_workers`` > 0 the files are encoded and written by a pool of threads (PNG and
    GeoTIFF encoders release the GIL) while the next batch is decoded and predicted; at most
    ``2 * write_workers`` images wait, so memory stays bounded. Outcomes are counted in input
    order either way.

    Args:
        writer: The output writer.
        num_files: Inputs in total (for the progress bar).
        fail_fast: Raise :class:`PredictFailed` at the first failure.
        progress: Show a progress bar on rank 0.
        write_workers: Writing threads (0: write in the predicting thread).
    """

    def __init__(
        self, writer: PredictionWriter, num_files: int, fail_fast: bool = False,
        progress: bool = True, write_workers: int = 0,
    ) -> None:
        self.writer = writer
        self.num_files = num_files
        self.fail_fast = fail_fast
        self.progress = progress
        self.write_workers = max(0, int(write_workers))
        self.summary = PredictSummary()
        self._bar: Any = None
        self._t0 = time.perf_counter()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[ItemResult, Future[None] | None]] = deque()

    def on_predict_start(self, module: nn.Module, is_global_zero: bool = True,
                         world_size: int = 1) -> None:
        """Start counting (and the progress bar, on the first process of ``world_size``)."""
        self.summary = PredictSummary()
        self._t0 = time.perf_counter()
        self._pending.clear()
        if self.write_workers > 0:
            self._pool = ThreadPoolExecutor(self.write_workers, thread_name_prefix="segpipe-write")
        if self.progress and is_global_zero:
            from tqdm.auto import tqdm

            share = math.ceil(self.num_files / world_size) if world_size > 1 else self.num_files
            desc = "files" if world_size == 1 else f"files (rank 0 of {world_size})"
            # in a log file (a batch job's), an update every 30 s, not ten a second
            self._bar = tqdm(total=share, desc=desc, unit="file", position=0, dynamic_ncols=True,
                             mininterval=0.1 if _on_terminal() else 30.0)
            if isinstance(module, PredictModule):
                module.show_progress = True

    def _record(self, res: ItemResult) -> None:
        self._count(res)
        if res.status == "failed" and self.fail_fast:
            raise PredictFailed(res.path, res.reason)

    def _count(self, res: ItemResult) -> None:
        if res.status == "written":
            self.summary.written += 1
        elif res.status == "skipped":
            self.summary.skipped += 1
        else:
            self.summary.failures.append((res.path, res.reason))
            msg = f"failed: {res.path}: {res.reason}"
            if self._bar is not None:
                self._bar.write(msg)
            else:
                log.error(msg)
        if self._bar is not None:
            self._bar.update(1)

    def write_on_batch_end(self, prediction: Sequence[ItemResult]) -> None:
        """Write (or hand to the writing threads) a predict step's results."""
        for res in prediction:
            if res.status != "predicted":
                self._pending.append((res, None))
                if res.status == "failed" and self.fail_fast:
                    self._drain()  # the files before it finish; this one raises PredictFailed
            elif self._pool is not None:
                self._pending.append((res, self._pool.submit(self._write, res)))
            else:
                self._finish(res, self._write(res))
                self._pending.append((res, None))
        self._drain(keep=2 * self.write_workers)

    def _write(self, res: ItemResult) -> BaseException | None:
        """Write one prediction's files; the error, if any, is returned (and judged in order)."""
        try:
            self.writer.write(res.rel, res.formats, res.prediction, Path(res.path), res.raster,
                              fingerprint=res.fingerprint)
        except Exception as exc:  # noqa: BLE001 - reported with the file, run goes on
            return exc
        finally:
            res.prediction = None  # the arrays are no longer needed
        return None

    def _finish(self, res: ItemResult, exc: BaseException | None) -> None:
        """The outcome of a write: ``written``, or ``failed`` with the reason; a full disk stops."""
        if exc is None:
            res.status = "written"
        elif is_disk_full(exc):  # ... unless every further file would fail the same way
            raise OutputDiskFullError(self.writer.output_dir, res.path, exc) from exc
        else:
            res.status, res.reason = "failed", f"could not write outputs ({_reason(exc)})"

    def _drain(self, keep: int = 0) -> None:
        """Count finished outcomes in input order, waiting for writes beyond the ``keep`` newest."""
        while self._pending:
            res, future = self._pending[0]
            if future is not None:
                if len(self._pending) <= keep and not future.done():
                    return
                self._pending.popleft()
                self._finish(res, future.result())
            else:
                self._pending.popleft()
            self._record(res)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # in-flight writes finish
            self._pool = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_predict_end(self, world_size: int = 1) -> None:
        """Finish the writes, and sum the counts of the ``world_size`` processes."""
        try:
            self._drain()
        finally:
            self._shutdown_pool()
        self._close_bar()
        self.summary.seconds = time.perf_counter() - self._t0
        dist = torch.distributed
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * world_size
            mine = self.summary
            dist.all_gather_object(parts, (mine.written, mine.skipped, mine.failures, mine.seconds))
            total = PredictSummary()
            for written, skipped, failures, seconds in parts:
                total.merge(PredictSummary(written, skipped, list(failures)))
                total.seconds = max(total.seconds, seconds)
            self.summary = total

    def on_exception(self, exception: BaseException) -> None:
        """Count what finished before the run stopped; stop the writing threads."""
        self._shutdown_pool()
        for res, future in self._pending:  # outcomes not yet counted: the finished ones count
            if future is None:
                self._count(res)
            elif not future.cancelled() and future.result() is None:
                res.status = "written"
                self._count(res)
        self._pending.clear()
        if isinstance(exception, OutputDiskFullError):
            for res in exception.pending:  # finished before the stop, in the same batch
                self._count(res)
            exception.pending = []
        self._close_bar()


# ------------------------------------------------------------------------------ running
#: ``--precision`` values the in-process loop runs, and their autocast dtype (None: fp32).
_IN_PROCESS_PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
    "16": torch.float16,
}
#: Environment variables a multi-process launcher sets (torchrun, SLURM's srun).
_LAUNCHER_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")


def in_process_device(accelerator: str, devices: int | str | Sequence[int], strategy: str,
                      precision: str) -> torch.device | None:
    """The device ``segpipe predict`` runs on in this process, or None when the options ask
    for what Lightning's ``Trainer`` does (several devices or processes, a strategy, another
    accelerator or precision), which then runs it and says what is wrong with the options.

    Args:
        accelerator: ``auto``, ``cpu``, ``gpu`` or ``cuda`` run in process.
        devices: ``1`` runs in process.
        strategy: ``auto`` runs in process.
        precision: One of ``32-true``, ``bf16-mixed`` or (on a GPU) ``16-mixed`` runs in process.

    Returns:
        ``cpu`` or the first visible CUDA device (as Lightning's ``devices=1`` picks), or None.
    """
    if strategy != "auto" or str(devices) != "1" or str(precision) not in _IN_PROCESS_PRECISIONS:
        return None
    if any(int(os.environ.get(name, "1") or 1) > 1 for name in _LAUNCHER_VARIABLES):
        return None  # each launched process is one rank of a run Lightning coordinates
    choice = str(accelerator)  # Lightning's names, as it spells them (it refuses "CPU")
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if choice in ("gpu", "cuda") or (choice == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    elif choice == "cpu" or (choice == "auto" and not mps):
        device = torch.device("cpu")
    else:
        device = None
    if device is not None and device.type == "cpu" and str(precision).startswith("16"):
        return None  # Lightning runs bf16-mixed instead on a CPU, and warns that it does
    return device


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored while the finished files are counted and the writers stop (Lightning
    ignores it from its first Ctrl-C on); the handler is restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class InProcessRunner:
    """Runs a :class:`PredictModule` and its :class:`WritingCallback` over a loader in this
    process, on one device: the hooks a Lightning ``Trainer`` calls, in its order, in
    inference mode and the precision's autocast; Ctrl-C (and SIGTERM, which the command turns
    into it) stops it as it stops Lightning's loop: the finished files are counted, the run
    reports itself interrupted.

    Args:
        device: From :func:`in_process_device`.
        precision: A precision :func:`in_process_device` accepted.
    """

    #: The process's rank: always the only one.
    rank = 0

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device = device
        self.autocast = _IN_PROCESS_PRECISIONS[str(precision)]

    def forward_context(self) -> AbstractContextManager[Any]:
        """The autocast of the precision (nothing for fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def run(self, module: PredictModule, callback: WritingCallback,
            loader: Iterable[list[dict[str, Any]]]) -> bool:
        """Predict every batch of ``loader``.

        Returns:
            Whether Ctrl-C (or SIGTERM) stopped it.

        Raises:
            Whatever a hook raises (after :meth:`WritingCallback.on_exception`).
        """
        module.to(self.device).eval()
        module.device = self.device
        inputs = getattr(loader, "dataset", None)
        try:
            with torch.inference_mode():
                callback.on_predict_start(module)
                module.on_predict_start(inputs, self.forward_context)
                for batch_idx, batch in enumerate(loader):
                    with self.forward_context():
                        prediction = module.predict_step(batch, batch_idx)
                    callback.write_on_batch_end(prediction)
                callback.on_predict_end()
        except KeyboardInterrupt as exc:
            with _sigint_ignored():  # a second Ctrl-C does not cut the clean-up short
                callback.on_exception(exc)
            return True
        except BaseException as exc:
            callback.on_exception(exc)
            raise
        finally:
            module.on_predict_end()  # the training BatchNorm statistics back, whatever happened
            if self.device.type == "cuda":  # as Lightning's teardown: GPU memory back
                module.cpu()
                torch.cuda.empty_cache()
        return False
