"""Callbacks: the test-metrics and report writer the CLI always adds, and a throughput meter."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from segpipe.fileio import atomic_write_json

__all__ = ["TestMetricsWriter", "Throughput"]


class TestMetricsWriter(L.Callback):
    """After ``test``: write ``test_metrics.json``, a per-image CSV and the evaluation report.

    Files go to the run's log directory (``trainer.log_dir``): ``test_metrics.json`` (every metric,
    macro/micro labelled), ``test_per_image.csv`` (path, IoU, Dice, pixel accuracy per image) and
    ``report.md`` with its plots and worst-image gallery (:func:`segpipe.report.write_report`,
    coloured with the data module's ``class_colors``). The paths are printed.

    Args:
        filename: Name of the JSON file.
        per_image_csv: Also write ``test_per_image.csv``.
        report: Also write ``report.md`` (and ``report_files/``) beside the JSON.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, filename: str = "test_metrics.json", per_image_csv: bool = True, report: bool = True
    ) -> None:
        self.filename = filename
        self.per_image_csv = per_image_csv
        self.report = report
        self.last_path: Path | None = None
        self.last_report_path: Path | None = None

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = getattr(pl_module, "test_report", None)
        if not report:
            return
        from segpipe.report import write_per_image_csv

        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        report = dict(report)
        per_image = report.pop("per_image", [])
        worst = report.pop("worst_images", None) or []
        csv_path: Path | None = None
        if self.per_image_csv and per_image:
            csv_path = write_per_image_csv(out_dir / "test_per_image.csv", per_image)
            report["per_image_csv"] = str(csv_path)
        self.last_path = atomic_write_json(out_dir / self.filename, report)
        print(f"Test metrics written to {self.last_path}")
        if self.report:
            self.last_report_path = self._write_report(
                trainer, {**report, "per_image": per_image, "worst_images": worst}, out_dir,
                csv_path,
            )
            if self.last_report_path is not None:
                print(f"Evaluation report written to {self.last_report_path}")

    @staticmethod
    def _write_report(
        trainer: L.Trainer, report: dict[str, Any], out_dir: Path, csv_path: Path | None
    ) -> Path | None:
        """The report is a convenience: a failure warns instead of losing the finished test."""
        from segpipe.data.io import read_image
        from segpipe.report import write_report

        dm = getattr(trainer, "datamodule", None)
        colors = getattr(dm, "class_colors", None)
        bands = getattr(dm, "bands", None)
        reader = functools.partial(read_image, bands=bands) if bands else None
        try:
            return write_report(report, out_dir, class_colors=colors, image_reader=reader,
                                per_image_csv=csv_path)
        except Exception as exc:  # noqa: BLE001 - metrics are already safe on disk
            rank_zero_warn(
                f"could not write the evaluation report in {out_dir}: {type(exc).__name__}: "
                f"{exc}. test_metrics.json is complete; set metrics_writer.report=false to skip "
                "the report."
            )
            return None


class Throughput(L.Callback):
    """Measure training throughput (images/s) after a warm-up, and print it when fit ends.

    Args:
        warmup_steps: Training steps excluded from the measurement (allocator, oneDNN and loader
            warm-up).
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.images = 0
        self.seconds = 0.0
        self._batches = 0
        self._t0: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        # Wall time between batch ends: includes data loading, forward, backward and the step.
        now = time.perf_counter()
        self._batches += 1
        if self._batches == self.warmup_steps:
            self._t0 = now
        elif self._t0 is not None:
            self.images += int(batch["image"].shape[0])
            self.seconds = now - self._t0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.images:
            print(f"Training throughput: {self.images_per_second:.2f} images/s "
                  f"({self.images} images after {self.warmup_steps} warm-up steps)")
