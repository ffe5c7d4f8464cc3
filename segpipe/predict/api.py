"""Prediction from Python: ``mask = Segmenter.from_checkpoint("last.ckpt").predict(image)``.

:class:`Segmenter` runs a trained model on images in memory or on disk and returns numpy
arrays. It prepares inputs exactly as ``segpipe predict`` does (same reading, channel adaptation,
normalisation, eval resize, tiling and TTA: :func:`~segpipe.data.datasets.prepare_image` and
:func:`~segpipe.predict.scoring.score_batch` are shared), so its masks equal the command's.

Example::

    from segpipe import Segmenter

    seg = Segmenter.from_checkpoint("runs/camvid_unet/checkpoints/last.ckpt")
    mask = seg.predict("frame.png")                 # (H, W) class indices
    proba = seg.predict_proba(rgb_array)            # (K, H, W) float32, sums to 1
    masks = seg.predict([img_a, img_b, "c.tif"])    # a list in, a list out (batched)
    seg.class_names, seg.palette                    # names and colours, from the checkpoint
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from segpipe.data.datasets import finite_range, prepare_image
from segpipe.data.io import (
    ImageReadError,
    open_raster,
    probe_raster,
    read_image_valid,
    sidecar_georeference,
)
from segpipe.predict.checkpoint import PredictConfig
from segpipe.predict.scoring import ProbabilityFn, score_batch

log = logging.getLogger(__name__)

__all__ = ["ImageLike", "Segmenter"]

#: One input: an (H, W[, C]) numpy array in its native dtype (uint8, uint16, float...), a PIL
#: image, or the path of an image file.
ImageLike = Union[np.ndarray, "Any", str, Path]


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision (None: ``segpipe predict``'s default)."""
    if precision is None:
        from segpipe.runtime import default_precision

        precision = default_precision()
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def _channel_first(shape: tuple[int, ...], channels: int, bands: Sequence[int] | None) -> bool:
    """Whether an (A, B, C) array is (channels, H, W) rather than (H, W, channels): its first
    axis can hold the channels (1, 3 or the model's count; with ``data.bands``, at least the
    highest band read) and its last cannot (more than 4 values; with bands, fewer than the
    highest band, or more than the first axis and both it and the second larger: rasterio's
    (bands, H, W) of a scene)."""
    first, second, last = shape
    if not bands:
        return first in {1, 3, channels} and last > 4
    need = max(bands)
    if first < need:
        return False
    return last < need or (first <= 32 and first < min(second, last))


