"""Training you can watch: default loggers, validation images and test figures.

* :func:`default_loggers`: what ``segpipe fit|validate|test`` log to when the config names no
  logger: TensorBoard (when the ``tensorboard`` package is installed, as with a normal install)
  and a CSV file (``metrics.csv``) in the same run folder, ``<default_root_dir>/lightning_logs/
  version_N``. Any Lightning logger can be chosen instead with ``--trainer.logger`` (W&B,
  MLflow, ...).
* :class:`ValidationImages`: after each validation, a few val images with the truth and the
  prediction overlaid, logged to every logger that takes images (TensorBoard, W&B, MLflow).
* :class:`TestFigures`: after ``test``, the report's confusion matrix and per-class IoU chart,
  logged the same way.
* :class:`ThrottledProgressBar`: Lightning's progress bar, refreshed at most every half second.
* :func:`quiet_disk_full_in_threads`: a logger's writer thread that meets a full disk prints no
  traceback of its own (the command reports it in one line, naming the file).

The learning rate is logged by Lightning's ``LearningRateMonitor``, which the CLI adds.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import TQDMProgressBar
import numpy as np
import torch

__all__ = [
    "TestFigures",
    "run_output_dir",
    "ThrottledProgressBar",
    "ValidationImages",
    "default_loggers",
    "has_tensorboard",
    "log_image",
    "next_version",
    "quiet_disk_full_in_threads",
]

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^version_(\d+)$")


def _thread_file(thread: threading.Thread | None) -> str | None:
    """The file a TensorBoard writer thread writes (its event file), else None."""
    name = getattr(getattr(getattr(thread, "_record_writer", None), "_writer", None),
                   "filename", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return name if isinstance(name, str) and name else None


def quiet_disk_full_in_threads() -> None:
    """Let a full disk met in a background thread pass without a traceback.

    TensorBoard writes its event file in a thread: on a full disk the thread printed a
    15-line traceback, then the training loop met the same error at its next log call and the
    command said it in one line, without naming the file (the thread's error has no file name).
    Here the thread's error is silenced and given the event file's name, so that the command's
    one line names it. Other errors in threads are printed as before. Idempotent.
    """
    from segpipe.fileio import is_disk_full

    previous = threading.excepthook
    if getattr(previous, "_segpipe_quiet_disk_full", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        exc = args.exc_value
        if exc is None or not is_disk_full(exc):
            previous(args)
            return
        name = _thread_file(args.thread)
        if isinstance(exc, OSError) and not exc.filename and name:
            exc.filename = name

    hook._segpipe_quiet_disk_full = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _next_version(folder: Path) -> int:
    """The first ``version_N`` not yet in ``folder`` (as Lightning's loggers number runs)."""
    taken = [int(m.group(1)) for p in folder.glob("version_*") if (m := _VERSION.match(p.name))]
    return max(taken, default=-1) + 1


def has_tensorboard() -> bool:
    """Whether TensorBoard's writer is importable (``tensorboard`` or ``tensorboardX``)."""
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def default_loggers(root: str | Path, version: int | None) -> list[Any]:
    """The loggers of a run whose config names none.

    TensorBoard and CSV write into one folder, ``root/lightning_logs/version_N``, so that
    ``tensorboard --logdir root`` shows the run and ``metrics.csv`` sits beside its event files.

    Args:
        root: ``trainer.default_root_dir``.
        version: N of ``version_N``; None lets each logger find the next free one.

    Returns:
        ``[CSVLogger, TensorBoardLogger]`` (CSV only where TensorBoard is not installed).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    common: dict[str, Any] = {"save_dir": str(root), "name": "lightning_logs", "version": version}
    # CSV first: it creates the folder and warns when it finds files there (TensorBoard's).
    loggers: list[Any] = [CSVLogger(**common)]
    if has_tensorboard():
        loggers.append(TensorBoardLogger(**common, default_hp_metric=False))
    return loggers


def next_version(root: str | Path, reserve: bool = False) -> int:
    """N of the next ``root/lightning_logs/version_N`` folder.

    Args:
        root: ``trainer.default_root_dir``.
        reserve: Create the folder, empty, so that another command started at the same time
            takes the next N (two ``segpipe test`` runs of one run folder both wrote
            ``version_N``, one over the other's results).
    """
    folder = Path(root) / "lightning_logs"
    version = _next_version(folder)
    while reserve:
        try:
            (folder / f"version_{version}").mkdir(parents=True)
            break
        except FileExistsError:
            version += 1
    return version


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> int:
    """Log an (H, W, 3) image in [0, 1] or uint8 to every logger that takes images.

    Args:
        trainer: The trainer (its loggers are used).
        tag: Name of the image (e.g. ``val/images``).
        image: (H, W, 3) float in [0, 1] or uint8.
        step: Global step.

    Returns:
        How many loggers took it.
    """
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    taken = 0
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        name = type(logger).__name__
        try:
            if name == "TensorBoardLogger":
                experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            elif name == "WandbLogger":
                logger.log_image(key=tag, images=[image], step=step)
            elif name == "MLFlowLogger":
                experiment.log_image(logger.run_id, image, f"{tag.replace('/', '_')}_{step:06d}.png")
            else:
                continue
            taken += 1
        except Exception as exc:  # noqa: BLE001 - a picture never stops training
            log.warning("could not log %s to %s: %s", tag, name, exc)
    return taken


def _display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of a (C, H, W) image: (H, W, 3) float in [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    unit = (image.detach().float().cpu() * s + m).permute(1, 2, 0).numpy()
    rgb = unit[..., :3] if unit.shape[-1] >= 3 else np.repeat(unit[..., :1], 3, axis=-1)
    lo, hi = float(rgb.min()), float(rgb.max())
    if hi > 1.0 or lo < 0.0 or hi - lo < 0.2:  # e.g. 16-bit rasters: stretch for viewing
        rgb = (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


class ValidationImages(L.Callback):
    """Log a few val images as ``image | truth | prediction`` rows after validations.

    The first ``num_images`` images of the first val batch (rank 0) are predicted again after
    the validation loop (one small extra forward pass) and drawn with the model's class colours;
    pixels of the ignored label show the image. At most one picture per ``min_interval``
    seconds, and the last validation's when training ends: a picture of 480×360 frames is
    about 3 MB, and short epochs validated every few seconds had grown the TensorBoard file by
    hundreds of MB in a 30-minute run (TensorBoard shows 10 steps of an image tag anyway).

    Args:
        num_images: Rows in the picture (0 disables).
        min_interval: Least seconds between two pictures (0: one after every validation).
    """

    def __init__(self, num_images: int = 4, min_interval: float = 60.0) -> None:
        self.num_images = int(num_images)
        self.min_interval = float(min_interval)
        self._batch: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # a validation not yet drawn
        self._last: float | None = None  # when the last picture was logged

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self.num_images > 0 and trainer.is_global_zero:
            k = self.num_images
            self._batch = {key: batch[key][:k].detach() for key in ("image", "mask", "size")
                           if key in batch}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch, self._batch = self._batch, None
        if batch is None or trainer.sanity_checking or not trainer.loggers:
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self.min_interval:
            self._pending = batch  # drawn at the end of training if no later one is
            return
        self._pending, self._last = None, now
        self._log(trainer, pl_module, batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch, self._pending = self._pending, None
        if batch is not None:
            self._log(trainer, pl_module, batch)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule,
             batch: dict[str, torch.Tensor]) -> None:
        spec = getattr(pl_module, "spec", None)
        if spec is None:
            return
        from segpipe.report import colorize_labels

        images, mask_hw = batch["image"], tuple(batch["mask"].shape[-2:])
        training = pl_module.training  # at the end of training: BatchNorm must not update
        pl_module.eval()
        try:
            with torch.no_grad():
                logits = pl_module(images)
        finally:
            pl_module.train(training)
        if tuple(images.shape[-2:]) != mask_hw:  # data.eval_resize: show the masks' size
            from segpipe.tasks.segmentation import to_mask_size

            logits = to_mask_size(logits, mask_hw, batch.get("size"))
            images = to_mask_size(images, mask_hw, batch.get("size"))
        from segpipe.decision import decide

        threshold = getattr(pl_module, "positive_threshold", None)
        preds = decide(logits if threshold is None else logits.float().softmax(dim=1),
                       threshold).cpu().numpy()
        mean, std = spec.normalization()
        colors = np.asarray(spec.class_colors, dtype=np.uint8)
        rows = []
        for image, mask, pred in zip(images, batch["mask"].cpu().numpy(), preds):
            base = _display(image, mean, std)
            rows.append(np.concatenate(
                [base, colorize_labels(mask, colors, base), colorize_labels(pred, colors, base)],
                axis=1,
            ))
        log_image(trainer, "val/images", np.concatenate(rows, axis=0), trainer.global_step)


class TestFigures(L.Callback):
    """After ``test``, log the report's confusion matrix and per-class IoU chart as images.

    Reads the PNGs that :class:`~segpipe.callbacks.TestMetricsWriter` wrote (it runs first).
    """

    __test__ = False  # not a pytest test class

    _FIGURES = ("confusion_matrix", "per_class_iou")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.loggers:
            return
        # Where TestMetricsWriter put the report (rank 0 decides under DDP: every rank asks).
        log_dir = run_output_dir(trainer)
        if not trainer.is_global_zero:
            return
        from segpipe.data.io import read_image
        from segpipe.report import REPORT_FILES_DIR

        folder = Path(log_dir) / REPORT_FILES_DIR
        for name in self._FIGURES:
            path = folder / f"{name}.png"
            if path.is_file():
                log_image(trainer, f"test/{name}", read_image(path)[..., :3], trainer.global_step)


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's progress bar, refreshed at most every ``interval`` seconds while training.

    Reading the training loss for display (``.item()``) makes the host wait for the GPU to
    finish the step; done after every step, the host could not queue the next step while the
    device runs this one. So the task logs the training loss without ``prog_bar`` (Lightning
    would convert it after every step), and this bar reads ``train/loss_step`` and
    ``train/loss_epoch`` itself when it refreshes: at most every ``interval`` seconds, and at an
    epoch's last batch. A slow CPU step still shows every update.

    Args:
        interval: Minimum seconds between refreshes of the training bar.
        **kwargs: As for :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    def __init__(self, interval: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = float(interval)
        self._last_refresh = float("-inf")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        last = batch_idx + 1 == self.total_train_batches
        if last or now - self._last_refresh >= self.interval:
            self._last_refresh = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's items plus the training loss (read here, once per refresh)."""
        items = super().get_metrics(trainer, pl_module)
        for key in ("train/loss_step", "train/loss_epoch"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key] = float(value)
        return items


def run_output_dir(trainer: L.Trainer) -> Path:
    """The folder of this run's own files (``config.yaml``, ``test_metrics.json``, the report).

    ``trainer.log_dir``, when it is a run's own folder (TensorBoard's and CSV's ``version_N``;
    no logger: the root). Other loggers' ``log_dir`` is their store, shared by every run
    (MLflow's ``./mlruns``), where one run's files would overwrite another's; their runs get
    ``<default_root_dir>/<logger kind>/<run id>`` (e.g. ``runs/camvid_unet/mlflow/3f2a…``).
    Call it on every process under DDP (rank 0 decides, the others are told).
    """
    log_dir = trainer.log_dir  # broadcast from rank 0 under DDP
    logger = trainer.logger
    folder = Path(log_dir or trainer.default_root_dir)
    if logger is None or _VERSION.match(folder.name) or type(logger).__name__ in (
            "TensorBoardLogger", "CSVLogger"):  # a run's own folder, whatever its version
        return folder
    chosen = str(folder)
    if trainer.is_global_zero:
        version = getattr(logger, "version", None)
        kind = type(logger).__name__.removesuffix("Logger").lower() or "logger"
        if version is not None:
            chosen = str(Path(trainer.default_root_dir) / kind / str(version))
    return Path(trainer.strategy.broadcast(chosen))

