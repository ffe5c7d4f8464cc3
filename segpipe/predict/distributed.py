"""``segpipe predict`` over several devices or processes, under a Lightning ``Trainer``.

One device in one process runs in a plain loop (:class:`~segpipe.predict.engine.InProcessRunner`);
``--devices N``, ``--strategy``, a launcher's processes (torchrun, SLURM) or another accelerator
or precision run here instead: Lightning starts the processes, shards the files with an
unrepeated distributed sampler and calls the same hooks of the same
:class:`~segpipe.predict.engine.PredictModule` and
:class:`~segpipe.predict.engine.WritingCallback`, through the two adapters below. Only this
module of ``segpipe.predict`` imports Lightning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from segpipe.predict.engine import PredictModule, WritingCallback

__all__ = ["LightningRunner"]


class _LightningModule(L.LightningModule):
    """A :class:`PredictModule` as Lightning's predict loop calls it."""

    def __init__(self, module: PredictModule) -> None:
        super().__init__()
        self.module = module

    def on_predict_start(self) -> None:
        self.module.device = self.device
        loader = self.trainer.predict_dataloaders
        inputs = (loader[0] if isinstance(loader, (list, tuple)) else loader).dataset
        self.module.on_predict_start(inputs, self.trainer.precision_plugin.forward_context)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """The records as they are: :class:`PredictModule` moves the stacked images itself
        (as in one process), and the rest (sizes, nodata masks) stays on the CPU."""
        return batch

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.module.predict_step(batch, batch_idx)

    def on_predict_end(self) -> None:
        self.module.on_predict_end()


class _LightningWriter(BasePredictionWriter):
    """A :class:`WritingCallback` as a Lightning callback."""

    def __init__(self, callback: WritingCallback) -> None:
        super().__init__(write_interval="batch")
        self.callback = callback

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.callback.on_predict_start(getattr(pl_module, "module", pl_module),
                                       trainer.is_global_zero, trainer.world_size)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           prediction: Any, batch_indices: Any, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        self.callback.write_on_batch_end(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.callback.on_predict_end(trainer.world_size)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.callback.on_exception(exception)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up chatter ("GPU available: ...") held back; levels restored after."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class LightningRunner:
    """Runs prediction under a ``Trainer`` built from the command's device options.

    Args:
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        strategy: Lightning strategy.
        precision: Lightning precision.
        num_files: Input files (each process needs one).

    Raises:
        PredictUsageError: Options Lightning refuses (a typo such as ``--precision 17``, a
            device this machine lacks), or more processes than files.
    """

    def __init__(self, accelerator: str, devices: Any, strategy: str, precision: str,
                 num_files: int) -> None:
        from segpipe.predict.command import PredictUsageError

        try:
            with _quiet_lightning():
                self.trainer = L.Trainer(
                    accelerator=accelerator, devices=devices, strategy=strategy,
                    precision=precision, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, inference_mode=True,
                )
        except (ValueError, TypeError, ImportError, RuntimeError, MisconfigurationException) as exc:
            raise PredictUsageError(
                f"--accelerator {accelerator} --devices {devices} --strategy {strategy} "
                f"--precision {precision}: {' '.join(str(exc).split())}") from None
        if self.trainer.world_size > num_files:  # Lightning's sampler needs a file per process
            raise PredictUsageError(
                f"{num_files} input image(s) for {self.trainer.world_size} processes: each needs "
                f"at least one; use --devices {num_files}")

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.trainer.global_rank

    def run(self, module: PredictModule, callback: WritingCallback, loader: DataLoader) -> bool:
        """Predict this process's share of ``loader``.

        Returns:
            Whether Ctrl-C (or SIGTERM) stopped it.
        """
        self.trainer.callbacks.append(_LightningWriter(callback))
        try:
            with _quiet_lightning():
                self.trainer.predict(_LightningModule(module), dataloaders=loader,
                                     return_predictions=False)
        except SystemExit:  # Lightning's graceful Ctrl-C shutdown ends with sys.exit(1)
            if not self.trainer.interrupted:
                raise
            return True
        return False