class Segmenter:
    """A trained segmentation model for Python code (see the module docstring).

    Build it with :meth:`from_checkpoint` or :meth:`from_onnx`.

    Args:
        task: The task (or ONNX stand-in) mapping normalised (N, C, H, W) to logits.
        config: Its prediction settings (classes, colours, bands, normalisation).
        device: Where to compute.
        precision: Lightning-style precision (``bf16-mixed``, ``16-mixed``, ``32-true``);
            None: what ``segpipe predict`` picks on this machine.
        tile: Default sliding-window tile size (None: whole images).
        overlap: Default tile overlap.
        tta: Default flip test-time augmentation.
        tta_scales: Default multi-scale inference: factors of the evaluation size
            (``data.eval_resize``, else each image's size) to average the probabilities over,
            e.g. ``[0.75, 1, 1.25]``; each view is resized from the image at its native size
            (:func:`segpipe.tta.multiscale_probabilities`). None: the evaluation size alone.
        batch_size: Images (or tiles) per forward pass.
        bands: 1-based bands of the inputs to read, one per channel the model takes, instead of
            the checkpoint's ``data.bands`` (as ``segpipe predict --bands``); None: the
            checkpoint's.
        positive_threshold: Two-class models: label class 1 where its probability exceeds
            this instead of the checkpoint's ``model.positive_threshold`` (0.5 is the arg-max;
            :func:`segpipe.decision.decide`); None: the checkpoint's.
    """

    #: The BatchNorm blend of the last :meth:`adapt_batchnorm`, if any.
    _adaptation: Any = None

    def __init__(
        self,
        task: Any,
        config: PredictConfig,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        tile: int | None = None,
        overlap: float = 0.25,
        tta: bool = False,
        batch_size: int = 4,
        bands: Sequence[int] | None = None,
        tta_scales: Sequence[float] | None = None,
        positive_threshold: float | None = None,
    ) -> None:
        from segpipe.tta import check_scales

        config = config.with_bands(bands, option="bands").with_positive_threshold(
            positive_threshold, option="positive_threshold")
        self.device = _device(device)
        self.task = task.to(self.device) if isinstance(task, torch.nn.Module) else task
        if getattr(task, "channels_last", False):
            task.net.to(memory_format=torch.channels_last)
        self.config = config
        self.autocast = _autocast_dtype(precision)
        self.tile, self.overlap, self.tta, self.batch_size = tile, overlap, tta, int(batch_size)
        self.tta_scales = check_scales(tta_scales)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_tile(tile)
        self._dtypes_warned: set[str] = set()  # input dtypes unlike training's, said once each

    def _check_tile(self, tile: int | None) -> None:
        """Refuse a tile under the network's size step, as ``segpipe predict --tile`` does."""
        step = self.config.pad_multiple
        if tile is not None and (isinstance(tile, bool) or int(tile) < step):
            raise ValueError(f"tile must be at least the network's size step {step} (tiles are "
                             f"padded to its multiples), got {tile}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", **options: Any
    ) -> Segmenter:
        """A segmenter from a checkpoint written by ``segpipe fit``.

        Args:
            path: The ``.ckpt`` file.
            device: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda:1``...
            **options: ``precision``, ``tile``, ``overlap``, ``tta``, ``tta_scales``,
                ``batch_size``, ``bands``, ``positive_threshold``.
        """
        from segpipe.predict.checkpoint import CheckpointError, load_predictor

        if Path(path).suffix.lower() == ".onnx":
            raise CheckpointError(f"{path} is an ONNX model written by segpipe export: load it "
                                  "with Segmenter.from_onnx")
        task, config = load_predictor(path)
        return cls(task, config, device=device, **options)

    @classmethod
    def from_onnx(cls, path: str | Path, **options: Any) -> Segmenter:
        """A segmenter from ``segpipe export``'s ``model.onnx`` (onnxruntime, fp32, CPU).

        Args:
            path: The ``.onnx`` file (its ``model.json`` sidecar beside it).
            **options: ``tile``, ``overlap`` (default: what ``segpipe export`` recorded),
                ``tta``, ``tta_scales``, ``batch_size``, ``bands``, ``positive_threshold``
                (default: the checkpoint's, recorded by the export); ``device`` may only be
                ``cpu``.
        """
        from segpipe.predict.onnx import load_onnx_predictor

        task, config, sidecar = load_onnx_predictor(path)
        device = options.pop("device", "cpu")
        if str(device) not in ("cpu", "auto"):
            raise ValueError(f"an ONNX model runs on the CPU (onnxruntime), not on {device!r}; "
                             "use Segmenter.from_checkpoint for a GPU")
        precision = options.pop("precision", None)
        if precision not in (None, "32-true", "32", 32):
            log.warning("precision %s is ignored with an ONNX model: onnxruntime computes in fp32",
                        precision)
        from segpipe.predict.onnx import recorded_tiling

        chosen_tile, chosen_overlap = recorded_tiling(sidecar)  # export --tile/--overlap
        if options.get("tile") is None and chosen_tile:
            options["tile"] = chosen_tile
        if options.get("overlap") is None and chosen_overlap is not None:
            options["overlap"] = chosen_overlap
        return cls(task, config, device="cpu", precision="32-true", **options)

    # ------------------------------------------------------------------ model facts
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.config.num_classes

    @property
    def class_names(self) -> list[str]:
        """One name per class."""
        return list(self.config.class_names)

    @property
    def palette(self) -> np.ndarray:
        """uint8 colour lookup table indexed by label, (nodata label + 1, 3): row k is class
        k's colour and the nodata label (255, for NaN or nodata pixels) is black, so
        ``palette[mask]`` is a colour image of any mask this class returns (cut to
        ``num_classes`` rows it raised IndexError on nodata)."""
        return self.config.palette()

    # ------------------------------------------------------------------ prediction
    def predict(
        self, images: ImageLike | Sequence[ImageLike], *, tile: int | None = None,
        tta: bool | None = None, tta_scales: Sequence[float] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Class indices.

        Args:
            images: One image or a list (see :data:`ImageLike`).
            tile: Tile size for this call (default: the segmenter's).
            tta: TTA over the training symmetries for this call (default: the segmenter's).
            tta_scales: Multi-scale factors for this call (default: the segmenter's; ``[1]``:
                none).

        Returns:
            (H, W) uint8 (uint16 above 255 classes) per image, at the input's size; a list for a
            list.
        """
        return self._run(images, tile, tta, tta_scales, proba=False)

    def predict_proba(
        self, images: ImageLike | Sequence[ImageLike], *, tile: int | None = None,
        tta: bool | None = None, tta_scales: Sequence[float] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Class probabilities (arguments as :meth:`predict`).

        Returns:
            (K, H, W) float32 per image (summing to 1 over K); a list for a list.
        """
        return self._run(images, tile, tta, tta_scales, proba=True)

    def adapt_batchnorm(self, images: Sequence[ImageLike], weight: float = 0.5) -> Any:
        """Re-estimate the network's BatchNorm statistics on ``images`` and blend them in, as
        ``segpipe predict --bn_adapt`` does (:mod:`segpipe.models.batchnorm`): for images from
        another camera, scanner or lighting than the training ones. Later predictions use
        the blend until the returned object's ``restore()``. A second call replaces the first's
        blend (each blends with the training statistics, and its ``restore()`` brings those
        back).

        Args:
            images: Unlabelled images like those to predict (prepared as :meth:`predict`
                prepares them; larger than ``tile`` ones are cut into tiles).
            weight: Weight of their statistics, in (0, 1]; 1 is AdaBN.

        Returns:
            A :class:`~segpipe.models.batchnorm.BatchNormAdaptation` (``describe()``,
            ``restore()``).
        """
        from segpipe.models.batchnorm import adapt_batchnorm
        from segpipe.predict.tiling import covering_tiles, same_shape_batches

        from segpipe.predict.onnx import OnnxTask

        if not isinstance(self.task, torch.nn.Module) or isinstance(self.task, OnnxTask):
            raise TypeError("adapt_batchnorm needs a checkpoint's network; an ONNX export has "
                            "folded its BatchNorm statistics into the convolutions")
        tiles = (crop for item in images
                 for crop in covering_tiles(self._prepared(item, resize=self.tile is None)["image"],
                                            self.tile))
        batches = (b.to(self.device) for b in same_shape_batches(tiles, self.batch_size))
        if self._adaptation is not None:  # blend with the training statistics, not the last blend
            self._adaptation.restore()
        with self._context():
            self._adaptation = adapt_batchnorm(self.task.net, batches, weight, forward=self.task)
        return self._adaptation

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Same as :meth:`predict`."""
        return self.predict(images)

    # ------------------------------------------------------------------ internals
    def _pixels(self, item: ImageLike) -> tuple[np.ndarray, str, np.ndarray | None]:
        """(H, W, C) native pixels of one input, with the model's bands selected, and for a
        raster file its validity (False at nodata, as ``segpipe predict`` reads it) or None."""
        if isinstance(item, (str, Path)):
            item = Path(item).expanduser()
            if probe_raster(item) is not None:  # nodata / mask / alpha, as the command reads it
                with open_raster(item, self.config.bands, self.config.in_channels) as reader:
                    pixels, valid = reader.read(0, reader.height)
                return np.ascontiguousarray(pixels), str(item), valid
            # a PNG with a world file (a map tile): its transparent collar holds no data, as
            # the command reads it
            pixels, valid = read_image_valid(
                item, self.config.bands, self.config.in_channels,
                alpha_nodata=sidecar_georeference(item) is not None)
            return pixels, str(item), valid
        if isinstance(item, torch.Tensor):
            raise TypeError(
                f"cannot predict a torch.Tensor of shape {tuple(item.shape)}: give a numpy array "
                "(H, W[, C]) in the image's own dtype, e.g. tensor.permute(1, 2, 0).cpu().numpy() "
                "for a (C, H, W) tensor")
        if isinstance(item, np.ndarray) and item.dtype.kind in "iu" and item.dtype.itemsize > 2:
            top = int(item.max()) if item.size else 0
            if top <= 65535:
                log.warning(
                    "a %s array with values up to %d is scaled by its type's maximum (%d), as "
                    "segpipe reads %s files, so it comes out almost black; convert 8-bit images "
                    "with .astype(np.uint8) and 16-bit ones with .astype(np.uint16)",
                    item.dtype, top, np.iinfo(item.dtype).max, item.dtype)
        if not isinstance(item, np.ndarray):  # a PIL image
            mode = getattr(item, "mode", None)
            if mode is None:
                raise TypeError(
                    f"cannot predict a {type(item).__name__}: give a numpy array (H, W[, C]), "
                    "a PIL image or a file path"
                )
            from PIL import ImageOps

            # a file path is read upright (EXIF orientation applied): the same photo opened
            # with PIL gave a mask of the other shape
            item = ImageOps.exif_transpose(item)
            if mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "1"):
                item = item.convert("L" if mode in ("LA", "1") else "RGB")
            return np.asarray(item), f"PIL image ({mode})", None
        masked = None
        if isinstance(item, np.ma.MaskedArray):  # rasterio's read(masked=True): its nodata
            masked = np.ma.getmaskarray(item)
            item = np.ma.getdata(item)
        arr = item[:, :, None] if item.ndim == 2 else item
        if arr.ndim != 3:
            raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {item.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"the array of shape {item.shape} holds no pixel")
        channels, bands = self.config.in_channels, self.config.bands
        if item.ndim == 3 and arr.shape[2] != channels and _channel_first(arr.shape, channels,
                                                                          bands):
            raise ValueError(
                f"the array of shape {item.shape} looks channel-first (C, H, W), as a tensor's "
                f"numpy() and rasterio's read() are; give (H, W, C): array.transpose(1, 2, 0)")
        picked = None
        if bands and arr.shape[2] != self.config.in_channels and max(bands) <= arr.shape[2]:
            picked = [b - 1 for b in bands]
            arr = arr[:, :, picked]  # as data.bands picks them from files
        valid = None
        if masked is not None and masked.any():
            masked = masked.reshape(arr.shape[:2] + (-1,))
            # nodata where every band read is masked (GDAL's rule, as for files)
            valid = ~(masked[:, :, picked] if picked and masked.shape[2] > 1 else masked).all(2)
        return arr, f"array {item.shape} {item.dtype}", valid

    def _prepared(self, item: ImageLike, resize: bool) -> dict[str, torch.Tensor]:
        cfg = self.config
        transform = cfg.eval_transform(resize)
        try:
            pixels, source, valid = self._pixels(item)
            cfg.warn_dtype_once(self._dtypes_warned, str(pixels.dtype), source,
                                lambda: finite_range(pixels, valid))
            return prepare_image(pixels, in_channels=cfg.in_channels, mean=cfg.mean, std=cfg.std,
                                 transform=transform, source=source, valid=valid)
        except ImageReadError as exc:
            if exc.kind != "channels":
                raise
            raise exc.with_hint(cfg.channel_hint(
                "bands", file_bands=exc.file_bands,
                array=isinstance(item, np.ndarray))) from None

    def _raster_tile(self, item: ImageLike) -> int | None:
        """The tile ``segpipe predict`` reads a raster file by when no tile is given (its
        ``DEFAULT_RASTER_TILE`` windows, at native resolution), so that the two give the same masks;
        None for anything predicted whole: other inputs, rasters no larger than a tile, and
        with ``eval_resize`` TIFFs without georeference (resized as ``segpipe test`` does)."""
        from segpipe.predict.command import DEFAULT_RASTER_TILE as RASTER_TILE
        from segpipe.predict.tiling import raster_by_windows

        if not isinstance(item, (str, Path)):
            return None
        info = probe_raster(Path(item).expanduser())
        by_windows = raster_by_windows(info, self.config.eval_resize is not None, RASTER_TILE)
        # one window holds a raster no larger than a tile: whole is the same
        return RASTER_TILE if by_windows and max(info.height, info.width) > RASTER_TILE else None

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.autocast is not None and isinstance(self.task, torch.nn.Module):
                with torch.autocast(self.device.type, dtype=self.autocast):
                    yield
            else:
                yield

    def _run(
        self, images: ImageLike | Sequence[ImageLike], tile: int | None, tta: bool | None,
        tta_scales: Sequence[float] | None, proba: bool,
    ) -> np.ndarray | list[np.ndarray]:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        tile = self.tile if tile is None else tile
        self._check_tile(tile)
        prob_fn = ProbabilityFn(self.task, self.tta if tta is None else tta,
                                self.config.symmetries,
                                self.tta_scales if tta_scales is None else tta_scales)
        tiles = [tile if tile is not None else self._raster_tile(item) for item in items]
        # multi-scale views are resized from the native image, each to eval_resize x scale
        native = prob_fn.scales is not None and self.config.eval_resize is not None
        prepared = [self._prepared(item, resize=t is None and not native)
                    for item, t in zip(items, tiles)]
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(prepared):
            groups[(*item["image"].shape, tiles[i])].append(i)
        out: list[np.ndarray | None] = [None] * len(items)
        cfg = self.config
        with self._context():
            for key, indices in groups.items():
                tile = key[-1]
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    scored = score_batch(
                        [prepared[i]["image"] for i in chunk],
                        [prepared[i]["size"] for i in chunk],
                        self.device, self.task, prob_fn, num_classes=cfg.num_classes,
                        threshold=cfg.positive_threshold, probs=proba, tile=tile,
                        overlap=self.overlap, batch_size=self.batch_size,
                        base_size=self.config.eval_resize if native and tile is None else None,
                    )
                    for j, i in enumerate(chunk):
                        p, lab = scored.image(j, labels=not proba)
                        valid = prepared[i].get("valid")  # nodata, NaN: as the command writes
                        if proba:  # probs=True above: already probabilities
                            out[i] = p.float().cpu().numpy()
                            if valid is not None:
                                out[i][:, ~valid.numpy()] = 0.0
                        else:
                            out[i] = lab.cpu().numpy().astype(cfg.mask_dtype)
                            if valid is not None:
                                out[i][~valid.numpy()] = cfg.nodata_value
        return out[0] if single else out  # type: ignore[return-value]
